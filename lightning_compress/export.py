"""Deprecated path: use :mod:`lightning_compress.deploy.onnx` (this module re-exports it; see CHANGELOG.md)."""

import warnings

from lightning_compress.deploy.onnx import *  # noqa: F403

warnings.warn(
    "lightning_compress.export moved to lightning_compress.deploy.onnx; "
    "the old path will be removed in 0.3",
    DeprecationWarning,
    stacklevel=2,
)
