"""Sparsity schedules: how the target sparsity moves from ``initial`` to ``final`` over steps.

The cubic schedule is the gradual magnitude pruning schedule of Zhu & Gupta 2017, "To prune, or
not to prune": ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3`` for ``t0 <= t <= t0 + n*dt``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightning_compress.errors import config_error, did_you_mean, one_of

ShapeFn = Callable[[float], float]


def _cubic(progress: float) -> float:
    return 1.0 - (1.0 - progress) ** 3


def _linear(progress: float) -> float:
    return progress


def _constant(progress: float) -> float:
    return 1.0


SCHEDULES: dict[str, ShapeFn] = {"cubic": _cubic, "linear": _linear, "constant": _constant}


def get_schedule(name: str) -> ShapeFn:
    """Look up a schedule's shape ``progress in [0, 1] -> fraction of the way to the final value``.

    Raises:
        CompressionConfigError: ``name`` is not a known schedule.
    """
    if name not in SCHEDULES:
        raise config_error("schedule", one_of(SCHEDULES), name, did_you_mean(name, SCHEDULES))
    return SCHEDULES[name]


@dataclass(frozen=True)
class SparsitySchedule:
    """A target sparsity as a function of the optimizer step.

    Args:
        initial: sparsity at ``start_step`` (``s_i``).
        final: sparsity from ``end_step`` on (``s_f``).
        start_step: first step at which pruning happens (``t0``).
        end_step: step at which ``final`` is reached (``t0 + n * dt``).
        frequency: masks are updated every ``frequency`` steps between start and end (``dt``).
        shape: name of the schedule shape, ``"cubic"``, ``"linear"`` or ``"constant"``.

    Example::

        >>> s = SparsitySchedule(0.0, 0.9, start_step=0, end_step=100, frequency=10)
        >>> round(s.target(50), 4)
        0.7875
    """

    initial: float
    final: float
    start_step: int
    end_step: int
    frequency: int
    shape: str = "cubic"

    def __post_init__(self) -> None:
        get_schedule(self.shape)
        if self.end_step < self.start_step:
            raise config_error("end_step", f">= start_step ({self.start_step})", self.end_step)
        if self.frequency < 1:
            raise config_error("frequency", "a positive number of steps", self.frequency)

    def target(self, step: int) -> float:
        """The target sparsity at ``step`` (``0`` before ``start_step``)."""
        if step < self.start_step:
            return 0.0
        span = self.end_step - self.start_step
        progress = 1.0 if span == 0 else min(1.0, (step - self.start_step) / span)
        return self.initial + (self.final - self.initial) * get_schedule(self.shape)(progress)

    def is_update_step(self, step: int) -> bool:
        """Whether masks are recomputed at ``step``: every ``frequency`` steps in range, and at the end."""
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step
