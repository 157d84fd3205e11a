"""Learning-rate schedules of federated training as pure functions of the epoch or round (no optimizer state).

:func:`multistep_lr` is ``torch.optim.lr_scheduler.MultiStepLR`` in closed form, with both of the ways a training
loop can call ``scheduler.step()``; :func:`piecewise_linear` is a schedule over rounds given by knots (the benign
clients' lr of Chameleon's official code, a linear warm-up and a linear decay, is three knots).
"""

from __future__ import annotations

from collections.abc import Sequence


def multistep_lr(
    base_lr: float, epoch: int, milestones: Sequence[int], gamma: float, step_at_epoch_start: bool = False
) -> float:
    """The learning rate of local epoch ``epoch`` (0-based) under ``MultiStepLR(milestones, gamma)``.

    ``step_at_epoch_start=False`` is torch's documented use, ``scheduler.step()`` after each epoch: a milestone
    ``m`` counts completed epochs, so epoch ``e`` runs at ``base_lr * gamma ** #{m <= e}`` (milestones [3, 5] over 5
    epochs: 1, 1, 1, γ, γ). ``True`` is Chameleon's official code, which steps before each epoch
    (ybdai7/Chameleon-durable-backdoor@c74618a, training.py: ``for internal_epoch in range(1, retrain_no_times + 1):``
    / ``if step_lr:`` / ``scheduler.step()``, then the batches), so ``m`` counts started epochs and epoch ``e`` runs
    at ``base_lr * gamma ** #{m <= e + 1}`` (milestones [3, 5]: 1, 1, γ, γ, γ²), one epoch earlier.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    counted = epoch + 1 if step_at_epoch_start else epoch
    return base_lr * gamma ** sum(m <= counted for m in milestones)


def piecewise_linear(x: float, knots: Sequence[Sequence[float]]) -> float:
    """Linear interpolation through ``knots`` ``[(x0, y0), (x1, y1), ...]`` (``x`` increasing), constant beyond
    the first and the last knot. A repeated ``x`` makes a step (the value of the later knot holds from there)."""
    if not knots:
        raise ValueError("piecewise_linear needs at least one knot")
    xs = [float(k[0]) for k in knots]
    if any(b < a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"knots must be sorted by x, got {xs}")
    if x <= xs[0]:
        return float(knots[0][1])
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        if x < x1:
            return float(y0) + (float(y1) - float(y0)) * (x - x0) / (x1 - x0)
    return float(knots[-1][1])
