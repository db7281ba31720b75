"""Deprecated path: use :mod:`lightning_compress.core.surgery` (this module re-exports it; see CHANGELOG.md)."""

import warnings

from lightning_compress.callbacks.base import check_strategy  # noqa: F401
from lightning_compress.callbacks.replace import notify, replace_modules  # noqa: F401
from lightning_compress.core.surgery import *  # noqa: F403

warnings.warn(
    "lightning_compress.surgery moved to lightning_compress.core.surgery; "
    "the old path will be removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
