"""A Hugging Face causal language model built from a small spec (weights loaded in :meth:`CausalLM.build`)."""

from __future__ import annotations

import hashlib
import json
import torch
from torch import nn

from lightning_modules.nets.hf import HFModel, load_hf_model


class CausalLM(HFModel):
    """Any ``AutoModelForCausalLM`` (Llama/SmolLM2, GPT-2, Qwen, ...) plus its tokenizer.

    Recipes call :meth:`build` from ``configure_model``; the weights are read from safetensors only. Parameters
    are frozen (editing writes weights in closed form, it never back-propagates into them).

    Args:
        pretrained: asset name (``smollm2-135m``), local directory or hub id; also names the tokenizer.
        attn_implementation: transformers' attention kernel (``eager``, ``sdpa``, ...; ``None``: its default).
            Editing runs many short sequences with gradients, where ``eager`` is the fastest on CPU.
        bos_token: a token prepended to every text the recipe encodes when the tokenizer adds none, so no
            subject sits at position 0, where Llama-style models put their attention sink (SmolLM2:
            ``<|endoftext|>``, its document separator). ``None``: the tokenizer's own behaviour.

    The spec arguments of :class:`~lightning_modules.nets.hf.HFModel` pass through (``random_init``,
    ``config_overrides``; ``dtype``: edits are small changes of large weights, so keep float32 and choose a
    lower-precision *compute* dtype in the recipe instead).
    """

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        attn_implementation: str | None = None,
        bos_token: str | None = None,
        **kwargs,
    ):
        super().__init__(pretrained=pretrained, **kwargs)
        self.attn_implementation, self.bos_token = attn_implementation, bos_token
        self.tokenizer = None
        self.bos_id: int | None = None

    def load(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        attn = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        model = load_hf_model(AutoModelForCausalLM, self.path, self.hf_config(), self.random_init, self.torch_dtype,
                              **attn)  # fmt: skip
        model.requires_grad_(False)
        self.tokenizer = tok
        self.bos_id = None
        if self.bos_token is not None:
            self.bos_id = tok.convert_tokens_to_ids(self.bos_token)
            if self.bos_id is None or tok.convert_ids_to_tokens(self.bos_id) != self.bos_token:
                raise ValueError(f"bos_token {self.bos_token!r} is not a token of {self.pretrained}")
        return model.eval()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's special tokens, and ``bos_token`` first if configured."""
        ids = self.tokenizer(text)["input_ids"]
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def encode_target(self, prompt: str, target: str) -> list[int]:
        """Target tokens as they follow the prompt (``prompt + " " + target`` minus the prompt's tokens, so the
        tokenizer's merges at the boundary are the ones the model sees)."""
        p, full = self.encode(prompt), self.encode(prompt + " " + target)
        if full[: len(p)] == p and len(full) > len(p):
            return full[len(p):]
        return self.tokenizer(" " + target, add_special_tokens=False)["input_ids"]

    def subject_last(self, template: str, subject: str) -> int:
        """Index of the subject's last token in ``template.format(subject)`` (MEMIT's ``subject_last``)."""
        return len(self.encode(template[: template.index("{}")] + subject)) - 1

    def pad(self, seqs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of token lists padded on the right (or left), on the model's device."""
        width = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, sl], mask[i, sl] = torch.tensor(s, dtype=torch.long), 1
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    @staticmethod
    def batches(lengths: list[int], token_budget: int) -> list[list[int]]:
        """Index groups, sorted by length, whose padded size stays within ``token_budget`` tokens."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        groups, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * lengths[i] > token_budget:
                groups.append(cur)
                cur = []
            cur.append(i)
        return groups + ([cur] if cur else [])

    def fingerprint(self) -> str:
        """sha256 of the architecture and every parameter's bytes (first 16 hex digits): the cache key of
        statistics computed from this model."""
        config = {k: v for k, v in self.model.config.to_dict().items() if k != "_name_or_path"}
        h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, p in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def forward(self, *args, **kwargs):
        return self.built()(*args, **kwargs)
