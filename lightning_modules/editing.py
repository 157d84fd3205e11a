"""The Lightning side of mass knowledge editing (MEMIT, NAMET): scoring, preparation, caching, evaluation.

:class:`EditingRecipe` is the shared base of :class:`~lightning_modules.memit.MEMIT` and its variants; it holds no
editing algorithm. Under LightningCLI one training step is one *edit batch* (the DataModule's ``edit_batch_size``
records; manual optimisation, no optimizer): the subclass's ``compute_targets`` gives the target vectors, then
its ``apply_update`` writes them in closed form. Validation/test score the edited records with CounterFact's
efficacy, paraphrase and neighbourhood, loose (probability comparison) and strict (every target token is the
greedy choice), with and without a random model-generated prefix, plus fluency (``acc`` is the strict efficacy;
``*_se`` are standard errors over records).

**Target cache.** With ``targets_dir`` set, the target vectors of an edit batch are stored there (safetensors,
written atomically) under a key that hashes the model's weights, the records, the context templates and every
hyper-parameter the optimisation reads; a later run with the same key reads them instead of optimising again.
Only the closed-form update (``λ``, the edited layers below ``L``, the statistics) may then differ, which makes a
``λ`` sweep cost one evaluation per value. ``edit/z_seconds`` stays the time the vectors took when computed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from lightning_modules import editing_stats as S
from lightning_modules.base import BaseRecipe
from lightning_modules.editing_eval import EditMetrics
from lightning_modules.ops import editing as E
from foundation import assets
from foundation.artifacts import atomic_write_text

# hyper-parameters the target-vector optimisation reads (the cache key); the update's λ is not among them
TARGET_HPARAMS = ("layer_module_tmp", "v_lr", "v_num_grad_steps", "v_weight_decay", "clamp_norm_factor", "kl_factor",
                  "v_stop_loss", "compute_dtype")


class EditingRecipe(BaseRecipe):
    """Shared machinery of the editing recipes (see the module docstring); subclasses define ``__init__`` (which
    calls :meth:`_init_editing`), ``compute_targets``, ``apply_update`` and ``max_norm``."""

    monitor = "val/acc"
    mode = "max"

    def _init_editing(self) -> None:
        self.automatic_optimization = False
        self.templates: list[str] | None = None
        self.prefix_texts: list[str] | None = None
        self.cov: dict[int, torch.Tensor] = {}
        self.timings: dict[str, float] = {}
        self.edit_metrics = torch.nn.ModuleDict({"val": EditMetrics(), "test": EditMetrics()})
        self._fluency_prompts: list[str] = []

    # --- model access -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        self.net.build()

    @property
    def lm(self):
        return self.net.model

    @property
    def tok(self):
        return self.net.tokenizer

    def _module(self, tmp: str, layer: int) -> torch.nn.Module:
        return self.lm.get_submodule(tmp.format(layer))

    def _autocast(self):
        dev = next(self.lm.parameters()).device
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.hparams.compute_dtype == "bfloat16")

    # --- teacher-forced scoring --------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean NLL per target token and strict correctness (every target token is the argmax) of each
        ``target`` after its ``prompt``, by teacher forcing."""
        seqs, spans = [], []
        for p, t in zip(prompts, targets):
            pi, ti = self.net.encode(p), self.net.encode_target(p, t)
            seqs.append(pi + ti[:-1])
            spans.append((len(pi) - 1, ti))
        nll, strict = torch.zeros(len(seqs)), torch.zeros(len(seqs), dtype=torch.bool)
        emb = self.lm.get_output_embeddings()
        for group in self.net.batches([len(s) for s in seqs], self.hparams.token_budget):
            ids, mask = self.net.pad([seqs[i] for i in group])
            with self._autocast():
                h = self.lm.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            width = max(len(spans[i][1]) for i in group)
            pos = torch.zeros(len(group), width, dtype=torch.long)
            tgt, tmask = torch.zeros_like(pos), torch.zeros_like(pos)
            for row, i in enumerate(group):
                start, t = spans[i]
                pos[row, : len(t)] = torch.arange(start, start + len(t))
                tgt[row, : len(t)], tmask[row, : len(t)] = torch.tensor(t), 1
            pos, tgt, tmask = pos.to(self.device), tgt.to(self.device), tmask.to(self.device)
            hs = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            logits = emb(hs.to(emb.weight.dtype)).float()
            logp = logits.log_softmax(-1)
            tok_logp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            nll[group] = E.target_nll(tok_logp, tmask).cpu()
            ok = (logits.argmax(-1) == tgt) | (tmask == 0)
            strict[group] = ok.all(-1).cpu()
        return nll, strict

    def knows(self, prompts: list[str], targets: list[str]) -> list[bool]:
        """Which facts the unedited model states (strict); cached per model fingerprint in ``stats_dir``."""
        path = self._stats_dir() / f"known-{self._model_key()}-{self.hparams.compute_dtype}.json"
        cache = json.loads(path.read_text()) if path.exists() else {}
        todo = sorted({(p, t) for p, t in zip(prompts, targets) if f"{p}\t{t}" not in cache})
        if todo:
            _, strict = self.score([p for p, _ in todo], [t for _, t in todo])
            cache.update({f"{p}\t{t}": bool(s) for (p, t), s in zip(todo, strict)})
            self._atomic_write(path, json.dumps(cache))
        return [cache[f"{p}\t{t}"] for p, t in zip(prompts, targets)]

    # --- one-time preparation ----------------------------------------------------------------------------
    def _stats_dir(self) -> Path:
        d = Path(self.hparams.stats_dir) if self.hparams.stats_dir else assets.cache_dir() / "editing-stats"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _model_key(self) -> str:
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = self.net.fingerprint()
        bos = f"-bos{self.net.bos_id}" if self.net.bos_id is not None else ""
        return f"{Path(str(self.net.pretrained)).name}-{self._fingerprint}{bos}"

    @staticmethod
    def _atomic_write(path: Path, text: str) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, top_k: int, temperature: float, seed: int) -> list[str]:
        """Seeded top-k sampling continuations (prompt included), as MEMIT's ``generate_fast``."""
        if not prompts:
            return []
        ids, mask = self.net.pad([self.net.encode(p) for p in prompts], left=True)
        with torch.random.fork_rng(devices=[]), self._autocast():
            torch.manual_seed(seed)
            out = self.lm.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True, top_k=top_k,
                temperature=temperature, pad_token_id=self.tok.pad_token_id,
            )
        return [self.tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out]

    def prepare(self) -> None:
        """Context templates, evaluation prefixes, known-fact selection, statistics (once, before any edit)."""
        if self.templates is not None:
            return
        self.lm.eval()
        hp = self.hparams
        seed = torch.initial_seed() % 2**31
        gen = self.generate(hp.context_seeds, hp.context_length - 1, hp.context_top_k, hp.context_temperature, seed)
        self.templates = ["{}"] + [
            (w + g).replace("{", " ").replace("}", " ") + ". {}" for w, g in zip(hp.context_seeds, gen)
        ]
        seeds = ["The", "A", "In", "It", "This", "When", "After", "We", "She", "There"]
        words = [seeds[i % len(seeds)] for i in range(hp.eval_prefixes)]
        gen = self.generate(words, hp.eval_prefix_length - 1, 5, 1.0, 12345) if words else []
        self.prefix_texts = [(w + g).replace("{", " ").replace("}", " ") for w, g in zip(words, gen)]
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "select_known"):
            dm.select_known(self.knows)
        start = time.perf_counter()
        self.cov = self.load_stats()
        self.timings["stats_seconds"] = time.perf_counter() - start

    def load_stats(self) -> dict[int, torch.Tensor]:
        """``E[k kᵀ]`` of each edited layer's rewrite-module input (cached, see ``lightning_modules.editing_stats``)."""
        hp = self.hparams
        paths = [hp.rewrite_module_tmp.format(layer) for layer in self.layers]
        cov = S.cached_second_moments(self.net, paths, self._stats_dir(), self._model_key(), hp.stats_corpus,
                                      hp.stats_tokens, hp.stats_seq_len, hp.token_budget, self._autocast, hp.compute_dtype)
        return {layer: cov[p].to(self.device) for layer, p in zip(self.layers, paths)}

    # --- target cache -------------------------------------------------------------------------------------
    def _targets_key(self, records: list) -> str:
        hp = self.hparams
        spec = {"method": type(self).__name__, "model": self._model_key(), "top_layer": self.layers[-1],
                "templates": self.templates, **{k: hp[k] for k in TARGET_HPARAMS},
                "records": [[r.subject, r.prompt, r.target_new] for r in records]}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def cached_targets(self, records: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]:
        """``compute_targets(records)`` through the cache of ``targets_dir`` (if set); also returns the seconds
        the optimisation took (when it ran, possibly in an earlier run) and whether the vectors were read."""
        from safetensors.torch import load_file, save_file

        path = None
        if self.hparams.targets_dir:
            path = Path(self.hparams.targets_dir) / f"{type(self).__name__.lower()}-{self._targets_key(records)}.safetensors"
            if path.exists():
                from safetensors import safe_open

                with safe_open(str(path), "pt") as f:
                    seconds = float(f.metadata()["seconds"])
                t = load_file(str(path), device=str(self.device))
                return t["delta"], t["h_init"], t["nll"], seconds, True
        start = time.perf_counter()
        with torch.enable_grad():
            delta, h_init, nll = self.compute_targets(records)
        seconds = time.perf_counter() - start
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"delta": delta.float().cpu().contiguous(), "h_init": h_init.float().cpu().contiguous(),
                       "nll": nll.float().cpu().contiguous()}, str(tmp), metadata={"seconds": str(seconds)})
            tmp.replace(path)
        return delta, h_init, nll, seconds, False

    # --- Lightning hooks ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        return None

    def on_fit_start(self) -> None:
        if self.trainer.world_size > 1:
            raise RuntimeError("MEMIT/NAMET edit in closed form on one process: run with trainer.devices=1 (one GPU "
                               "or the CPU); batching within the process replaces data parallelism")
        self.prepare()

    def on_validation_start(self) -> None:
        self.prepare()

    def on_test_start(self) -> None:
        self.prepare()

    def training_step(self, batch: list, batch_idx: int) -> None:
        self.lm.eval()
        delta, h_init, nll, z_seconds, cached = self.cached_targets(batch)
        t1 = time.perf_counter()
        info = self.apply_update(batch, delta, h_init)
        t2 = time.perf_counter()
        self.timings["z_seconds"] = self.timings.get("z_seconds", 0.0) + z_seconds
        self.timings["update_seconds"] = self.timings.get("update_seconds", 0.0) + t2 - t1
        # how hard the clamp binds: ||δ|| over its radius (1: on the boundary)
        clamp = (delta.float().norm(dim=-1) / self.max_norm(h_init.float())).mean()
        self.edit_summary = {"z_nll": float(nll.mean()), "delta_over_clamp": float(clamp), "z_cached": float(cached)}
        log = {**info, "edit/z_nll": float(nll.mean()), "edit/z_seconds": self.timings["z_seconds"],
               "edit/delta_over_clamp": float(clamp), "edit/z_cached": float(cached),
               "edit/update_seconds": self.timings["update_seconds"],
               "edit/stats_seconds": self.timings.get("stats_seconds", 0.0), "edit/num_edits": float(len(batch))}
        self.log_dict(log, on_step=True, on_epoch=False, batch_size=len(batch))

    def _evaluate(self, split: str, records: list) -> None:
        self.edit_metrics[split].update(records, self.score, self.prefix_texts)
        missing = self.hparams.fluency_records - len(self._fluency_prompts)
        self._fluency_prompts += [r.text for r in records][: max(0, missing)]

    def _log_epoch(self, split: str) -> None:
        hp, metrics = self.hparams, self.edit_metrics[split]
        if self._fluency_prompts and hp.fluency_tokens > 0:
            gens = self.generate(self._fluency_prompts, hp.fluency_tokens, 5, 1.0, 0)
            metrics.update_fluency([p + g for p, g in zip(self._fluency_prompts, gens)])
        self._fluency_prompts = []
        for name, value in metrics.compute().items():
            self.log(f"{split}/{name}", value)
        self._write_per_record(split, metrics.last_per_record)
        if "z_seconds" in self.timings:  # wall time of the edits (target vectors + closed-form updates)
            self.log(f"{split}/edit_seconds", self.timings["z_seconds"] + self.timings["update_seconds"])
        for name, value in getattr(self, "edit_summary", {}).items():  # the last edit batch's diagnostics
            self.log(f"{split}/{name}", value)

    def _write_per_record(self, split: str, values: dict[str, list]) -> None:
        """``<log_dir>/per_record_<split>[_rank<k>].json``: every record's metrics with its ``case_id``, so that two
        methods evaluated on the same records can be compared pairwise (``recipes/comparisons/namet.py``)."""
        log_dir = self.trainer.log_dir if self._trainer is not None else None
        if not values or not log_dir:
            return
        rank = f"_rank{self.global_rank}" if self.trainer.world_size > 1 else ""
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(log_dir) / f"per_record_{split}{rank}.json", json.dumps(values))

    def validation_step(self, batch: list, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: list, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # --- artifact ----------------------------------------------------------------------------------------
    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the rewritten matrices; the rest is the base model named in the manifest."""
        return {f"{self.hparams.rewrite_module_tmp.format(l)}.weight": self._module(self.hparams.rewrite_module_tmp, l).weight.detach().cpu()
                for l in self.layers}

    def artifact_metadata(self) -> dict:
        return {**super().artifact_metadata(), "base_model": self.net.pretrained, "method": type(self).__name__,
                "edited_layers": self.layers, "timings": dict(self.timings)}


