"""NAMET (Dai, Ji, Li, Wang, "NAMET: Robust Massive Model Editing via Noise-Aware Memory Optimization", arXiv
2505.11876 v1): MEMIT whose memories are extracted under noisy contexts.

The paper attributes MEMIT's failures at thousands of edits to *embedding collisions* among knowledge items and
"introduces noise during memory extraction via a one-line modification to MEMIT" (abstract). The official code
(``ybdai7/NAMET-massive-editing`` at commit ``5b6ac1d6241fbb8475afbabcef4bdff467c717ae``) has no explicit random
noise: the "noise" is the random model-generated prefixes of the context templates. Against its own ``memit/``
copy, ``namet/compute_z.py`` changes the initial value ``target_init`` from the bare prompt's hidden state

    memit/compute_z.py:146   target_init = cur_out[0][0, lookup_idxs[0]].detach().clone()

to the matrix of the hidden states of *every* prompt (the context templates and the KL prompt)

    namet/compute_z.py:149   target_init = []
    namet/compute_z.py:150   for i, idx in enumerate(lookup_idxs):
    namet/compute_z.py:151       target_init.append(cur_out[0][i, idx, :])
    namet/compute_z.py:152   target_init = torch.stack(target_init, dim=0).T

and what reads it follows: the weight decay becomes ``||δ 1ᵀ||_F / ||H||_F``

    namet/compute_z.py:218   wd_delta = delta.repeat(target_init.size(1),1).T
    namet/compute_z.py:220       torch.norm(wd_delta) / torch.norm(target_init)

(MEMIT, ``memit/compute_z.py:222``: ``torch.norm(delta) / torch.norm(target_init) ** 2``), the clamp radius
``clamp_norm_factor * target_init.norm()`` (``namet/compute_z.py:245``, the same line as MEMIT's 247) becomes
``c ||H||_F``, the values become ``H + δ 1ᵀ`` (``:250-251``) and ``namet/namet_main.py`` writes the mean residual
over the prefixed contexts, dropping the bare prompt (column 0) and the KL prompt (the last):

    namet/namet_main.py:212  target_zs = opt_zs_list[re_id][:,1:-1] - cur_zs[:,1:-1]
    namet/namet_main.py:213  temp_target_zs = torch.mean(target_zs, dim=1)

(MEMIT, ``memit/memit_main.py:202``: ``targets = zs - cur_zs``, bare prompt only). These three hooks are all this
class changes. Everything else in the repository is shared by both methods (the context templates: 12 seeds,
temperature 0.5, top-k 100, in both ``get_context_templates``; the early stop ``loss < 1e-2``, both
``compute_z.py``) or is a hyper-parameter of the ``hparams/{MEMIT,NAMET}/*.json`` files (``v_lr`` 0.5 vs 0.04,
``mom2_update_weight`` [15000, 15000] vs [25000, 50000] for Llama-2-7B), which the configs keep as named
ablations (``configs/namet/smollm2_namet_official_hparams.yaml``), not as part of the method.
"""

from __future__ import annotations

import torch

from lightning_modules.memit import MEMIT
from lightning_modules.ops import editing as E


class NAMET(MEMIT):
    """NAMET (Dai et al., arXiv 2505.11876): MEMIT with the memory extracted under every prefixed context; see the
    module docstring. Takes MEMIT's arguments unchanged (the configs differ only in the class)."""

    def max_norm(self, h_init: torch.Tensor) -> torch.Tensor:
        """NAMET clamps ``δ`` to ``c · ||H||_F`` over all the request's contexts (templates and KL prompt)."""
        return self.hparams.clamp_norm_factor * h_init.flatten(1).norm(dim=-1)

    def weight_decay(self, delta: torch.Tensor, h_init: torch.Tensor) -> torch.Tensor:
        """``v_weight_decay · ||δ 1ᵀ||_F / ||H||_F`` (not squared, unlike MEMIT's)."""
        return self.hparams.v_weight_decay * E.namet_weight_decay(delta, h_init)

    def residual_columns(self) -> list[int]:
        """The prefixed (noisy) contexts: every template but the clean one; the KL prompt is excluded."""
        return list(range(1, len(self.templates)))
