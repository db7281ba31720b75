"""Every error type of the project: bad input (:class:`CompressionConfigError`, with its message
template), a diverged run (:class:`TrainingDivergedError`) and an export that does not reproduce its
model (:class:`ExportVerificationError`). Imports nothing of the package: every layer may import it."""

from __future__ import annotations

import importlib
import reprlib
from collections.abc import Iterable
from difflib import get_close_matches
from typing import Any


class CompressionConfigError(ValueError):
    """A compression argument, recipe key or model does not fit what is allowed.

    Every message names the argument (or module), what is allowed and what was given, and may
    end with a ``HINT:`` when a likely fix exists.
    """


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite: the run stopped and nothing was exported."""


class ExportVerificationError(RuntimeError):
    """An exported file does not reproduce the PyTorch model within tolerance: nothing was written."""


def config_error(name: str, allowed: str, got: Any, hint: str | None = None) -> CompressionConfigError:
    """Build a :class:`CompressionConfigError` with the project's one message template.

    Args:
        name: the argument, key path or module the problem is about.
        allowed: what is allowed, e.g. ``"in [0, 1)"`` or ``"one of 'cubic', 'linear'"``.
        got: the value that was given.
        hint: an optional likely fix.

    Example::

        >>> str(config_error("final_sparsity", "in [0, 1)", 1.2))
        '`final_sparsity` must be in [0, 1), got 1.2'
    """
    message = f"`{name}` must be {allowed}, got {brief(got)}"
    if hint:
        message += f". HINT: {hint}"
    return CompressionConfigError(message)


def one_of(choices: Iterable[str]) -> str:
    """Render a list of allowed names as ``one of 'a', 'b'``."""
    return "one of " + ", ".join(repr(c) for c in choices)


def did_you_mean(given: str, choices: Iterable[str]) -> str | None:
    """Return a ``did you mean 'x'?`` hint for a misspelt name, or ``None``."""
    close = get_close_matches(given, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


BRIEF = 80  # characters of a user's value a message shows
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, BRIEF, BRIEF


def brief(value: Any) -> str:
    """``repr(value)`` cut to :data:`BRIEF` characters: what a message may show of a user's value."""
    text = _SHORT.repr(value)
    return text if len(text) <= BRIEF else text[: BRIEF - 3] + "..."


def require(module: str, extra: str, feature: str) -> Any:
    """``module`` imported, or a :class:`CompressionConfigError` naming the extra that installs it.

    Example::

        ort = require("onnxruntime", "export", "CompressionExport's verification")
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise CompressionConfigError(
            f"{feature} needs `{top}`, which is not installed. HINT: pip install 'lightning-compress[{extra}]'"
        ) from None


class OptionalModule:
    """A module imported on first use through :func:`require`: a package that imports it at its top
    level still imports without the extra, and says which extra to install when the feature is used."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        self._where = (module, extra, feature)

    def __getattr__(self, name: str) -> Any:
        return getattr(require(*self._where), name)
