"""FSDP auto-wrap per transformer block of the Hugging Face models built in ``configure_model``.

Without an auto-wrap policy ``FSDPStrategy`` makes the whole model one FSDP unit: every rank gathers all parameters
for the forward pass, so nothing is saved over DDP. The usual policy wraps each transformer block (Llama's
``LlamaDecoderLayer``, BERT/MiniLM's ``BertLayer``, CLIP's ``CLIPEncoderLayer``, ...) in its own unit, so a rank
holds one block's full parameters at a time. The same policy, given to ``activation_checkpointing_policy``, wraps
each block in a checkpoint wrapper: its activations are recomputed in the backward pass instead of stored.

The classes are not listed by hand: Hugging Face models name the modules that must stay whole on one device in
``PreTrainedModel._no_split_modules``; the blocks are those of these classes that are the items of an
``nn.ModuleList`` (embeddings, also listed there, are left in the parent unit: Llama/SmolLM2 tie them to the LM head,
and FSDP1 needs tied parameters in one unit). Models are built in ``configure_model``, after the strategy exists, so
the policy finds the classes while FSDP walks the model (top-down, the ``recurse=True`` calls), not at construction.

Use in a config (``configs/trainer/fsdp.yaml``)::

    strategy:
      class_path: lightning.pytorch.strategies.FSDPStrategy
      init_args:
        auto_wrap_policy: {class_path: lightning_modules.nets.fsdp.TransformerBlockPolicy}
        activation_checkpointing_policy: {class_path: lightning_modules.nets.fsdp.TransformerBlockPolicy}
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


class TransformerBlockPolicy:
    """An FSDP auto-wrap policy (``torch.distributed.fsdp.wrap._recursive_wrap``'s callable form): wrap each block.

    Args:
        block_names: Class names to wrap in addition to the blocks found in Hugging Face models (for other
            models, e.g. ``["MyBlock"]``).
    """

    def __init__(self, block_names: Optional[list[str]] = None) -> None:
        self.block_names: set[str] = set(block_names or [])

    def find_blocks(self, module: nn.Module) -> set[str]:
        """Adds the block classes of every Hugging Face model inside ``module`` to :attr:`block_names`."""
        for sub in module.modules():
            no_split = set(getattr(sub, "_no_split_modules", None) or [])
            if not no_split:
                continue
            for child in sub.modules():
                if not isinstance(child, nn.ModuleList):
                    continue
                for item in child:  # the outermost listed class: an item may already be wrapped (FSDP, checkpoint)
                    name = next((type(m).__name__ for m in item.modules() if type(m).__name__ in no_split), None)
                    if name is not None:
                        self.block_names.add(name)
        return self.block_names

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        """``recurse=True``: descend into ``module`` (and learn its blocks); ``recurse=False``: wrap it if a block."""
        if recurse:
            if getattr(module, "_no_split_modules", None):
                self.find_blocks(module)
            return True
        return type(module).__name__ in self.block_names


class FlatParamFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` with FSDP1's ``use_orig_params`` as a typed argument (Lightning sets it to ``True``
    unless told otherwise, and a config cannot reach its ``**kwargs``). With ``False`` the optimizers hold each unit's
    flat parameter, as TAR's official runs need (``rishub-tamirisa/tamper-resistance@19de233``, README: "For
    running TAR with FSDP v1, it's important that `fsdp_use_orig_params=false` and `fsdp_sharding_strategy=1`");
    a recipe then builds its optimizers over ``self.trainer.model.parameters()`` (``Safeguard.trained_parameters``).
    Every parameter of one unit must then share ``requires_grad``: train every weight, or wrap so that frozen and
    trained weights never share a unit.

    Args:
        use_orig_params: FSDP1's ``use_orig_params`` (``False``: flat parameters in the optimizers).

    The arguments of ``lightning.pytorch.strategies.FSDPStrategy`` pass through.
    """

    def __init__(self, use_orig_params: bool = False, **kwargs):
        super().__init__(use_orig_params=use_orig_params, **kwargs)
