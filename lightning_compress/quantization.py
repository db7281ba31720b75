"""Deprecated path: use :mod:`lightning_compress.core.quantization` (this module re-exports it; see CHANGELOG.md)."""

import warnings

from lightning_compress.core.quantization import *  # noqa: F403

warnings.warn(
    "lightning_compress.quantization moved to lightning_compress.core.quantization; "
    "the old path will be removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
