"""Thin Lightning callbacks, one per technique, built on the functional cores: ``base`` (the shared
:class:`~lightning_compress.callbacks.base.CompressionCallback`, ``find_callback``, strategy checks),
``replace`` (module replacement mid-fit), ``step_patch`` (the ``training_step`` wrapper), and
``pruning``, ``quantization``, ``distillation``, ``low_rank``, ``export`` and ``budget`` (per-layer settings
planned to a target during the fit, handed to the others).

May import: ``lightning_compress.errors``, ``core``, ``deploy``, ``vision``, ``integrations`` and
``callbacks`` itself (plus Lightning); never ``config`` or ``app``.
"""

from lightning_compress.callbacks.budget import BudgetPlanner
from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.export import CompressionExport
from lightning_compress.callbacks.low_rank import LowRankFactorization
from lightning_compress.callbacks.pruning import MagnitudePruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining

__all__ = [
    "BudgetPlanner",
    "CompressionExport",
    "KnowledgeDistillation",
    "LowRankFactorization",
    "MagnitudePruning",
    "QuantizationAwareTraining",
]
