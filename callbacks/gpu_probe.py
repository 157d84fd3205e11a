"""What :mod:`recipes.gpu_check` measures in a run: a Lightning callback that asserts device placement and precision
and times the training steps.

* Placement: every parameter, buffer and tensor held in a module attribute (lists and dicts of tensors included, e.g.
  a merge's task vectors) is on the strategy's root device when training starts, and so is every tensor of every
  training batch. During the first step a ``TorchDispatchMode`` sees every operator: a matmul or convolution whose
  output is on another device (silent CPU compute) is an error; host/device copies are counted.
* Precision: forward hooks on every ``Linear``/``Conv``/``Embedding`` record their output dtype and whether autocast
  was on; the verdict compares them with ``trainer.precision`` (``*-mixed``: autocast on and low-precision matmul
  outputs; ``*-true``: autocast off and trained parameters in that dtype, except where the config itself declares a
  lower ``dtype`` for a network).
* Speed and memory: wall time of each training step after the first (CUDA synchronised), samples per step from the
  batch, peak allocated and reserved GPU memory from ``setup`` (before the model is built) to the end of fit, the
  process's peak host RSS, and the number of FSDP units (1 means the whole model is gathered at once).
"""

from __future__ import annotations

import resource
import time
from collections import Counter

import lightning as L
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution", "cudnn_convolution",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", "mkldnn_convolution",
           "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention"}  # fmt: skip
LOW = {"bf16": torch.bfloat16, "16": torch.float16}
NO_MATMUL = "n/a: no matmul in the training steps"  # fixed merge rules: the work is done before training
HOOKED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def precision_dtype(precision: str) -> torch.dtype:
    """The compute dtype that a Lightning precision string names (``bf16-mixed`` -> bfloat16, ``32-true`` -> float32)."""
    head = str(precision).split("-")[0]
    return LOW.get(head, torch.float64 if head == "64" else torch.float32)


def tensors_in(obj, path: str, depth: int = 3):
    """``(path, tensor)`` for every tensor in ``obj`` and its lists, tuples and dicts, ``depth`` levels down."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, nn.Module) and path.endswith("]"):  # a module kept in a plain list or dict
        for name, tensor in [*obj.named_parameters(), *obj.named_buffers()]:
            yield f"{path}.{name}", tensor
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from tensors_in(item, f"{path}[{i}]", depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for key, item in obj.items():
            yield from tensors_in(item, f"{path}[{key!r}]", depth - 1)


def module_tensors(module: nn.Module):
    """Parameters, buffers and tensors in plain attributes of every submodule (e.g. a list of task vectors)."""
    yield from module.named_parameters()
    yield from module.named_buffers()
    for prefix, sub in module.named_modules():
        for name, value in vars(sub).items():
            if name.startswith("_") or isinstance(value, nn.Module):
                continue
            yield from tensors_in(value, f"{prefix}.{name}" if prefix else name)


class DeviceScan(TorchDispatchMode):
    """Records, per operator, outputs that are not on ``device``, matmul output dtypes and bytes copied across
    devices."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.off_device: Counter = Counter()  # op name -> elements produced on another device
        self.off_matmuls: Counter = Counter()
        self.matmul_dtypes: Counter = Counter()
        self.copied_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for t in outs:
            if t.device.type not in (self.device.type, "meta"):
                self.off_device[name] += t.numel()
                if name in MATMULS:
                    self.off_matmuls[name] += 1
        if name in MATMULS and outs:
            self.matmul_dtypes[str(outs[0].dtype).removeprefix("torch.")] += 1
        if name in ("_to_copy", "copy_", "to"):
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            if ins and outs and ins[0].device.type != outs[0].device.type:
                self.copied_bytes += outs[0].numel() * outs[0].element_size()
        return out


def batch_size_of(batch) -> int | None:
    """Samples in a batch: the first dimension of its first tensor, or the length of a list of records."""
    leaves = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if leaves:
        return int(leaves[0].shape[0]) if leaves[0].dim() else None
    return len(batch) if isinstance(batch, (list, tuple)) else None


