"""Wrapping a ``LightningModule``'s ``training_step`` on the instance for the length of a fit.

One small object with :meth:`TrainingStepPatch.enter` (fit start) and :meth:`~TrainingStepPatch.exit`
(fit end, or an exception): the class's ``training_step`` is never touched, the user's code stays as
written, and :func:`lightning_compress.core.surgery.unpatched_copy` copies the module without the
wrapper (an export's copy must not drag the callback, its teacher and the trainer along).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from lightning_compress.core.surgery import InstancePatch, drop_patch

Step = Callable[..., Any]  # step(pl_module, original_training_step, *args, **kwargs) -> what training_step returns


class TrainingStepPatch:
    """Run ``step(pl_module, original, *args, **kwargs)`` in place of ``pl_module.training_step``.

    Args:
        step: the wrapper; ``original`` is the module's own bound ``training_step``.

    Example::

        patch = TrainingStepPatch(lambda module, original, *a, **k: original(*a, **k) * 2)
        patch.enter(module)   # at setup / fit start
        patch.exit(module)    # at teardown and on an exception
    """

    def __init__(self, step: Step) -> None:
        self._step = step
        self._patch: InstancePatch | None = None

    def enter(self, pl_module: pl.LightningModule) -> None:
        """Wrap ``pl_module.training_step`` (a wrapper left by an interrupted fit is removed first)."""
        self.exit(pl_module)
        drop_patch(pl_module, "training_step")
        original = pl_module.training_step
        wrapped = functools.update_wrapper(functools.partial(self._step, pl_module, original), original)
        self._patch = InstancePatch("training_step", wrapped)
        self._patch.enter(pl_module)

    def exit(self, pl_module: pl.LightningModule) -> None:
        """Give ``pl_module`` its own ``training_step`` back (a no-op when not wrapped)."""
        if self._patch is not None:
            self._patch.exit(pl_module)
        self._patch = None

    def active(self, pl_module: pl.LightningModule) -> bool:
        """Whether ``pl_module``'s ``training_step`` is wrapped by this patch now."""
        return self._patch is not None and self._patch.active(pl_module)
