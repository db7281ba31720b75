"""lightning_compress: make networks smaller and faster while they train with ``lightning.Trainer``."""

from lightning_compress.callbacks import (
    CompressionExport,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.data import (
    DigitsDataModule,
    ImageFolderDataModule,
    MNIST5kDataModule,
    TorchvisionDataModule,
    get_datamodule,
)
from lightning_compress.errors import CompressionConfigError, TrainingDivergedError
from lightning_compress.export import export_onnx
from lightning_compress.measure import summarize
from lightning_compress.models import build_model
from lightning_compress.module import ClassificationModule
from lightning_compress.pruning import fold_masks, prune
from lightning_compress.recipe import Recipe, load_recipe
from lightning_compress.restore import restore

__version__ = "0.1.0"

__all__ = [
    "ClassificationModule",
    "CompressionConfigError",
    "CompressionExport",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "MNIST5kDataModule",
    "MagnitudePruning",
    "QuantizationAwareTraining",
    "Recipe",
    "TorchvisionDataModule",
    "TrainingDivergedError",
    "build_model",
    "export_onnx",
    "fold_masks",
    "get_datamodule",
    "load_recipe",
    "prune",
    "restore",
    "summarize",
]
