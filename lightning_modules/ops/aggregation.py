"""Server-side aggregation rules for federated learning, as pure tensor math.

Client updates are one 2-D tensor ``updates[n_clients, d]`` of flattened
parameter deltas ``Δ_i = θ_i − θ_global``; ``weights[n_clients]`` are optional
non-negative per-client weights (e.g. sample counts). Every rule returns the
aggregated update ``Tensor[d]``; rules that select clients also return the
indices of the clients they kept.

Rows must be finite: drop NaN/Inf updates first with :func:`finite_rows`.
The definitions match Flower's ``flwr.server.strategy.aggregate`` (checked by
the oracle tests in ``tests/test_ops_aggregation.py``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "add_gaussian_noise", "clip_by_norm", "coordinate_median", "fedavg", "finite_rows",
    "flame", "krum", "krum_scores", "trimmed_mean",
]  # fmt: skip


def _check_updates(updates: Tensor) -> int:
    """Validate an ``[n_clients, d]`` floating tensor and return ``n_clients``."""
    if not isinstance(updates, Tensor) or updates.ndim != 2:
        shape = getattr(updates, "shape", type(updates).__name__)
        raise ValueError(f"updates must be a 2-D tensor [n_clients, d], got {shape}")
    if not updates.is_floating_point():
        raise ValueError(f"updates must be a floating tensor, got dtype {updates.dtype}")
    if updates.shape[0] == 0:
        raise ValueError("updates is empty: need at least one client update")
    return updates.shape[0]


def _check_weights(weights: Tensor | None, updates: Tensor) -> Tensor:
    """Return validated weights as ``updates``' dtype/device (uniform when None)."""
    n = updates.shape[0]
    if weights is None:
        return updates.new_ones(n)
    weights = torch.as_tensor(weights).to(device=updates.device, dtype=updates.dtype)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"weights must be finite and non-negative, got {weights.tolist()}")
    if weights.sum() <= 0:
        raise ValueError("weights sum to 0: at least one client needs a positive weight")
    return weights


def finite_rows(updates: Tensor) -> Tensor:
    """Flag the client updates that contain no NaN or Inf.

    Args:
        updates: Client updates, shape ``[n_clients, d]``.

    Returns:
        Bool tensor ``[n_clients]``, True where the whole row is finite.
    """
    _check_updates(updates)
    return torch.isfinite(updates).all(dim=1)


def fedavg(updates: Tensor, weights: Tensor | None = None) -> Tensor:
    """Weighted mean of client updates (FedAvg).

    McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017. Same as Flower's ``aggregate``.

    Args:
        updates: Client updates, shape ``[n_clients, d]``.
        weights: Non-negative per-client weights ``[n_clients]`` (typically
            sample counts); None means uniform.

    Returns:
        ``sum_i w_i Δ_i / sum_i w_i``, shape ``[d]``.

    Raises:
        ValueError: On malformed updates or weights (wrong shape, negative,
            summing to zero).
    """
    _check_updates(updates)
    w = _check_weights(weights, updates)
    return (w @ updates) / w.sum()


def clip_by_norm(updates: Tensor, max_norm: float) -> tuple[Tensor, Tensor]:
    """Scale every update into the L2 ball of radius ``max_norm``.

    Norm-bounding defense of Sun et al., "Can You Really Backdoor Federated
    Learning?", 2019: ``Δ_i / max(1, ‖Δ_i‖ / max_norm)``.

    Args:
        updates: Client updates, shape ``[n_clients, d]``.
        max_norm: Bound ``M >= 0`` (0 maps every non-zero update to 0).

    Returns:
        ``(clipped updates [n_clients, d], original L2 norms [n_clients])``.
    """
    _check_updates(updates)
    if not (max_norm >= 0 and max_norm < float("inf")):
        raise ValueError(f"max_norm must be finite and >= 0, got {max_norm}")
    norms = torch.linalg.vector_norm(updates, dim=1)
    # min(1, M/‖Δ‖) written without dividing by zero (norms > M >= 0 there).
    scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
    return updates * scale.unsqueeze(1), norms


def add_gaussian_noise(
    update: Tensor, std: float, generator: torch.Generator | None = None
) -> Tensor:
    """Add isotropic Gaussian noise ``N(0, std²)`` to an update (weak DP).

    Sun et al., 2019 (weak differential privacy); also step 4 of FLAME.

    Args:
        update: Any-shaped floating tensor.
        std: Noise standard deviation, ``>= 0``.
        generator: Optional RNG (on ``update``'s device) for reproducibility.

    Returns:
        A new tensor ``update + noise``.
    """
    if not (std >= 0 and std < float("inf")):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    noise = torch.randn(
        update.shape, generator=generator, dtype=update.dtype, device=update.device
    )
    return update + std * noise


