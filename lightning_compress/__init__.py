"""lightning_compress: make networks smaller and faster while they train with ``lightning.Trainer``.

The public API, by layer (``docs/architecture.md`` says how they fit together):
``app`` (command line, recipe runs, sweeps, demo) > ``config`` (recipes) > ``callbacks`` (one thin
Lightning callback per technique) > ``deploy`` (ONNX export, physical channel removal, measurement,
report, ``restore``) > ``core`` (the plain-torch techniques), beside ``vision`` (data, models,
``ClassificationModule``) and ``integrations`` (W&B extras); ``errors`` at the bottom.
"""

from lightning_compress.callbacks import (
    BudgetPlanner,
    CompressionExport,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.callbacks.loading import CompressedCheckpointMixin
from lightning_compress.config import Recipe, load_recipe
from lightning_compress.core.pruning import fold_masks, prune
from lightning_compress.deploy.measure import summarize
from lightning_compress.deploy.onnx import export_onnx
from lightning_compress.deploy.restore import restore
from lightning_compress.errors import CompressionConfigError, ExportVerificationError, TrainingDivergedError
from lightning_compress.vision.data import (
    DigitsDataModule,
    ImageFolderDataModule,
    MNIST5kDataModule,
    TorchvisionDataModule,
    get_datamodule,
)
from lightning_compress.vision.models import build_model
from lightning_compress.vision.module import ClassificationModule

__version__ = "0.2.0"  # as in pyproject.toml (a test keeps the two equal)

__all__ = [
    "BudgetPlanner",
    "ClassificationModule",
    "CompressedCheckpointMixin",
    "CompressionConfigError",
    "CompressionExport",
    "DigitsDataModule",
    "ExportVerificationError",
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
