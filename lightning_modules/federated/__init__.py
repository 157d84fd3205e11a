"""Federated learning engine: one Lightning training step = one round (see :mod:`.recipe`).

``aggregators`` (server rules), ``attacks`` (malicious clients), ``local`` (benign local training),
``recipe`` (:class:`FederatedRecipe` and the :class:`ServerDefense` hook). Round plots and preemption
handling live in ``callbacks/``.
"""

from lightning_modules.federated.aggregators import Aggregator, FedAvg, Flame, Krum, Median, NormClipping, TrimmedMean
from lightning_modules.federated.attacks import (
    Attack, AttackerData, AttackSchedule, NaivePoisoning, Neurotoxin, PGDPoisoning,
)  # fmt: skip
from lightning_modules.federated.local import ClientContext, LocalTrainer
from lightning_modules.federated.recipe import FederatedRecipe, ServerDefense

__all__ = [
    "Aggregator", "Attack", "AttackerData", "AttackSchedule", "ClientContext", "FedAvg", "FederatedRecipe", "Flame", "Krum", "LocalTrainer", "Median",
    "NaivePoisoning", "Neurotoxin", "NormClipping", "PGDPoisoning", "ServerDefense", "TrimmedMean",
]