def coordinate_median(updates: Tensor) -> Tensor:
    """Coordinate-wise median of the client updates.

    Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018. For even ``n`` this is the mean of the two
    middle values, as ``np.median`` and Flower's ``aggregate_median``
    (``torch.median`` would return the lower one).

    Args:
        updates: Client updates, shape ``[n_clients, d]``.

    Returns:
        Median per coordinate, shape ``[d]``.
    """
    n = _check_updates(updates)
    ordered = updates.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(updates: Tensor, trim_ratio: float) -> Tensor:
    """Coordinate-wise trimmed mean.

    Yin et al., ICML 2018. Per coordinate, drops the ``k = int(trim_ratio * n)``
    largest and ``k`` smallest values and averages the remaining ``n − 2k``;
    same as Flower's ``aggregate_trimmed_avg`` / ``scipy.stats.trim_mean``.
    ``trim_ratio < 0.5`` guarantees ``2k < n``.

    Args:
        updates: Client updates, shape ``[n_clients, d]``.
        trim_ratio: Fraction cut from each end, in ``[0, 0.5)``.

    Returns:
        Trimmed mean per coordinate, shape ``[d]``.
    """
    n = _check_updates(updates)
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    k = int(trim_ratio * n)
    return updates.sort(dim=0).values[k : n - k].mean(dim=0)


def krum_scores(updates: Tensor, num_malicious: int) -> Tensor:
    """Krum score of every update.

    Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent", NeurIPS 2017: ``score_i`` is the sum of squared L2
    distances from ``Δ_i`` to its ``n − f − 2`` closest other updates.

    Args:
        updates: Client updates, shape ``[n_clients, d]``.
        num_malicious: Assumed number ``f >= 0`` of Byzantine clients.

    Returns:
        Scores, shape ``[n_clients]`` (lower is more central).

    Raises:
        ValueError: If ``n <= 2f + 2`` (Krum's requirement).
    """
    n = _check_updates(updates)
    if num_malicious < 0:
        raise ValueError(f"num_malicious must be >= 0, got {num_malicious}")
    if n <= 2 * num_malicious + 2:
        raise ValueError(
            f"Krum needs n > 2f + 2 clients: got n={n}, f={num_malicious}; "
            "lower num_malicious or sample more clients per round"
        )
    # Squared distances of the n(n-1)/2 pairs from the differences themselves (``pdist``: no ``|a|^2 + |b|^2 - 2ab``
    # cancellation, each pair once; ~80x faster than ``cdist(compute_mode="donot_use_mm_for_euclid_dist")``).
    i, j = torch.triu_indices(n, n, 1, device=updates.device)
    pairs = torch.nn.functional.pdist(updates).square()
    dist = updates.new_full((n, n), float("inf"))  # the diagonal stays inf: a client is not its own neighbour
    dist[i, j] = pairs
    dist[j, i] = pairs
    closest = dist.sort(dim=1).values[:, : n - num_malicious - 2]
    return closest.sum(dim=1)


