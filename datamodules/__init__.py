"""LightningDataModules, triggers and poisoning (data transformations)."""

from datamodules.base import BackdoorDataModule, TensorBatchDataset
from datamodules.federated import FeatureShiftFederatedDataModule, FederatedDataModule
from datamodules.images import ImageClassificationDataModule
from datamodules.poisoning import Poisoning
from datamodules.text import TextClassificationDataModule, load_tokenizer
from datamodules.triggers import (
    Blend,
    ImageTrigger,
    InsertSentence,
    Patch,
    PixelPattern,
    RareWord,
    SubordinateClause,
    TextTrigger,
)

__all__ = [
    "BackdoorDataModule",
    "Blend",
    "FeatureShiftFederatedDataModule",
    "FederatedDataModule",
    "ImageClassificationDataModule",
    "ImageTrigger",
    "InsertSentence",
    "Patch",
    "PixelPattern",
    "Poisoning",
    "RareWord",
    "SubordinateClause",
    "TensorBatchDataset",
    "TextClassificationDataModule",
    "TextTrigger",
    "load_tokenizer",
]

from datamodules.facts import CounterFactDataModule, EditRecord  # noqa: E402

__all__ += ["CounterFactDataModule", "EditRecord"]

from datamodules.multitask import ImageTask, MultiTaskDataModule, TaskImageDataModule  # noqa: E402

__all__ += ["ImageTask", "MultiTaskDataModule", "TaskImageDataModule"]

from datamodules.tar_facts import TamperFactsDataModule  # noqa: E402
from datamodules.tar_wmdp import TamperWMDPDataModule  # noqa: E402

__all__ += ["TamperFactsDataModule", "TamperWMDPDataModule"]

