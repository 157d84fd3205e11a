"""CLIP's image tower as a classifier for the merge pool (Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision", ICML 2021), the backbone of task arithmetic (Ilharco et al., ICLR 2023), TIES,
AdaMerging and DAM (ViT-B/32 on 8 image tasks).

The network is transformers' ``CLIPVisionModelWithProjection`` (the vision transformer and its visual projection)
and a linear head on the L2-normalised image embedding, so ``features(x)`` is what CLIP's zero-shot heads read and
``head`` is the per-task classifier that :class:`~lightning_modules.merging.MergeRecipe` keeps apart from the merged
shared weights. As in the merging papers, the head can be CLIP's zero-shot head (the class names' prompt embeddings
from the text tower, :func:`~lightning_modules.ops.clip_heads.zero_shot_head`) and frozen during fine-tuning. Like
:class:`~lightning_modules.nets.hf.HFSequenceClassifier`, the network is built from a small spec in
:meth:`CLIPImageClassifier.build`, which recipes call from ``configure_model``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from foundation.image_store import read_meta
from lightning_modules.nets.hf import load_hf_model
from lightning_modules.ops.clip_heads import random_unit_head, zero_shot_head
from foundation import assets


class FrozenLinear(nn.Module):
    """A linear layer whose ``weight`` and ``bias`` are buffers: saved, loaded and merged around like
    ``nn.Linear``'s (same state-dict keys), never trained (the papers' frozen zero-shot head)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class CLIPImageClassifier(nn.Module):
    """CLIP vision tower + visual projection + linear head on the unit-norm image embedding.

    Heads (``head_init``): ``zero_shot`` builds CLIP's zero-shot head from ``class_names`` and ``templates`` with the
    checkpoint's text tower (the merging papers' head; the text tower is dropped afterwards); ``random`` draws unit
    class directions at the same scale (no text tower needed; at lr 1e-5 it moves little). ``freeze_head`` keeps
    the head fixed during fine-tuning, as the papers do. Keys: ``vision.*`` (shared, merged) and ``head.*`` (per
    task; ``head_prefix: head.``).

    Args:
        num_classes: classes of the task's head.
        model_name_or_path: hub id (``openai/clip-vit-base-patch32``) or local directory of a CLIP checkpoint,
            loaded from safetensors; ``None`` with ``vision_config``.
        vision_config: ``CLIPVisionConfig`` fields for a randomly initialised tower instead (e.g. ``{hidden_size: 32,
            intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, image_size: 32, patch_size: 8,
            projection_dim: 16}``); only with ``head_init: random``.
        head_init: ``zero_shot`` (text embeddings of the class prompts) or ``random`` (random unit directions).
        class_names: the classes in label order, or the directory of an exported dataset (its ``meta.json``
            names them); needed by ``zero_shot``. Underscores become spaces.
        templates: prompt templates with one ``{}`` for the class name, averaged per class (CLIP's prompt
            ensembling; the task-arithmetic code has dataset-specific template lists).
        freeze_head: keep the head fixed (stored as buffers), as the papers' fine-tuning does.
        logit_scale: norm of each head row, i.e. the logits' temperature (CLIP ViT-B/32's trained scale: 100).
        dtype: parameter dtype of the tower.
    """

    def __init__(
        self,
        num_classes: int = 10,
        model_name_or_path: str | None = "openai/clip-vit-base-patch32",
        vision_config: dict | None = None,
        head_init: Literal["zero_shot", "random"] = "random",
        class_names: list[str] | str | None = None,
        templates: list[str] = ("a photo of a {}.",),
        freeze_head: bool = False,
        logit_scale: float = 100.0,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    ):
        super().__init__()
        if (model_name_or_path is None) == (vision_config is None):
            raise ValueError("give exactly one of model_name_or_path (pretrained CLIP) and vision_config (random "
                             "init); set model_name_or_path: null to use vision_config")  # fmt: skip
        if num_classes < 1 or logit_scale <= 0:
            raise ValueError(f"need num_classes >= 1 and logit_scale > 0, got {num_classes}, {logit_scale}")
        if head_init == "zero_shot" and (model_name_or_path is None or class_names is None):
            raise ValueError("head_init: zero_shot needs a CLIP checkpoint (model_name_or_path) with its text tower "
                             "and class_names (a list or an exported dataset directory)")  # fmt: skip
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"every template needs exactly one '{{}}' for the class name, got {list(templates)}")
        self.num_classes, self.model_name_or_path = num_classes, model_name_or_path
        self.vision_config, self.head_init, self.class_names = dict(vision_config or {}), head_init, class_names
        self.templates, self.freeze_head = list(templates), freeze_head
        self.logit_scale, self.dtype = float(logit_scale), dtype
        self.vision: nn.Module | None = None
        self.head: nn.Module | None = None

    def build(self) -> None:
        """Load (or initialise) the tower and create the head; idempotent."""
        if self.vision is not None:
            return
        from transformers import (
            AutoConfig,
            CLIPVisionConfig,
            CLIPVisionModelWithProjection,
        )
        from transformers.utils import logging as hf_logging

        dtype = getattr(torch, self.dtype)
        if self.model_name_or_path is None:
            tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**self.vision_config)).to(dtype)
        else:
            path = assets.resolve(self.model_name_or_path)
            config = AutoConfig.from_pretrained(path)
            if config.model_type == "clip":  # a full CLIP checkpoint: its projection size is a top-level field
                config.vision_config.projection_dim = config.projection_dim
                config = config.vision_config
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # the text tower's weights are unused here, not worth a report
            try:
                tower = load_hf_model(CLIPVisionModelWithProjection, path, config, dtype=dtype)
            finally:
                hf_logging.set_verbosity(verbosity)
        self.vision = tower.train()  # from_pretrained returns eval mode; Lightning manages train/eval
        dim = tower.config.projection_dim
        if self.head_init == "zero_shot":
            weight = self.zero_shot_weights(path)
        else:
            weight = random_unit_head(self.num_classes, dim, self.logit_scale)
        bias = torch.zeros(self.num_classes)
        if self.freeze_head:
            self.head = FrozenLinear(weight, bias)
        else:
            self.head = nn.Linear(dim, self.num_classes)
            with torch.no_grad():
                self.head.weight.copy_(weight)
                self.head.bias.copy_(bias)

    def names(self) -> list[str]:
        """The class names in label order (from the list or the exported dataset's ``meta.json``)."""
        names = read_meta(self.class_names)["class_names"] if isinstance(self.class_names, str) else self.class_names
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for a {self.num_classes}-class head: check class_names and "
                             "num_classes")  # fmt: skip
        return [str(n).replace("_", " ") for n in names]

    @torch.no_grad()
    def zero_shot_weights(self, path: str, batch_size: int = 256) -> torch.Tensor:
        """CLIP's zero-shot head ``[C, D]`` for :meth:`names` and ``templates`` from the checkpoint's text tower."""
        from transformers import AutoTokenizer, CLIPModel

        model, tokenizer = load_hf_model(CLIPModel, path, None).eval(), AutoTokenizer.from_pretrained(path)
        prompts = [t.format(name) for name in self.names() for t in self.templates]
        embeds = []
        for start in range(0, len(prompts), batch_size):
            tokens = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            out = model.get_text_features(**tokens)
            embeds.append(out if isinstance(out, torch.Tensor) else out.pooler_output)  # transformers 5: an output
        text = torch.cat(embeds).view(self.num_classes, len(self.templates), -1)
        return zero_shot_head(text, self.logit_scale)

    @property
    def image_size(self) -> int:
        """Input side the tower expects (224 for ViT-B/32)."""
        if self.vision is None:
            raise RuntimeError("CLIPImageClassifier.build() was not called (recipes call it in configure_model)")
        return self.vision.config.image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised CLIP image embedding of normalised pixels ``x`` (``[N, 3, S, S]``)."""
        if self.vision is None:
            raise RuntimeError("CLIPImageClassifier.build() was not called (recipes call it in configure_model)")
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[-1] != self.image_size:
            raise ValueError(f"CLIP expects images [N, 3, {self.image_size}, {self.image_size}], got {tuple(x.shape)}: "
                             "set the DataModule's image_size to the tower's")  # fmt: skip
        embeds = self.vision(pixel_values=x.to(self.vision.dtype)).image_embeds
        return F.normalize(embeds.float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
