"""Hugging Face backbones as sequence classifiers, built from a small spec (optionally with LoRA via peft).

The spec is light (a name, a dtype, a LoRA config); the weights are loaded in :meth:`HFSequenceClassifier.build`,
which recipes call from ``configure_model`` so FSDP and meta-device initialisation work on clusters.
Offline asset names (``minilm-l6``, ``smollm2-135m``) resolve to local directories; anything else is passed
to ``from_pretrained`` as a local path or hub id.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from peft import LoraConfig
from torch import nn

from foundation import assets


def load_hf_model(auto_cls, path: str, config, random_init: bool = False, dtype: torch.dtype = torch.float32,
                  **kwargs) -> nn.Module:
    """``auto_cls`` (a ``transformers`` Auto class or model class) with random weights from ``config``, or loaded
    from ``path`` (a local directory or hub id) with that config.

    Only safetensors weights are read: this project handles untrusted weights, and a pickled ``pytorch_model.bin``
    can run code when it is unpickled. A checkpoint without safetensors is refused with the conversion to run."""
    if random_init:
        return auto_cls.from_config(config, **kwargs).to(dtype)
    try:
        return auto_cls.from_pretrained(path, config=config, dtype=dtype, use_safetensors=True, **kwargs)
    except OSError as err:
        if "safetensors" not in str(err):
            raise
        raise ValueError(
            f"{path} has no safetensors weights, and pickled checkpoints are not loaded (they can run code). Convert "
            f"it once in a trusted environment: AutoModel.from_pretrained(path).save_pretrained(out, "
            f"safe_serialization=True), then point the config at out"
        ) from err


class LoraSpec:
    """LoRA adapter settings (Hu et al., 2021), turned into a ``peft.LoraConfig``. New configs give
    ``peft.LoraConfig`` itself (``class_path: peft.LoraConfig``, peft's field names: ``lora_alpha``,
    ``lora_dropout``, ...); this wrapper stays for the configs and recipes that still use it.

    Args:
        r: rank of the update.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt (``None``: peft's default for the architecture, e.g.
            ``query``/``value`` for BERT and ``q_proj``/``v_proj`` for Llama).
        modules_to_save: modules trained in full beside the adapters (``None``: peft adds the
            classification head for sequence classification).
    """

    def __init__(
        self,
        r: int = 8,
        alpha: int = 16,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        modules_to_save: list[str] | None = None,
    ):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules, self.modules_to_save = target_modules, modules_to_save

    def to_peft(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            modules_to_save=self.modules_to_save,
        )


class HFModel(nn.Module):
    """A Hugging Face model described by a small spec and built on demand: the one lazy-building base of the
    Hugging Face nets. The spec is light (a name, a dtype, config overrides), so a recipe can be instantiated on
    any device; :meth:`build` (called from the recipe's ``configure_model``, so FSDP and meta-device
    initialisation work) loads the weights once, and :meth:`built` is the "not built yet" guard.

    A subclass implements :meth:`load` (return the model; :meth:`hf_config` and :attr:`path` help) and forwards
    ``**kwargs`` to ``super().__init__``, declaring only what it adds.

    Args:
        pretrained: asset name (``minilm-l6``, ``smollm2-135m``), local directory or hub id.
        random_init: build the architecture from its config with random weights (tests, from-scratch runs).
        config_overrides: config fields to override, e.g. ``{num_hidden_layers: 2, hidden_size: 32}`` for a
            tiny test twin (only with ``random_init``).
        dtype: parameter dtype.
    """

    def __init__(
        self,
        pretrained: str,
        random_init: bool = False,
        config_overrides: dict | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    ):
        super().__init__()
        if config_overrides and not random_init:
            raise ValueError("config_overrides change the architecture; they need random_init: true")
        self.pretrained, self.random_init = pretrained, random_init
        self.config_overrides, self.dtype = dict(config_overrides or {}), dtype
        self.model: nn.Module | None = None

    @property
    def path(self) -> str:
        """``pretrained`` resolved to a local directory (offline assets) or passed through."""
        return assets.resolve(self.pretrained)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def hf_config(self, **fields):
        """The model's ``transformers`` config with ``config_overrides`` and ``fields`` applied."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path, **fields, **self.config_overrides)

    def load(self) -> nn.Module:
        """Create the model (weights read by :func:`load_hf_model`: safetensors only)."""
        raise NotImplementedError(f"{type(self).__name__} must define load()")

    def build(self) -> None:
        """Load (or initialise) the model once; idempotent."""
        if self.model is None:
            self.model = self.load()

    def built(self) -> nn.Module:
        """The built model, or a clear error if :meth:`build` was not called."""
        if self.model is None:
            raise RuntimeError(f"{type(self).__name__}.build() was not called (recipes call it in configure_model)")
        return self.model


class HFSequenceClassifier(HFModel):
    """An encoder (BERT/MiniLM) or decoder (Llama/SmolLM2) with a sequence classification head.

    Decoders classify from the last non-padding token (transformers' ``*ForSequenceClassification`` finds it
    from ``pad_token_id``, which is set from the tokenizer), so left and right padding both work.

    Args:
        pretrained: asset name (``minilm-l6``, ``smollm2-135m``), local directory or hub id.
        num_labels: classes of the new head.
        lora: LoRA adapters, a ``peft.LoraConfig`` (its ``task_type`` defaults to ``SEQ_CLS``, so peft trains the
            new head in full) or a :class:`LoraSpec`; ``None`` fine-tunes every weight.

    The spec arguments of :class:`HFModel` (``random_init``, ``config_overrides``, ``dtype``) pass through.
    """

    def __init__(
        self, pretrained: str = "minilm-l6", num_labels: int = 2, lora: LoraConfig | LoraSpec | None = None, **kwargs
    ):
        super().__init__(pretrained=pretrained, **kwargs)
        self.num_labels, self.lora = num_labels, lora

    def load(self) -> nn.Module:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path)
        config = self.hf_config(num_labels=self.num_labels)
        config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model = load_hf_model(AutoModelForSequenceClassification, self.path, config, self.random_init,
                              self.torch_dtype)  # fmt: skip
        if self.lora is not None:
            from peft import TaskType, get_peft_model

            lora = self.lora.to_peft() if isinstance(self.lora, LoraSpec) else self.lora
            if lora.task_type is None:
                lora = dataclasses.replace(lora, task_type=TaskType.SEQ_CLS)
            model = get_peft_model(model, lora)
        return model.train()  # from_pretrained returns eval mode; Lightning manages train/eval

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.built()(input_ids=input_ids, attention_mask=attention_mask).logits
