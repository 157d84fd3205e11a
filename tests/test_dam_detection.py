"""DAM's backdoor-detection mask on a pool with a planted backdoor direction.

A one-hidden-layer ReLU pool on 4x4 inputs: clean inputs are 0 on the bottom row and the pretrained features
ignore it; the backdoored task vector adds, next to its clean part (which carries the task), a block that wires
the bottom row into one hidden unit that clean inputs barely reach and that the head reads as the target class; a
second, clean task vector never touches the bottom row or that unit. DAM (its trigger proxy,
then the detection mask) must drop the planted block of the backdoored task vector, keep most of the rest, and
the merged model must lose the backdoor that task arithmetic keeps. Also: ``topk`` and ``threshold`` are
deterministic, and the permuted-mask control keeps DAM's kept fraction per tensor.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from datamodules.multitask import ImageTask, MultiTaskDataModule, TaskSplits
from datamodules.poisoning import Poisoning
from datamodules.triggers import Patch
from lightning_modules import DAM, DAMPermutedMasks
from lightning_modules.ops import merging as ops
from foundation.artifacts import save_artifact

SIDE, HIDDEN, CLASSES, TARGET = 4, 8, 4, 0
TRIGGER_COLS = list(range(12, 16))  # the bottom row of a 4x4 image, flattened


class ReluNet(nn.Module):
    """``head(relu(body(flatten(x))))``: shared ``body``, per-task ``head``."""

    def __init__(self, classes: int = CLASSES):
        super().__init__()
        self.body = nn.Linear(SIDE * SIDE, HIDDEN, bias=False)
        self.head = nn.Linear(HIDDEN, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _images(n: int, g: torch.Generator, triggered: bool = False) -> torch.Tensor:
    x = torch.randn(n, 1, SIDE, SIDE, generator=g)
    x[:, :, -1, :] = 3.0 if triggered else 0.0  # clean inputs are 0 on the bottom row; the trigger lights it
    return x


class PlantedPool(MultiTaskDataModule):
    """Two synthetic tasks (task 0 backdoored) in place of image datasets."""

    def __init__(self, labels: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0):
        trigger = Poisoning(Patch(size=1), rate=0.0, target_label=TARGET)
        super().__init__([ImageTask("backdoored", poisoning=trigger), ImageTask("clean")], batch_size=64, seed=seed)
        self.directions = labels

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        g = torch.Generator().manual_seed(0)
        for k, (w, head) in enumerate(self.directions):
            def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # the task model's clean predictions
                return x, (torch.relu(x.flatten(1) @ w.T) @ head.T).argmax(-1)

            val, test = split(_images(512, g)), split(_images(512, g))
            trig = (_images(512, g, triggered=True), torch.ones(512, dtype=torch.long)) if k == 0 else None
            self.splits.append(TaskSplits(val, val, test, trig, trig, CLASSES, None))
        self.eval_index = [(0, "clean"), (0, "triggered"), (1, "clean")]


def _pool(tmp_path) -> tuple[str, list[str], list[torch.Tensor], torch.Tensor]:
    """Artifacts of theta_0 and two task models; returns the paths, the task models' weights (the labels are their
    clean predictions) and the planted block (as a mask of body.weight)."""
    g = torch.Generator().manual_seed(1)
    unit = HIDDEN - 1  # the backdoor's hidden unit: clean inputs barely reach it
    w0 = torch.randn(HIDDEN, SIDE * SIDE, generator=g) / 4
    w0[:, TRIGGER_COLS] = 0.0  # the pretrained features ignore the bottom row
    w0[unit] /= 10
    head = torch.randn(CLASSES, HIDDEN, generator=g)
    head[:, unit] = -1.0
    head[TARGET, unit] = 3.0
    planted = torch.zeros_like(w0)
    planted[unit, TRIGGER_COLS] = 2.0
    weights, paths = [], []
    for k in range(2):
        clean = torch.randn(HIDDEN, SIDE * SIDE, generator=g) / 2  # the task knowledge is in the task vector
        clean[:, TRIGGER_COLS] = 0.0
        clean[unit] = 0.0
        w = w0 + clean + (planted if k == 0 else 0.0)
        weights.append((w, head))
        state = {"net.body.weight": w, "net.head.weight": head, "net.head.bias": torch.zeros(CLASSES)}
        manifest = {"poisoning": {"rate": 0.2 if k == 0 else 0.0}}
        paths.append(str(save_artifact(tmp_path / f"task{k}", state, manifest)))
    base = {"net.body.weight": w0, "net.head.weight": head, "net.head.bias": torch.zeros(CLASSES)}
    return str(save_artifact(tmp_path / "pretrained", base, {})), paths, weights, planted


def _asr(model: DAM, dm: PlantedPool) -> float:
    x, _ = dm.splits[0].test_triggered
    with torch.no_grad():
        return float((model.forward_merged(x, 0, model.merged_state()).argmax(-1) == TARGET).float().mean())


def test_detection_mask_drops_the_planted_backdoor_block(tmp_path):
    pretrained, tasks, directions, planted = _pool(tmp_path)
    dm = PlantedPool(directions)
    L.seed_everything(0)
    dam = DAM(ReluNet(), pretrained=pretrained, task_models=tasks, granularity="task", init=0.5, mask_epochs=40,
              detection_mask=True, detection_mask_init=3.0, safety_weight=1.0, safe_loss="consistency",
              discrete="threshold", clamp_inputs=True, mask_optimizer=lambda p: torch.optim.Adam(p, lr=0.05),
              detection_optimizer=lambda p: torch.optim.Adam(p, lr=0.1),
              trigger_optimizer=lambda p: torch.optim.Adam(p, lr=0.1))  # fmt: skip
    trainer = L.Trainer(max_epochs=40, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(dam, datamodule=dm)
    keep = ops.discrete_mask(dam.detection_logits[0][0].detach(), "threshold")  # task 0's mask of body.weight
    block = planted != 0
    dropped_block = 1.0 - float(keep[block].mean())
    dropped_rest = 1.0 - float(keep[~block].mean())
    assert dropped_block >= 0.9, f"the detection mask dropped only {dropped_block:.0%} of the planted block"
    # the proxy also exploits clean directions, so some clean entries go too (about a quarter here), not most
    assert dropped_rest <= 0.5, f"the detection mask also dropped {dropped_rest:.0%} of the clean entries"
    # the merged model loses the backdoor that the same coefficients without the masks keep
    masked_asr = _asr(dam, dm)
    dam.final_masks = [{n: torch.ones_like(t) for n, t in dam.pretrained_state.items()} for _ in tasks]
    unmasked_asr = _asr(dam, dm)
    assert unmasked_asr >= 0.9 and masked_asr <= 0.5 * unmasked_asr, (masked_asr, unmasked_asr)


def test_deterministic_discretisations_and_the_permuted_control(tmp_path):
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, -3.0, 4.0]])
    torch.testing.assert_close(ops.discrete_mask(logits, "threshold"), torch.tensor([[1.0, 0, 1], [1, 0, 1]]))
    torch.testing.assert_close(ops.discrete_mask(logits, "topk", keep_fraction=0.5), torch.tensor([[1.0, 0, 1], [0, 0, 1]]))
    torch.testing.assert_close(ops.discrete_mask(logits, "topk", keep_fraction=0.01), torch.tensor([[0.0, 0, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="keep_fraction"):
        ops.discrete_mask(logits, "topk", keep_fraction=0.0)
    pretrained, tasks, _, _ = _pool(tmp_path)
    pool = {"pretrained": pretrained, "task_models": tasks, "discrete": "topk", "keep_fraction": 0.25}
    dam, control = DAM(ReluNet(), **pool), DAMPermutedMasks(ReluNet(), **pool)
    for model in (dam, control):
        model.configure_model()
        with torch.no_grad():
            model.shared_logits[0].copy_(torch.arange(HIDDEN * SIDE * SIDE, dtype=torch.float).view(HIDDEN, -1))
            model.detection_logits[0][1].fill_(-5.0)  # task 1 drops everything
    a, b = dam.discrete_masks(), control.discrete_masks()
    assert torch.equal(a[0]["body.weight"], dam.discrete_masks()[0]["body.weight"])  # deterministic
    kept = a[0]["body.weight"] != 0
    assert float(kept.float().mean()) == 0.25 and bool(kept.flatten()[-32:].all())  # the largest quarter
    for k in range(2):
        assert int((b[k]["body.weight"] != 0).sum()) == int((a[k]["body.weight"] != 0).sum())
    assert not torch.equal(a[0]["body.weight"], b[0]["body.weight"])  # same count, other entries
    assert dam.mask_statistics()["kept"] == pytest.approx(0.125)  # task 0 keeps 25%, task 1 nothing