class Probe(L.Callback):
    """Collects the measurements of one check; :meth:`summary` returns them as one table row."""

    def __init__(self, scan: bool = True, max_batches: int | None = None):
        self.scan_enabled, self.max_batches = scan, max_batches
        self.problems: list[str] = []
        self.step_seconds: list[float] = []
        self.samples: list[int] = []
        self.hook_records: Counter = Counter()  # (dtype, autocast) -> calls
        self.hooks: list = []
        self.scan: DeviceScan | None = None
        self.scan_result: DeviceScan | None = None
        self.fsdp_units = 0
        self.param_dtypes: Counter = Counter()  # dtype -> trained elements
        self.params = 0
        self.device = torch.device("cpu")
        self.steps = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _problem(self, text: str) -> None:
        if text not in self.problems:
            self.problems.append(text)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.device = trainer.strategy.root_device
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_train_start(self, trainer, pl_module) -> None:
        off = [f"{n} ({t.device})" for n, t in module_tensors(pl_module) if t.device.type != self.device.type]
        if off:
            self._problem(f"{len(off)} module tensors off {self.device.type}: {', '.join(off[:3])}")
        self.params = sum(p.numel() for p in pl_module.parameters())
        for p in pl_module.parameters():
            if p.requires_grad:
                self.param_dtypes[str(p.dtype).removeprefix("torch.")] += p.numel()
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            self.fsdp_units = sum(isinstance(m, FSDP) for m in trainer.strategy.model.modules())
        except ImportError:  # pragma: no cover - torch without distributed
            self.fsdp_units = 0
        if type(trainer.strategy).__name__ == "FSDPStrategy" and self.fsdp_units <= 1:
            self._problem("FSDP wrapped the whole model as one unit (no auto_wrap_policy): every rank gathers all "
                          "parameters at once; set the strategy's auto_wrap_policy to the decoder layer class")
        records = self.hook_records

        def record(module, inputs, output) -> None:  # a closure, not a bound method: a deepcopy of the module
            if isinstance(output, torch.Tensor) and output.is_floating_point():  # (a client model) shares it
                dtype = str(output.dtype).removeprefix("torch.")
                records[(dtype, torch.is_autocast_enabled(output.device.type))] += 1

        for module in pl_module.modules():
            if isinstance(module, HOOKED):
                self.hooks.append(module.register_forward_hook(record))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        off = [p for p, t in tensors_in(batch, "batch", 4) if t.device.type != self.device.type]
        if off:
            self._problem(f"batch tensors off {self.device.type}: {', '.join(off[:3])}")
        self._sync()
        if self.steps == 0 and self.scan_enabled:
            self.scan = DeviceScan(self.device)
            self.scan.__enter__()
        self._start = time.perf_counter()
        self._batch = batch_size_of(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sync()
        seconds = time.perf_counter() - self._start
        if self.scan is not None:
            self.scan.__exit__(None, None, None)
            self.scan_result, self.scan = self.scan, None
        self.step_seconds.append(seconds)
        self.samples.append(self._batch or 0)
        self.steps += 1
        if self.max_batches is not None and self.steps >= self.max_batches:
            trainer.should_stop = True  # max_steps counts optimizer steps: recipes without an optimizer never reach it

    def on_train_end(self, trainer, pl_module) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.scan is not None:
            self.scan.__exit__(None, None, None)
            self.scan = None
        self.on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------------------------------- verdicts
    def precision_verdict(self, precision: str, declared: set[str]) -> str:
        """``ok`` or what differs from ``precision``; ``declared``: dtypes the config sets on its networks (``dtype``,
        ``compute_dtype``), which the trainer's precision does not override. Evidence: layer outputs with the autocast
        state (forward hooks) and the dtypes of every matmul of the first step, forward and backward (the scan)."""
        want = str(precision_dtype(precision)).removeprefix("torch.")
        matmuls = set(self.scan_result.matmul_dtypes) if self.scan_result is not None else set()
        outputs = {dtype for dtype, _ in self.hook_records}
        autocast = any(on for _, on in self.hook_records)
        if not matmuls and not outputs:
            return NO_MATMUL
        if str(precision).endswith("mixed"):
            if want not in matmuls | outputs:
                return f"{precision} but no {want} matmul (matmuls {sorted(matmuls)}, layer outputs {sorted(outputs)})"
            return "ok"
        if autocast:
            return f"{precision} but autocast is on in training"
        allowed = {want, "float64"} | declared
        if (matmuls | outputs) - allowed:
            return f"{precision} but matmuls in {sorted((matmuls | outputs) - allowed)}"
        if set(self.param_dtypes) - allowed:
            return f"{precision} but trained parameters are {sorted(self.param_dtypes)}"
        return "ok"

    def summary(self, precision: str, declared: set[str]) -> dict:
        timed = self.step_seconds[1:] or self.step_seconds
        samples = self.samples[1:] or self.samples
        seconds = sum(timed)
        row = {
            "steps": len(self.step_seconds),
            "steps_per_s": len(timed) / seconds if seconds > 0 else None,
            "samples_per_s": sum(samples) / seconds if seconds > 0 and all(samples) else None,
            "first_step_s": self.step_seconds[0] if self.step_seconds else None,
            "precision": str(precision),
            "precision_ok": self.precision_verdict(precision, declared),
            "params_m": self.params / 1e6,
            "trained_params_m": sum(self.param_dtypes.values()) / 1e6,
            "param_dtypes": dict(self.param_dtypes),
            "layer_outputs": sorted({f"{d}{'+autocast' if a else ''}" for d, a in self.hook_records}),
            "fsdp_units": self.fsdp_units,
            "host_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if self.device.type == "cuda":
            row["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            row["gpu_reserved_gb"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        scan = self.scan_result
        if scan is not None:
            row["matmul_dtypes"] = dict(scan.matmul_dtypes)
            row["copied_mb_step0"] = scan.copied_bytes / 2**20
            row["off_device_ops"] = dict(scan.off_device.most_common(5))
            if scan.off_matmuls:
                self._problem(f"matmuls on the wrong device: {dict(scan.off_matmuls)}")
        if not self.step_seconds:
            self._problem("no training step ran")
        row["problems"] = list(self.problems)
        return row
