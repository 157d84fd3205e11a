"""A Llama-family causal LM whose top layers are trained and whose lower layers can be a frozen, cached trunk.

Tamper-resistance training and its attacks run dozens of forward/backward passes per step. On a CPU budget the
recipes train (and attack) only the top ``trainable_layers`` decoder blocks plus the final norm; the blocks below
are then a fixed function of the input, so their output for each training or evaluation sequence is computed once
and cached (``cache_trunk``), and every later pass runs only the top blocks. ``trainable_layers: null`` trains
every weight (the cluster setting; no cache).

Sequences are right-padded and attention is causal, so a real token never sees padding: the trunk output of a
sequence does not depend on the batch it came in, which is what makes the per-sequence cache exact.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_modules.nets.causal_lm import CausalLM

# Trunk outputs of pretrained models, shared by every instance with the same spec in this process (the stages of a
# reproduction, the attack harness's copies): the frozen blocks of a pretrained model are the same function.
_SHARED_TRUNKS: dict[tuple, dict[tuple[int, ...], torch.Tensor]] = {}


class SplitCausalLM(nn.Module):
    """A causal LM (Llama layout: ``model.embed_tokens/layers/norm/rotary_emb``, ``lm_head``) split into a frozen
    trunk and trainable top layers.

    The spec of :class:`CausalLM` passes through (``pretrained``, ``random_init``, ``config_overrides``, ``dtype``,
    ``bos_token``: e.g. ``<|endoftext|>`` for SmolLM2); attention is ``eager``.

    Args:
        trainable_layers: number of top decoder blocks trained (with the final norm); ``None``: every weight,
            embeddings and LM head included.
        cache_trunk: cache the output of the frozen blocks per sequence (needs ``trainable_layers``; shared by all
            instances of the same pretrained spec in a process). Only valid while nothing changes the frozen
            blocks; :meth:`full_forward` bypasses the cache.
    """

    def __init__(self, trainable_layers: int | None = 6, cache_trunk: bool = True, **kwargs):
        super().__init__()
        if trainable_layers is not None and trainable_layers < 1:
            raise ValueError(f"trainable_layers must be >= 1 or null (all weights), got {trainable_layers}")
        if cache_trunk and trainable_layers is None:
            raise ValueError("cache_trunk needs a frozen trunk: set trainable_layers, or cache_trunk: false")
        # a spec, not a submodule: the built model is registered once, as ``lm``
        spec = self.__dict__["lm_spec"] = CausalLM(attn_implementation="eager", **kwargs)
        self.trainable_layers, self.cache_trunk = trainable_layers, cache_trunk
        self.trunk_cache: dict[tuple[int, ...], torch.Tensor] = {}
        if not spec.random_init and trainable_layers is not None:  # pretrained weights: one trunk per process
            key = (spec.pretrained, trainable_layers, spec.dtype, spec.bos_token)
            self.trunk_cache = _SHARED_TRUNKS.setdefault(key, self.trunk_cache)

    # --- building ---------------------------------------------------------------------------------------
    def build(self) -> None:
        """Load the model and mark the top blocks (or everything) trainable; idempotent."""
        if self.lm_spec.model is not None:
            return
        self.lm_spec.build()
        lm = self.lm_spec.model
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(lm.model, attr):
                raise ValueError(f"{type(lm).__name__} has no model.{attr}: SplitCausalLM needs a Llama-layout model")
        n = len(lm.model.layers)
        if self.trainable_layers is not None and self.trainable_layers > n:
            raise ValueError(f"trainable_layers={self.trainable_layers} but the model has {n} blocks")
        self.lm = lm  # registered as a submodule: the weights are part of the recipe's state
        if self.trainable_layers is None:
            lm.requires_grad_(True)
        else:
            for block in lm.model.layers[self.start :]:
                block.requires_grad_(True)
            lm.model.norm.requires_grad_(True)
        lm.train()

    @property
    def tokenizer(self):
        return self.lm_spec.tokenizer

    @property
    def start(self) -> int:
        """Index of the first trained block (0 when every weight is trained)."""
        n = len(self.lm_spec.model.model.layers)
        return 0 if self.trainable_layers is None else n - self.trainable_layers

    def copy(self) -> SplitCausalLM:
        """A deep copy (weights included) sharing this model's trunk cache (the trunk is the same)."""
        return copy.deepcopy(self, memo={id(self.trunk_cache): self.trunk_cache})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def num_hidden_states(self) -> int:
        """How many hidden states the whole model has, as Hugging Face counts them (``len(outputs.hidden_states)``
        with ``output_hidden_states=True``: the embeddings' output and every block's)."""
        return len(self.lm_spec.model.model.layers) + 1

    @torch.no_grad()
    def reinitialise(self, seed: int = 0) -> None:
        """Draw the trained parameters afresh, as Hugging Face initialises a new model
        (``PreTrainedModel._init_weights``: linear and embedding weights ~ N(0, ``initializer_range``), biases 0,
        norm weights 1), from ``seed``. The frozen trunk keeps its pretrained weights (and its cache stays valid)."""
        gen = torch.Generator().manual_seed(seed)
        std = getattr(self.lm.config, "initializer_range", 0.02) or 0.02
        for module in self.lm.modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif "Norm" in type(module).__name__:
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            else:
                raise TypeError(f"reinitialise: no initialisation known for trained {type(module).__name__}")

    def encode(self, text: str) -> list[int]:
        return self.lm_spec.encode(text)

    def encode_target(self, prompt: str, target: str) -> list[int]:
        return self.lm_spec.encode_target(prompt, target)

    # --- forward ----------------------------------------------------------------------------------------
    @staticmethod
    def _causal_mask(length: int, ref: torch.Tensor) -> torch.Tensor:
        mask = torch.full((length, length), torch.finfo(ref.dtype).min, device=ref.device, dtype=ref.dtype)
        return mask.triu(1)[None, None]

    def _run(self, h: torch.Tensor, blocks) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = self.lm.model
        pos = torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1)
        emb, mask = model.rotary_emb(h, position_ids=pos), self._causal_mask(h.shape[1], h)
        hidden = []
        for block in blocks:
            h = block(h, attention_mask=mask, position_embeddings=emb, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
            hidden.append(h)
        return model.norm(h), hidden

    @torch.no_grad()
    def _trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():  # cached tensors made in evaluation serve training too
            return self._trunk_cached(input_ids.clone(), attention_mask.clone())

    def _trunk_cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keys = [tuple(row[m.bool()].tolist()) for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        missing = [i for i, k in enumerate(keys) if k not in self.trunk_cache]
        if missing:
            ids = input_ids[missing]
            h = self.lm.model.embed_tokens(ids)
            if self.start:
                h = self._run(h, self.lm.model.layers[: self.start])[1][-1]  # the last trunk block's output, not normed
            for row, i in enumerate(missing):
                self.trunk_cache[keys[i]] = h[row, : len(keys[i])].clone()
        out = input_ids.new_zeros((*input_ids.shape, self.lm.config.hidden_size), dtype=self.lm.dtype)
        for i, k in enumerate(keys):
            out[i, : len(k)] = self.trunk_cache[k]
        return out

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(final normed hidden states [B, T, d], outputs of the trained blocks)``: through the trunk cache when
        enabled, else through the whole model (see :meth:`full_forward`)."""
        if self.lm_spec.model is None:
            raise RuntimeError("SplitCausalLM.build() was not called (recipes call it in configure_model)")
        if not self.cache_trunk:
            return self.full_forward(input_ids, attention_mask)
        h, hidden = self._run(self._trunk(input_ids, attention_mask), self.lm.model.layers[self.start :])
        return h, hidden

    def full_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Every block from the embeddings, no cache (for attacks that change the trunk). The list holds the trained
        blocks' outputs, and the embeddings' output first when every weight is trained (Hugging Face's
        ``hidden_states``)."""
        emb = self.lm.model.embed_tokens(input_ids)
        h, hidden = self._run(emb, self.lm.model.layers)
        return h, ([emb, *hidden] if self.trainable_layers is None else hidden[self.start :])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Next-token logits of (selected) final hidden states."""
        return self.lm.lm_head(h)