def krum(
    updates: Tensor,
    num_malicious: int,
    num_selected: int = 1,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Krum / Multi-Krum aggregation.

    Blanchard et al., NeurIPS 2017. Krum (``num_selected=1``) returns the
    update with the lowest :func:`krum_scores`; Multi-Krum averages the
    ``num_selected`` lowest-score updates. As in Flower's ``aggregate_krum``
    the average is weighted by ``weights`` (Flower: ``num_examples``) when
    given; ``weights=None`` gives the paper's plain mean.

    Args:
        updates: Client updates, shape ``[n_clients, d]``.
        num_malicious: Assumed number ``f`` of Byzantine clients (``n > 2f + 2``).
        num_selected: Number ``m`` of updates kept, ``1 <= m <= n``.
        weights: Optional non-negative per-client weights ``[n_clients]``.

    Returns:
        ``(aggregate [d], selected client indices [m], lowest score first)``.
    """
    scores = krum_scores(updates, num_malicious)
    n = updates.shape[0]
    if not 1 <= num_selected <= n:
        raise ValueError(f"num_selected must be in [1, {n}], got {num_selected}")
    w = _check_weights(weights, updates)
    selected = scores.argsort(stable=True)[:num_selected]
    return fedavg(updates[selected], w[selected]), selected


def flame(
    updates: Tensor,
    global_params: Tensor | None = None,
    noise_lambda: float = 0.001,
    min_cluster_size: int | None = None,
    generator: torch.Generator | None = None,
    cluster_on: Literal["updates", "models"] = "updates",
    clip_bound_from: Literal["admitted", "all"] = "admitted",
) -> tuple[Tensor, Tensor]:
    """FLAME: cluster filtering, adaptive clipping and noising.

    Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX
    Security 2022, Algorithm 1:

    1. HDBSCAN (``sklearn.cluster.HDBSCAN``, ``metric="precomputed"``,
       ``min_samples=1``, ``allow_single_cluster=True``) on pairwise cosine
       distances; the largest cluster is admitted. If every client is labelled
       noise, all clients are admitted. Note HDBSCAN's labelling when the
       single cluster is the root of its hierarchy: only the densest core
       (at least ``min_cluster_size`` points) keeps the label, so with generic
       benign spread a few benign clients may be rejected too, as in the
       common ``hdbscan``-based FLAME implementations.
    2. Clipping bound ``S`` = median L2 norm ``‖Δ_i‖ = ‖W_i − G‖`` (see
       ``clip_bound_from``); each admitted update is scaled by ``min(1, S/‖Δ_i‖)``.
    3. Plain mean of the clipped admitted updates.
    4. Gaussian noise with std ``noise_lambda * S``.

    Args:
        updates: Client updates, shape ``[n_clients, d]``.
        global_params: Flattened global model ``[d]``; needed only for
            ``cluster_on="models"``.
        noise_lambda: Noise level ``λ`` (paper: 0.001 for image tasks).
        min_cluster_size: HDBSCAN ``min_cluster_size``; default ``n // 2 + 1``
            (a strict majority).
        generator: Optional RNG for the noise.
        cluster_on: ``"updates"`` (default) clusters the deltas ``Δ_i``;
            ``"models"`` clusters ``global_params + Δ_i`` as in the paper. The
            default is used because the shared ``θ_global`` dominates model
            cosines, pushing all pairwise distances towards 0.
        clip_bound_from: ``"admitted"`` (default) takes the median over the
            admitted clients; ``"all"`` over all ``n`` clients, as written in
            the paper's Algorithm 1.

    Returns:
        ``(aggregate [d], admitted client indices, ascending)``.
    """
    from sklearn.cluster import HDBSCAN  # lazy: keep sklearn off the import path

    n = _check_updates(updates)
    if cluster_on not in ("updates", "models"):
        raise ValueError(f"cluster_on must be 'updates' or 'models', got {cluster_on!r}")
    if clip_bound_from not in ("admitted", "all"):
        raise ValueError(f"clip_bound_from must be 'admitted' or 'all', got {clip_bound_from!r}")
    if not noise_lambda >= 0:
        raise ValueError(f"noise_lambda must be >= 0, got {noise_lambda}")
    mcs = n // 2 + 1 if min_cluster_size is None else min_cluster_size
    if mcs < 2:
        raise ValueError(f"min_cluster_size must be >= 2, got {mcs}")

    vectors = updates
    if cluster_on == "models":
        if global_params is None or global_params.shape != (updates.shape[1],):
            raise ValueError(
                f"cluster_on='models' needs global_params of shape ({updates.shape[1]},)"
            )
        vectors = global_params.unsqueeze(0) + updates
    admitted = torch.arange(n, device=updates.device)
    if n >= mcs:  # otherwise no cluster can exist: admit everyone
        x = vectors.detach().double()
        x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)
        dist = (1.0 - x @ x.T).clamp(0.0, 2.0).fill_diagonal_(0.0)
        dist = ((dist + dist.T) / 2).cpu().numpy()
        hdbscan = HDBSCAN(metric="precomputed", min_cluster_size=mcs, min_samples=1,
                          allow_single_cluster=True, copy=True)  # fmt: skip
        labels = torch.as_tensor(hdbscan.fit(dist).labels_)
        clustered = labels[labels >= 0]
        if clustered.numel():
            majority = torch.bincount(clustered).argmax()
            admitted = torch.nonzero(labels == majority).flatten().to(updates.device)

    norms = torch.linalg.vector_norm(updates, dim=1)
    pool = norms[admitted] if clip_bound_from == "admitted" else norms
    bound = coordinate_median(pool.unsqueeze(1)).item()
    clipped, _ = clip_by_norm(updates[admitted], bound)
    aggregate = clipped.mean(dim=0)
    return add_gaussian_noise(aggregate, noise_lambda * bound, generator), admitted
