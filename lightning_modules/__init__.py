"""One LightningModule per method, grouped by family; pure tensor math in ``ops``, networks in ``nets``.

Every public class is re-exported here (``from lightning_modules import MergeRecipe``), and importing the package
imports every method, so a config may name a class by its bare name (``class_path: MergeRecipe``). A new method
adds one line below, in module order, and its names to ``__all__``.
"""

from lightning_modules.adamerging import AdaMerging
from lightning_modules.base import BaseRecipe
from lightning_modules.chameleon import ChameleonAttack
from lightning_modules.classifier import ClassifierRecipe
from lightning_modules.dam import DAM, DAMPermutedMasks
from lightning_modules.federated import (
    Aggregator, Attack, FedAvg, FederatedRecipe, Flame, Krum, LocalTrainer, Median, NaivePoisoning, Neurotoxin,
    NormClipping, PGDPoisoning, ServerDefense, TrimmedMean,
)
from lightning_modules.fedselect import FedSelect
from lightning_modules.finemixing import EPUR, FineMixing
from lightning_modules.memit import MEMIT
from lightning_modules.merge_rules import Dare, MergeRule, TaskArithmetic, Ties
from lightning_modules.merging import MergeRecipe, TaskFineTuning
from lightning_modules.metrics import AttackSuccessRate
from lightning_modules.namet import NAMET
from lightning_modules.nets import HFSequenceClassifier, LoraSpec, MnistCNN
from lightning_modules.nets.causal_lm import CausalLM
from lightning_modules.nets.clip import CLIPImageClassifier
from lightning_modules.nets.split_lm import SplitCausalLM
from lightning_modules.pfl import Ditto, FedPer, LGFedAvg, PersonalizedFedAvg
from lightning_modules.suspect_finetuning import SuspectFineTuning
from lightning_modules.tamper import AdversarySpace, TamperAttack
from lightning_modules.tar import GradientAscent, NoSafeguard, RandomMapping, RandomReinit, Safeguard, TAR
from lightning_modules.trojandam import TrojanDam
from lightning_modules.w2sdefense import PEFTUnlearning, ProjectedTeacher, W2SDefense, W2SDefenseBroadcast

__all__ = [
    "AdaMerging", "Aggregator", "Attack", "AttackSuccessRate", "BaseRecipe", "CLIPImageClassifier", "CausalLM",
    "ChameleonAttack", "ClassifierRecipe", "DAM", "DAMPermutedMasks", "Dare", "Ditto", "EPUR", "FedAvg", "FedPer",
    "FedSelect", "FederatedRecipe", "FineMixing", "Flame", "GradientAscent", "HFSequenceClassifier", "Krum",
    "LGFedAvg", "LocalTrainer", "LoraSpec", "MEMIT", "Median", "MergeRecipe", "MergeRule", "MnistCNN", "NAMET",
    "NaivePoisoning", "Neurotoxin", "NoSafeguard", "NormClipping", "PEFTUnlearning", "PGDPoisoning",
    "PersonalizedFedAvg", "ProjectedTeacher", "RandomMapping", "Safeguard", "ServerDefense", "SplitCausalLM",
    "SuspectFineTuning", "TAR", "TamperAttack", "TaskArithmetic", "TaskFineTuning", "Ties", "TrimmedMean",
    "TrojanDam", "W2SDefense", "W2SDefenseBroadcast",
]
__all__ += ["AdversarySpace", "RandomReinit"]  # TAR: the training-adversary space, the floor control
