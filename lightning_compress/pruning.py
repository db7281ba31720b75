"""Deprecated path: use :mod:`lightning_compress.core.pruning` (this module re-exports it; see CHANGELOG.md)."""

import warnings

from lightning_compress.core.layers import select_layers, weight_of  # noqa: F401
from lightning_compress.core.pruning import *  # noqa: F403

warnings.warn(
    "lightning_compress.pruning moved to lightning_compress.core.pruning; "
    "the old path will be removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
