"""Thin Lightning callbacks, one per technique, built on the functional cores."""

from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.export import CompressionExport
from lightning_compress.callbacks.low_rank import LowRankFactorization
from lightning_compress.callbacks.pruning import MagnitudePruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining

__all__ = [
    "CompressionExport",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "MagnitudePruning",
    "QuantizationAwareTraining",
]
