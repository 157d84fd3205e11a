"""Aggregators: thin, configurable wrappers of the pure rules in :mod:`lightning_modules.ops.aggregation`."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_modules.ops import aggregation as agg_ops


class Aggregator:
    """Server aggregation rule over client updates ``[n, d]``; thin wrappers of :mod:`lightning_modules.ops.aggregation`."""

    def check(self, num_clients_per_round: int) -> None:
        """Raise ``ValueError`` if the rule cannot work with this many clients per round."""

    def aggregate(
        self, updates: Tensor, weights: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Return the aggregate ``[d]`` and diagnostics; ``"admitted"`` holds the rows used (default: all)."""
        raise NotImplementedError


class FedAvg(Aggregator):
    """Federated averaging (McMahan et al. 2017).

    Args:
        weighted: weight clients by their number of samples; otherwise a plain mean.
    """

    def __init__(self, weighted: bool = True):
        self.weighted = weighted

    def aggregate(self, updates, weights, generator=None):
        return agg_ops.fedavg(updates, weights if self.weighted else None), {}


class NormClipping(FedAvg):
    """Norm bounding and weak differential privacy (Sun et al., "Can You Really Backdoor Federated Learning?",
    2019): each update is scaled into the L2 ball of radius ``max_norm``, then averaged, then Gaussian noise is
    added.

    Args:
        max_norm: clipping bound M.
        noise_std: std of the Gaussian noise added to the aggregate (0: no noise).

    ``weighted`` (weight clients by their number of samples) passes through to :class:`FedAvg`.
    """

    def __init__(self, max_norm: float = 3.0, noise_std: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.max_norm, self.noise_std = max_norm, noise_std

    def aggregate(self, updates, weights, generator=None):
        clipped, norms = agg_ops.clip_by_norm(updates, self.max_norm)
        out, _ = super().aggregate(clipped, weights)
        if self.noise_std > 0:
            out = agg_ops.add_gaussian_noise(out, self.noise_std, generator)
        return out, {"clipped": (norms > self.max_norm).float().mean()}


class Median(Aggregator):
    """Coordinate-wise median (Yin et al., ICML 2018)."""

    def aggregate(self, updates, weights, generator=None):
        return agg_ops.coordinate_median(updates), {}


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Args:
        trim_ratio: fraction of values cut from each end per coordinate, in ``[0, 0.5)``.
    """

    def __init__(self, trim_ratio: float = 0.1):
        if not 0.0 <= trim_ratio < 0.5:
            raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
        self.trim_ratio = trim_ratio

    def aggregate(self, updates, weights, generator=None):
        return agg_ops.trimmed_mean(updates, self.trim_ratio), {}


class Krum(Aggregator):
    """Krum, or Multi-Krum when ``num_selected > 1`` (Blanchard et al., NeurIPS 2017).

    The selected updates are averaged with equal weights by default, as in the paper. Flower's Multi-Krum
    weights them by the clients' sample counts (flwr 1.42.0, ``flwr/server/strategy/aggregate.py``,
    ``aggregate_krum``: ``best_results = [results[i] for i in best_indices]`` / ``return aggregate(best_results)``,
    and ``aggregate`` averages by ``num_examples``); ``weighted=True`` does the same. Krum (``num_selected=1``)
    returns one update either way.

    Args:
        num_malicious: assumed number f of Byzantine clients per round; needs ``clients_per_round > 2f + 2``.
        num_selected: updates averaged (1: Krum).
        weighted: average the selected updates by the clients' sample counts (Flower's Multi-Krum) instead of
            the paper's plain mean.
    """

    def __init__(self, num_malicious: int = 1, num_selected: int = 1, weighted: bool = False):
        self.num_malicious, self.num_selected, self.weighted = num_malicious, num_selected, weighted

    def check(self, num_clients_per_round: int) -> None:
        if num_clients_per_round <= 2 * self.num_malicious + 2:
            raise ValueError(
                f"Krum needs clients_per_round > 2 * num_malicious + 2, got {num_clients_per_round} <= "
                f"{2 * self.num_malicious + 2}; sample more clients per round or lower num_malicious"
            )
        if self.num_selected > num_clients_per_round:
            raise ValueError(f"Krum num_selected={self.num_selected} exceeds clients_per_round={num_clients_per_round}")

    def aggregate(self, updates, weights, generator=None):
        out, selected = agg_ops.krum(updates, self.num_malicious, self.num_selected,
                                     weights if self.weighted else None)  # fmt: skip
        return out, {"admitted": selected}


class Flame(Aggregator):
    """FLAME: HDBSCAN filtering, adaptive clipping and noising (Nguyen et al., USENIX Security 2022).

    Args:
        noise_lambda: noise level λ (std = λ · median norm).
        min_cluster_size: HDBSCAN min_cluster_size (default: a strict majority of the round's clients).
    """

    def __init__(self, noise_lambda: float = 0.001, min_cluster_size: int | None = None):
        self.noise_lambda, self.min_cluster_size = noise_lambda, min_cluster_size

    def aggregate(self, updates, weights, generator=None):
        out, admitted = agg_ops.flame(updates, None, self.noise_lambda, self.min_cluster_size, generator)
        return out, {"admitted": admitted}
