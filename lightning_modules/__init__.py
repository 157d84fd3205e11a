"""One LightningModule per method, grouped by family; pure tensor math in ``ops``, networks in ``nets``."""

from lightning_modules.base import BaseRecipe
from lightning_modules.chameleon import ChameleonAttack
from lightning_modules.classifier import ClassifierRecipe
from lightning_modules.federated import (
    Aggregator,
    Attack,
    FedAvg,
    FederatedRecipe,
    Flame,
    Krum,
    LocalTrainer,
    Median,
    NaivePoisoning,
    Neurotoxin,
    NormClipping,
    PGDPoisoning,
    ServerDefense,
    TrimmedMean,
)
from lightning_modules.metrics import AttackSuccessRate
from lightning_modules.nets import HFSequenceClassifier, LoraSpec, MnistCNN

__all__ = [
    "Aggregator",
    "Attack",
    "AttackSuccessRate",
    "BaseRecipe",
    "ChameleonAttack",
    "ClassifierRecipe",
    "FedAvg",
    "FederatedRecipe",
    "Flame",
    "HFSequenceClassifier",
    "Krum",
    "LocalTrainer",
    "LoraSpec",
    "Median",
    "MnistCNN",
    "NaivePoisoning",
    "Neurotoxin",
    "NormClipping",
    "PGDPoisoning",
    "ServerDefense",
    "TrimmedMean",
]

from lightning_modules.finemixing import EPUR, FineMixing, SuspectFineTuning  # noqa: E402

__all__ += ["EPUR", "FineMixing", "SuspectFineTuning"]

from lightning_modules.memit import MEMIT  # noqa: E402
from lightning_modules.namet import NAMET  # noqa: E402
from lightning_modules.nets.causal_lm import CausalLM  # noqa: E402

__all__ += ["CausalLM", "MEMIT", "NAMET"]

from lightning_modules.fedselect import FedSelect  # noqa: E402
from lightning_modules.pfl import Ditto, FedPer, LGFedAvg, PersonalizedFedAvg  # noqa: E402

__all__ += ["Ditto", "FedPer", "FedSelect", "LGFedAvg", "PersonalizedFedAvg"]

from lightning_modules.dam import DAM, DAMPermutedMasks  # noqa: E402
from lightning_modules.merging import (  # noqa: E402
    AdaMerging,
    Dare,
    MergeRecipe,
    MergeRule,
    TaskArithmetic,
    TaskFineTuning,
    Ties,
)

__all__ += ["AdaMerging", "DAM", "DAMPermutedMasks", "Dare", "MergeRecipe", "MergeRule", "TaskArithmetic", "TaskFineTuning", "Ties"]

from lightning_modules.w2sdefense import PEFTUnlearning, ProjectedTeacher, W2SDefense, W2SDefenseBroadcast  # noqa: E402

__all__ += ["PEFTUnlearning", "ProjectedTeacher", "W2SDefense", "W2SDefenseBroadcast"]

from lightning_modules.nets.split_lm import SplitCausalLM  # noqa: E402
from lightning_modules.tamper import TamperAttack  # noqa: E402
from lightning_modules.tar import TAR, GradientAscent, NoSafeguard, RandomMapping, Safeguard  # noqa: E402

__all__ += ["GradientAscent", "NoSafeguard", "RandomMapping", "Safeguard", "SplitCausalLM", "TAR", "TamperAttack"]

from lightning_modules.trojandam import TrojanDam  # noqa: E402

__all__ += ["TrojanDam"]

from lightning_modules.nets.clip import CLIPImageClassifier  # noqa: E402

__all__ += ["CLIPImageClassifier"]
