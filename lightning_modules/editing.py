"""MEMIT and NAMET: mass knowledge editing of any Hugging Face causal LM, batched.

MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023, arXiv 2210.07229) writes thousands of
facts ``(subject, prompt) -> target`` into the MLP output projections of a few layers ``𝓛``:

1. **Target vectors.** For each request it optimises a vector ``δ`` added to the residual stream at the top
   edited layer ``L = max(𝓛)``, at the subject's last token, so that the model predicts the new target after the
   prompt and after a few model-generated prefixes ("context templates"), with a KL term keeping
   "{subject} is a" unchanged, a weight decay on ``δ`` and a norm clamp. The value to write is ``z = h₀ + δ``.
2. **Closed-form update.** For each layer ``l ∈ 𝓛`` in turn, keys ``K`` (the projection input at the subject's
   last token, averaged over context templates) and residuals ``R = z - h_L`` (recomputed after the lower layers
   were updated) give ``Δ_l = R/(|𝓛|-i) · Kᵀ (λ C_l + K Kᵀ)⁻¹`` (:func:`~lightning_modules.ops.editing.memit_layer_update`),
   with ``C_l`` the keys' second moment over a text corpus.

NAMET (Dai, Ji, Li, Wang, "NAMET: Robust Massive Model Editing via Noise-Aware Memory Optimization",
arXiv 2505.11876) attributes MEMIT's collapse at thousands of edits to *embedding collisions* and extracts the
memory under noisy (randomly prefixed) contexts. Following the official code (``namet/compute_z.py``,
``namet/namet_main.py``): the values are the hidden states of **every** context ``H + δ`` instead of the clean
``h₀ + δ``; the residual written is the mean of ``z_j - h_j`` over the prefixed contexts only; the weight decay is
``||δ 1ᵀ||_F / ||H||_F`` (not MEMIT's ``||δ|| / ||h₀||²``) and the clamp radius ``c·||H||_F``; the learning rate is
much smaller and ``λ`` is set per layer.

What is different from the reference implementations (same algorithm, other engineering):

- **Batched target optimisation.** ``v_batch_size`` requests are optimised together (one ``δ`` row each, one Adam;
  converged requests are frozen and dropped from the batch), instead of one request at a time; the tokens before
  the subject's last token do not depend on ``δ`` and are run once into a KV cache. ``v_batch_size: 1`` is the
  reference's one-at-a-time loop; both give the same vectors (a test checks it).
- **Architecture-agnostic** through module-path templates (``layer_module_tmp``, ``rewrite_module_tmp``); the loss
  uses the model's final norm and output embedding (``base_model`` + ``get_output_embeddings()``), so
  ``v_loss_layer`` is always the last layer, as in every reference hparams file.
- **Statistics** ``C_l`` come from a configurable offline corpus (default: Rotten Tomatoes snippets, not
  Wikipedia) and are cached under ``stats_dir`` keyed by the model's weights fingerprint, module and corpus.

Under LightningCLI one training step is one *edit batch* (the DataModule's ``edit_batch_size`` records; manual
optimisation, no optimizer); validation/test score the edited records with CounterFact's efficacy, paraphrase and
neighbourhood, loose (probability comparison) and strict (every target token is the greedy choice), with and
without a random model-generated prefix, plus fluency. ``acc`` is the strict efficacy.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules import editing_stats as S
from lightning_modules.base import BaseRecipe
from lightning_modules.editing_eval import EditMetrics
from lightning_modules.nets.causal_lm import CausalLM
from lightning_modules.ops import editing as E
from recipes import assets


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out, h):
    return (h, *out[1:]) if isinstance(out, tuple) else h


class MEMIT(BaseRecipe):
    """MEMIT (Meng et al., ICLR 2023): batched mass editing of MLP memories; see the module docstring.

    Args:
        model: the causal LM to edit (built in ``configure_model``).
        layers: edited layers ``𝓛``; target vectors are computed at ``max(layers)``.
        layer_module_tmp: path of a transformer block (``{}`` = layer index); its output is the residual stream.
        rewrite_module_tmp: path of the rewritten linear map (MLP output projection).
        mom2_update_weight: ``λ``; a list gives one per layer (NAMET).
        v_lr: Adam learning rate of the target vectors ``δ``.
        v_num_grad_steps: optimisation steps per target vector.
        v_weight_decay: weight of the penalty on ``δ``.
        clamp_norm_factor: ``||δ||`` is projected below this factor times the initial hidden state's norm.
        kl_factor: weight of the KL term on "{subject} is a".
        v_stop_loss: a request stops optimising once its loss is below this.
        v_batch_size: requests whose target vectors are optimised together (1: one at a time).
        context_seeds: first words of the generated context templates (one template each).
        context_length: tokens of each context template (prompt word included, as MEMIT's ``generate_fast``).
        context_top_k: top-k of the template sampling.
        context_temperature: temperature of the template sampling.
        stats_corpus: corpus of the second-moment statistics (``rotten-tomatoes`` or a text/jsonl file).
        stats_tokens: tokens of the corpus used for the statistics.
        stats_seq_len: texts are truncated to this many tokens.
        stats_dir: cache of statistics and known-fact checks (``None``: ``~/.cache/safeweights/editing-stats``).
        compute_dtype: autocast dtype of forward passes (weights stay in their own dtype; ``bfloat16`` is ~3x
            faster on recent CPUs, the closed-form update is always solved in float64).
        eval_prefixes: number of random prefixes for the prefixed metrics (generated once, fixed seed).
        eval_prefix_length: tokens of each evaluation prefix (NAMET's ``assigned_prefix_len`` is 5).
        fluency_records: records whose prompts are continued for the fluency measure (0: off).
        fluency_tokens: new tokens per fluency generation.
        token_budget: padded tokens per no-grad forward batch.
        prefix_cache: run the tokens before the subject's last one once into a KV cache instead of at every
            step of the target optimisation (same result, fewer FLOPs; ``false`` is the reference's way).
    """

    monitor = "val/acc"
    mode = "max"

    def __init__(
        self,
        model: CausalLM,
        layers: list[int] = [3, 4],  # noqa: B006 (jsonargparse needs a literal default)
        layer_module_tmp: str = "model.layers.{}",
        rewrite_module_tmp: str = "model.layers.{}.mlp.down_proj",
        mom2_update_weight: float | list[float] = 15000.0,
        v_lr: float = 0.5,
        v_num_grad_steps: int = 25,
        v_weight_decay: float = 0.5,
        clamp_norm_factor: float = 0.75,
        kl_factor: float = 0.0625,
        v_stop_loss: float = 5e-2,
        v_batch_size: int = 32,
        context_seeds: list[str] = ["The", "Therefore", "Because", "I", "You"],  # noqa: B006
        context_length: int = 10,
        context_top_k: int = 5,
        context_temperature: float = 1.0,
        stats_corpus: str = "rotten-tomatoes",
        stats_tokens: int = 100_000,
        stats_seq_len: int = 128,
        stats_dir: str | None = None,
        compute_dtype: Literal["float32", "bfloat16"] = "float32",
        eval_prefixes: int = 10,
        eval_prefix_length: int = 5,
        fluency_records: int = 20,
        fluency_tokens: int = 50,
        token_budget: int = 4096,
        prefix_cache: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.net = model
        self.layers = sorted(layers)
        lams = mom2_update_weight if isinstance(mom2_update_weight, list) else [mom2_update_weight] * len(layers)
        if len(lams) != len(self.layers):
            raise ValueError(f"{len(lams)} values of mom2_update_weight for {len(self.layers)} layers")
        self.lams = [float(x) for x in lams]
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

    # --- target vectors ----------------------------------------------------------------------------------
    def _request_sequences(self, record) -> list[dict]:
        """Rewriting sequences (every context template, prompt + target[:-1]) then the KL prompt."""
        out = []
        for t in self.templates:
            template = t.format(record.prompt)
            text = template.format(record.subject)
            pi, ti = self.net.encode(text), self.net.encode_target(text, record.target_new)
            look = self.net.subject_last(template, record.subject)
            out.append({"ids": pi + ti[:-1], "look": look, "tpos": list(range(len(pi) - 1, len(pi) - 1 + len(ti))), "tgt": ti})
        kl = "{} is a"
        out.append({"ids": self.net.encode(kl.format(record.subject)), "look": self.net.subject_last(kl, record.subject), "tpos": [], "tgt": []})
        return out

    def max_norm(self, h_init: torch.Tensor) -> torch.Tensor:
        """Clamp radius per request from its initial hidden states ``[n, P, d]``: MEMIT uses the clean prompt."""
        return self.hparams.clamp_norm_factor * h_init[:, 0].norm(dim=-1)

    def weight_decay(self, delta: torch.Tensor, h_init: torch.Tensor) -> torch.Tensor:
        return self.hparams.v_weight_decay * E.memit_weight_decay(delta, h_init[:, 0])

    def residual_columns(self) -> list[int]:
        """Contexts whose ``z - h_L`` is written: MEMIT uses the clean prompt only."""
        return [0]

    def compute_targets(self, records: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched target-vector optimisation: returns ``δ`` ``[n, d]``, the initial hidden states ``H``
        ``[n, P, d]`` at layer ``L`` (every context template, then the KL prompt) and the final NLL ``[n]``."""
        bs = max(1, self.hparams.v_batch_size)
        # requests with similar suffix lengths share a batch (less padding); results in the input order
        length = [len(self.net.encode_target(r.text, r.target_new)) - len(self.net.encode(r.subject)) for r in records]
        order = sorted(range(len(records)), key=lambda i: length[i])
        outs = [self._optimize([records[i] for i in order[j : j + bs]]) for j in range(0, len(records), bs)]
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return tuple(torch.cat(x)[inverse.to(x[0].device)] for x in zip(*outs))

    def _optimize(self, records: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hp, n = self.hparams, len(records)
        seqs = [s for r in records for s in self._request_sequences(r)]
        per = len(seqs) // n
        req = torch.arange(n).repeat_interleave(per)
        is_kl = torch.tensor([(j % per) == per - 1 for j in range(len(seqs))])
        # tokens before the subject's last one do not depend on δ: run them once into a KV cache
        cut = [s["look"] if hp.prefix_cache else 0 for s in seqs]
        pre_ids, pre_mask = self.net.pad([s["ids"][:c] for s, c in zip(seqs, cut)], left=True)
        suf_ids, suf_mask = self.net.pad([s["ids"][c:] for s, c in zip(seqs, cut)])
        dpos = torch.tensor([s["look"] - c for s, c in zip(seqs, cut)], device=self.device)
        pre_len = pre_mask.sum(1, keepdim=True)
        suf_pos = pre_len + torch.arange(suf_ids.shape[1], device=self.device)
        width = max(1, max(len(s["tgt"]) for s in seqs))
        tpos = torch.zeros(len(seqs), width, dtype=torch.long)
        tgt, tmask = torch.zeros_like(tpos), torch.zeros_like(tpos)
        for j, s in enumerate(seqs):
            k = len(s["tgt"])
            tpos[j, :k] = torch.tensor(s["tpos"], dtype=torch.long) - cut[j]
            tgt[j, :k], tmask[j, :k] = torch.tensor(s["tgt"], dtype=torch.long), 1
        tpos, tgt, tmask, req_d, is_kl = (x.to(self.device) for x in (tpos, tgt, tmask, req, is_kl))
        base, emb = self.lm.base_model, self.lm.get_output_embeddings()
        cache = None
        if pre_ids.shape[1]:
            with torch.no_grad(), self._autocast():
                cache = base(input_ids=pre_ids, attention_mask=pre_mask, position_ids=(pre_mask.cumsum(1) - 1).clamp_min(0),
                             use_cache=True).past_key_values
        d = self.lm.config.hidden_size
        delta = torch.zeros(n, d, device=self.device, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        h_init = torch.zeros(len(seqs), d, device=self.device)
        kl_init = None
        final_nll = torch.zeros(n, device=self.device)
        active = torch.ones(n, dtype=torch.bool, device=self.device)
        rows = torch.arange(len(seqs), device=self.device)
        active_cache = cache
        state = {}

        def add_delta(module, inputs, output):
            h = _hidden(output)
            at = F.one_hot(dpos[rows], h.shape[1]).to(h.dtype).unsqueeze(-1)  # [S, T, 1]: the subject's last token
            if "first" not in state:
                h_init[rows] = (h * at).sum(1).detach().float()
            return _with_hidden(output, h + at * delta[req_d[rows]].to(h.dtype).unsqueeze(1))

        layer_l = hp.layer_module_tmp.format(self.layers[-1])
        for it in range(hp.v_num_grad_steps):
            opt.zero_grad()
            step_cache = copy.deepcopy(active_cache) if active_cache is not None else None
            with S.hooks(self.lm, {layer_l: add_delta}), self._autocast():
                h = base(input_ids=suf_ids[rows], attention_mask=torch.cat([pre_mask[rows], suf_mask[rows]], 1),
                         position_ids=suf_pos[rows], past_key_values=step_cache, use_cache=step_cache is not None).last_hidden_state
            state["first"] = True
            r_req, r_kl = req_d[rows], is_kl[rows]
            rw = ~r_kl
            hs = h[rw].gather(1, tpos[rows][rw].unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            logp = emb(hs.to(emb.weight.dtype)).float().log_softmax(-1)
            tok_logp = logp.gather(-1, tgt[rows][rw].unsqueeze(-1)).squeeze(-1)
            nll = E.group_mean(E.target_nll(tok_logp, tmask[rows][rw]), r_req[rw], n)
            h_kl = h[r_kl].gather(1, dpos[rows][r_kl].view(-1, 1, 1).expand(-1, 1, h.shape[-1])).squeeze(1)
            kl_logp = emb(h_kl.to(emb.weight.dtype)).float().log_softmax(-1)
            if kl_init is None:
                kl_init = kl_logp.detach()
            kl = torch.zeros(n, device=self.device).index_add(
                0, r_req[r_kl], (kl_logp.exp() * (kl_logp - kl_init)).sum(-1)
            )
            hi = h_init.view(n, per, d)
            loss = nll + hp.kl_factor * kl + self.weight_decay(delta, hi)
            done = active & ((loss < hp.v_stop_loss) | (it == hp.v_num_grad_steps - 1))
            final_nll = torch.where(done, nll.detach(), final_nll)
            active = active & ~done
            if not active.any():
                break
            loss[active].sum().backward()
            frozen = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta.copy_(torch.where(active.unsqueeze(1), E.clamp_rows(delta, self.max_norm(hi)), frozen))
            if done.any():  # drop finished requests from the batch
                keep = active[r_req]
                if cache is not None:
                    active_cache = copy.deepcopy(active_cache)
                    active_cache.batch_select_indices(keep.nonzero().squeeze(1))
                rows = rows[keep]
                kl_init = kl_init[keep[r_kl]]
        return delta.detach(), h_init.view(n, per, d), final_nll

    # --- closed-form update ------------------------------------------------------------------------------
    @torch.no_grad()
    def _reps(self, records: list, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of ``layer`` (rewrite module input) and hidden states at ``L``, at the subject's last token of
        every context template: ``[n, P-1, d_in]`` and ``[n, P-1, d]`` (P-1 templates, no KL prompt)."""
        hp = self.hparams
        seqs = []
        for r in records:
            for t in self.templates:
                template = t.format(r.prompt)
                seqs.append(self.net.encode(template.format(r.subject))[: self.net.subject_last(template, r.subject) + 1])
        keys, hid, cur = [None] * len(seqs), [None] * len(seqs), {}

        def key_hook(module, inputs, output):
            x = inputs[0]
            for row, i in enumerate(cur["group"]):
                keys[i] = x[row, cur["last"][row]].float()

        def out_hook(module, inputs, output):
            h = _hidden(output)
            for row, i in enumerate(cur["group"]):
                hid[i] = h[row, cur["last"][row]].float()
            raise S.StopForward

        hooks = {hp.rewrite_module_tmp.format(layer): key_hook, hp.layer_module_tmp.format(self.layers[-1]): out_hook}
        with S.hooks(self.lm, hooks):
            for group in self.net.batches([len(s) for s in seqs], self.hparams.token_budget):
                ids, mask = self.net.pad([seqs[i] for i in group])
                cur.update(group=group, last=[len(seqs[i]) - 1 for i in group])
                with contextlib.suppress(S.StopForward), self._autocast():
                    self.lm.base_model(input_ids=ids, attention_mask=mask)
        n, p = len(records), len(self.templates)
        return torch.stack(keys).view(n, p, -1), torch.stack(hid).view(n, p, -1)

    @torch.no_grad()
    def apply_update(self, records: list, delta: torch.Tensor, h_init: torch.Tensor) -> dict[str, float]:
        """Write the batch into every layer of ``𝓛`` in turn (MEMIT's residual spreading); returns diagnostics."""
        hp, cols = self.hparams, self.residual_columns()
        info = {}
        for i, layer in enumerate(self.layers):
            keys, cur = self._reps(records, layer)
            groups = [1, len(self.templates) - 1] if len(self.templates) > 1 else [1]
            k = E.average_over_contexts(keys.flatten(0, 1), groups)
            z = h_init[:, cols] + delta.unsqueeze(1)
            resid = (z - cur[:, cols]).mean(1)
            upd = E.memit_layer_update(k, resid, self.cov[layer], self.lams[i], len(self.layers) - i)
            w = self._module(hp.rewrite_module_tmp, layer).weight
            upd = upd if upd.shape == w.shape else upd.T  # GPT-2's Conv1D stores [in, out]
            w += upd.to(w.dtype)
            info[f"edit/resid_norm_l{layer}"] = float(resid.norm(dim=-1).mean())
            info[f"edit/upd_norm_l{layer}"] = float(upd.norm())
        return info

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
        t0 = time.perf_counter()
        with torch.enable_grad():
            delta, h_init, nll = self.compute_targets(batch)
        t1 = time.perf_counter()
        info = self.apply_update(batch, delta, h_init)
        t2 = time.perf_counter()
        self.timings["z_seconds"] = self.timings.get("z_seconds", 0.0) + t1 - t0
        self.timings["update_seconds"] = self.timings.get("update_seconds", 0.0) + t2 - t1
        log = {**info, "edit/z_nll": float(nll.mean()), "edit/z_seconds": self.timings["z_seconds"],
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
        if "z_seconds" in self.timings:  # wall time of the edits (target vectors + closed-form updates)
            self.log(f"{split}/edit_seconds", self.timings["z_seconds"] + self.timings["update_seconds"])

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


class NAMET(MEMIT):
    """NAMET (Dai et al., arXiv 2505.11876): MEMIT with noise-aware memory extraction; see the module docstring.

    Takes MEMIT's arguments; the defaults are those of the official ``hparams/NAMET/LLAMA2-7B.json`` and its
    ``get_context_templates`` (12 sampled templates, temperature 0.5, top-k 100, early stop at loss 1e-2).
    """

    def __init__(
        self,
        model: CausalLM,
        layers: list[int] = [3, 4],  # noqa: B006
        layer_module_tmp: str = "model.layers.{}",
        rewrite_module_tmp: str = "model.layers.{}.mlp.down_proj",
        mom2_update_weight: float | list[float] = [25000.0, 50000.0],  # noqa: B006
        v_lr: float = 0.04,
        v_num_grad_steps: int = 25,
        v_weight_decay: float = 0.5,
        clamp_norm_factor: float = 0.75,
        kl_factor: float = 0.0625,
        v_stop_loss: float = 1e-2,
        v_batch_size: int = 32,
        context_seeds: list[str] = ["The", "Therefore", "Because", "I", "You", "However", "Also",  # noqa: B006
                                    "Nevertheless", "He", "It", "Can", "Because"],
        context_length: int = 10,
        context_top_k: int = 100,
        context_temperature: float = 0.5,
        stats_corpus: str = "rotten-tomatoes",
        stats_tokens: int = 100_000,
        stats_seq_len: int = 128,
        stats_dir: str | None = None,
        compute_dtype: Literal["float32", "bfloat16"] = "float32",
        eval_prefixes: int = 10,
        eval_prefix_length: int = 5,
        fluency_records: int = 20,
        fluency_tokens: int = 50,
        token_budget: int = 4096,
        prefix_cache: bool = True,
    ):
        super().__init__(
            model, layers, layer_module_tmp, rewrite_module_tmp, mom2_update_weight, v_lr, v_num_grad_steps,
            v_weight_decay, clamp_norm_factor, kl_factor, v_stop_loss, v_batch_size, context_seeds, context_length,
            context_top_k, context_temperature, stats_corpus, stats_tokens, stats_seq_len, stats_dir, compute_dtype,
            eval_prefixes, eval_prefix_length, fluency_records, fluency_tokens, token_budget, prefix_cache,
        )

    def max_norm(self, h_init: torch.Tensor) -> torch.Tensor:
        """NAMET clamps ``δ`` to ``c · ||H||_F`` over all the request's contexts."""
        return self.hparams.clamp_norm_factor * h_init.flatten(1).norm(dim=-1)

    def weight_decay(self, delta: torch.Tensor, h_init: torch.Tensor) -> torch.Tensor:
        return self.hparams.v_weight_decay * E.namet_weight_decay(delta, h_init)

    def residual_columns(self) -> list[int]:
        """The prefixed (noisy) contexts: every template but the clean one; the KL prompt is excluded."""
        return list(range(1, len(self.templates)))
