"""Federated data partitions: which training samples each client holds, as pure tensor math.

Every function returns ``list[Tensor]``: one sorted int64 index tensor per client. The index sets are
disjoint; they cover every sample (IID, Dirichlet) or all but the ``n mod num_shards`` samples left over
by equal shards. A ``torch.Generator`` makes each partition a deterministic function of its seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["dirichlet_partition", "iid_partition", "shard_partition"]


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"cannot split {n} samples over {num_clients} clients; use fewer clients or more data")


def _check_labels(labels: Tensor) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    return labels


def iid_partition(n: int, num_clients: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """Uniformly random split of ``range(n)`` into ``num_clients`` sets whose sizes differ by at most one.

    The IID baseline of McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017.

    Args:
        n: Number of samples.
        num_clients: Number of clients, ``1 <= num_clients <= n``.
        generator: RNG of the permutation.

    Returns:
        One sorted index tensor per client.
    """
    _check_clients(n, num_clients)
    perm = torch.randperm(n, generator=generator)
    return [part.sort().values for part in perm.tensor_split(num_clients)]


def dirichlet_partition(
    labels: Tensor,
    num_clients: int,
    alpha: float,
    generator: torch.Generator | None = None,
    min_size: int = 10,
    max_retries: int = 100,
) -> list[Tensor]:
    """Label-skewed non-IID split: each class is spread over the clients in Dirichlet(alpha) proportions.

    Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification", 2019 (also the partition of Chameleon and most FL backdoor papers). For every class
    ``c`` a vector ``p_c ~ Dir(alpha * 1_N)`` is drawn and the class's shuffled samples are cut at the
    cumulative proportions. Small ``alpha`` (0.1) gives clients with one or two classes; ``alpha -> inf``
    approaches IID label shares. The whole draw is repeated until every client holds at least ``min_size``
    samples.

    Args:
        labels: Integer class labels ``[n]``.
        num_clients: Number of clients.
        alpha: Dirichlet concentration, ``> 0``.
        generator: RNG; the Dirichlet draws use a NumPy generator seeded from it.
        min_size: Smallest number of samples a client may hold.
        max_retries: Draws tried before giving up.

    Returns:
        One sorted index tensor per client.

    Raises:
        ValueError: On ``alpha <= 0``, on more clients than samples, or when no draw within
            ``max_retries`` gives every client ``min_size`` samples.
    """
    labels = _check_labels(labels)
    n = len(labels)
    _check_clients(n, num_clients)
    if not (alpha > 0 and alpha < float("inf")):
        raise ValueError(
            f"Dirichlet alpha must be finite and > 0, got {alpha}; use e.g. 0.5 for moderate and 0.1 for strong "
            "label skew, or partition='iid' for IID clients"
        )
    if min_size < 0 or max_retries < 1:
        raise ValueError(f"need min_size >= 0 and max_retries >= 1, got {min_size} and {max_retries}")
    if min_size * num_clients > n:
        raise ValueError(
            f"{num_clients} clients with at least {min_size} samples each need {min_size * num_clients} samples, "
            f"but there are {n}; lower min_size or num_clients"
        )
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    by_class = [(labels == c).nonzero().flatten() for c in labels.unique()]
    for _ in range(max_retries):
        parts: list[list[Tensor]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = idx[torch.randperm(len(idx), generator=generator)]
            share = torch.from_numpy(rng.dirichlet(np.full(num_clients, float(alpha))))
            cuts = (share.cumsum(0)[:-1] * len(idx)).round().long()
            for client, chunk in enumerate(idx.tensor_split(cuts)):
                parts[client].append(chunk)
        out = [torch.cat(p).sort().values for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {max_retries} tries gave all {num_clients} clients >= {min_size} "
        "samples; raise alpha, lower min_size or num_clients, or raise max_retries"
    )


def shard_partition(
    labels: Tensor, num_clients: int, shards_per_client: int, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Pathological non-IID split: sort by label, cut into equal shards, deal ``shards_per_client`` to each.

    McMahan et al., AISTATS 2017 (2 shards of 300 MNIST digits per client, so most clients see two
    classes); also FedSelect's ``shard_per_user``. Samples of one class are shuffled before sorting, so
    which samples of a class share a shard depends on the seed. The last ``n mod (num_clients *
    shards_per_client)`` samples in label order are left out.

    Args:
        labels: Integer class labels ``[n]``.
        num_clients: Number of clients.
        shards_per_client: Shards each client gets, ``>= 1``.
        generator: RNG of the within-class order and of the shard assignment.

    Returns:
        One sorted index tensor per client, all of size ``shards_per_client * (n // num_shards)``.
    """
    labels = _check_labels(labels)
    n = len(labels)
    _check_clients(n, num_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    shard_size = n // num_shards
    if shard_size == 0:
        raise ValueError(
            f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards exceed the {n} samples; "
            "use fewer clients or shards"
        )
    order = torch.randperm(n, generator=generator)
    by_label = order[labels[order].argsort(stable=True)]
    shards = by_label[: num_shards * shard_size].view(num_shards, shard_size)
    deal = torch.randperm(num_shards, generator=generator).view(num_clients, shards_per_client)
    return [shards[row].flatten().sort().values for row in deal]
