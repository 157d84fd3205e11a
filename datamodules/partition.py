"""Federated data partitions: which training samples each client holds, as pure tensor math.

Every function returns ``list[Tensor]``: one sorted int64 index tensor per client. The index sets are
disjoint; they cover every sample (IID, Dirichlet) or all but the ``n mod num_shards`` samples left over
by equal shards. A ``torch.Generator`` makes each partition a deterministic function of its seed.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["class_partition", "dirichlet_partition", "iid_partition", "shard_partition"]


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


def class_partition(
    labels: Tensor, num_clients: int, classes_per_client: int, generator: torch.Generator | None = None
) -> list[Tensor]:
    """Pathological non-IID split with exactly ``classes_per_client`` distinct classes per client.

    The "k classes per client" split of LG-FedAvg (Liang et al. 2020), FedRep (Collins et al., ICML 2021) and
    FedSelect (Tamirisa et al., CVPR 2024; ``shard_per_user=2``). Unlike :func:`shard_partition`, no client gets
    one class twice or a shard that straddles two classes. Clients pick their classes one after another,
    each taking the ``classes_per_client`` classes held by the fewest clients so far (random among ties),
    so every class is held by ``num_clients * classes_per_client / num_classes`` clients (up to one more or
    less); each class's shuffled samples are then cut into equal chunks, one per client holding it.

    Args:
        labels: Integer class labels ``[n]``.
        num_clients: Number of clients.
        classes_per_client: Distinct classes per client, ``1 <= classes_per_client <= num_classes``.
        generator: RNG of the class choice and of the within-class order.

    Returns:
        One sorted index tensor per client. Samples of classes no client holds (when ``num_clients *
        classes_per_client < num_classes``) are left out.
    """
    labels = _check_labels(labels)
    n = len(labels)
    _check_clients(n, num_clients)
    classes = labels.unique()
    if not 1 <= classes_per_client <= len(classes):
        raise ValueError(
            f"classes_per_client must be in [1, {len(classes)}] (the classes present), got {classes_per_client}"
        )
    held = torch.zeros(len(classes))
    holders: list[list[int]] = [[] for _ in classes]
    for client in range(num_clients):
        tie_break = torch.rand(len(classes), generator=generator) * 0.5  # < 1: never beats a count difference
        for k in (held + tie_break).argsort()[:classes_per_client].tolist():
            holders[k].append(client)
            held[k] += 1
    parts: list[list[Tensor]] = [[] for _ in range(num_clients)]
    for k, cls in enumerate(classes):
        if not holders[k]:
            continue
        idx = (labels == cls).nonzero().flatten()
        if len(idx) < len(holders[k]):
            raise ValueError(
                f"class {int(cls)} has {len(idx)} samples for {len(holders[k])} clients; use fewer clients or more data"
            )
        idx = idx[torch.randperm(len(idx), generator=generator)]
        for client, chunk in zip(holders[k], idx.tensor_split(len(holders[k]))):
            parts[client].append(chunk)
    return [torch.cat(p).sort().values for p in parts]
