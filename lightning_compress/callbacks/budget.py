"""``BudgetPlanner``: plan per-layer settings to a budget during the fit and hand them to the compression callbacks.

The planning itself is :func:`lightning_compress.deploy.planning.plan_model`; this callback decides *when* (the
start of epoch ``epoch``, after a warm-up), *with what* (the compression callbacks in the Trainer say which
techniques may be used) and carries the result to them (``configure`` on each), on every rank alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_compress.callbacks.base import CompressionCallback, batch_input, check_strategy, find_callbacks
from lightning_compress.callbacks.low_rank import LowRankFactorization
from lightning_compress.callbacks.pruning import MagnitudePruning
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.deploy.onnx import float_copy
from lightning_compress.deploy.planning import Plan, Target, plan_model
from lightning_compress.errors import CompressionConfigError, config_error

USED_BY = "MagnitudePruning (pattern 'channel' or 'unstructured'), LowRankFactorization, QuantizationAwareTraining"


class BudgetPlanner(CompressionCallback):
    """At the start of epoch ``epoch``, choose per-layer settings that meet ``target`` and configure the
    compression callbacks of the Trainer with them, in the same fit.

    The techniques are the compression callbacks present: ``MagnitudePruning`` (its ``pattern``, ``channel``
    or ``unstructured``) gets ``layer_sparsity``, ``LowRankFactorization`` gets ``ranks`` and
    ``QuantizationAwareTraining`` the layers to quantise and their ``layer_bits``; every layer the plan leaves
    alone stays as it is (dense, whole, float). Each must start at or after ``epoch``. The plan is made on rank
    zero and broadcast, kept in the checkpoint (a resumed fit configures the callbacks again instead of
    planning anew), and logged: ``budget/<metric>_dense``, ``_predicted``, ``_measured``, ``budget/layers``.

    Args:
        target: ``latency=0.5`` (a ratio of the dense fp32 model), ``latency=2.5ms``, ``bytes=200000``,
            ``params=0.3`` or ``macs=0.5`` (see :class:`lightning_compress.deploy.planning.Target`).
        epoch: the epoch at whose start the plan is made (after ``epoch`` warm-up epochs).
        batches: validation batches the sensitivity analysis uses.
        batch_size: the batch size latencies are measured at; default the training batch's.
        bits: weight widths QAT may give layers (8, and 4 for a w4 option).
        runs: timed ONNX Runtime calls per latency.
        cache: a JSON file for the per-layer latencies (kept between fits).
        state_key_suffix: tells two instances apart in a checkpoint.

    Raises:
        CompressionConfigError: a bad argument (at construction); no compression callback to plan for, one that
            starts before ``epoch``, an N:M pattern (at setup); a target the techniques cannot reach (at ``epoch``).

    Example::

        Trainer(max_epochs=10, callbacks=[BudgetPlanner("latency=0.5", epoch=1),
                                          MagnitudePruning(pattern="channel", start_epoch=1, end_epoch=6),
                                          QuantizationAwareTraining(start_epoch=8), CompressionExport("out")])
    """

    kind = "budget"

    def __init__(
        self,
        target: str = "latency=0.5",
        epoch: int = 1,
        batches: int = 4,
        batch_size: int | None = None,
        bits: Sequence[int] = (8,),
        runs: int = 20,
        cache: str | None = None,
        state_key_suffix: str = "",
    ) -> None:
        self.target = Target.parse(target)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise config_error("epoch", "a whole epoch number >= 0", epoch)
        for name, value in (("batches", batches), ("runs", runs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise config_error(name, "a positive integer", value)
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise config_error("batch_size", "a positive integer or None", batch_size)
        if not bits or any(b not in (4, 8) for b in bits):
            raise config_error("bits", "a list of weight widths from 4 and 8", bits)
        self.epoch, self.batches, self.batch_size, self.bits, self.runs = epoch, batches, batch_size, list(bits), runs
        self.cache = cache
        self._state_key_suffix = state_key_suffix
        self.plan: dict[str, Any] | None = None  # what a checkpoint keeps: the settings and the figures
        self._techniques: list[str] = []
        self._train_batch: int | None = None  # the training batch size (latencies default to it)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(suffix=self._state_key_suffix)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage != "fit":
            return
        self.plan = None  # a resumed fit loads its plan after this
        pruning, low_rank, qat = _callbacks(trainer)
        if not (pruning or low_rank or qat):
            raise CompressionConfigError(f"BudgetPlanner has nothing to plan for: add one or more of {USED_BY}")
        starts: list[tuple[str, float]] = [("MagnitudePruning.start_epoch", c.start_epoch) for c in pruning]
        starts += [("QuantizationAwareTraining.start_epoch", c.start_epoch) for c in qat]
        starts += [("LowRankFactorization.epoch", c.epoch) for c in low_rank]
        for name, start in starts:
            if start < self.epoch:
                raise config_error(name, f">= BudgetPlanner's epoch ({self.epoch}): the plan comes first", start)
        techniques = []
        for callback in pruning:
            if callback.pattern.kind not in ("channel", "unstructured"):
                raise config_error("MagnitudePruning.pattern", "'channel' or 'unstructured' with BudgetPlanner",
                                   str(callback.pattern))  # fmt: skip
            techniques.append(callback.pattern.kind)
        if low_rank:
            techniques.append("low_rank")
        if qat:
            techniques += [{8: "int8", 4: "int4"}[b] for b in self.bits]
        if len(pruning) > 1 or len(low_rank) > 1 or len(qat) > 1:
            raise CompressionConfigError(f"BudgetPlanner plans for one callback of each kind ({USED_BY})")
        self._techniques = techniques

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plan is not None:  # resumed after the plan was made: the callbacks take it again
            self._configure(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._train_batch is None:
            self._train_batch = len(batch_input(batch))
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch or self.plan is not None:
            return
        planned: dict[str, Any] | None = None
        if trainer.is_global_zero:
            batches = _validation_batches(trainer, self.batches)
            batch_size = self.batch_size or self._train_batch or len(batches[0][1])
            made = plan_model(float_copy(pl_module), batches, self.target, self._techniques, batch_size,
                              cache=self.cache, runs=self.runs)  # fmt: skip  (a copy: the model is not touched)
            planned = _as_state(made)
        plan: dict[str, Any] = trainer.strategy.broadcast(planned, src=0)  # type: ignore[arg-type]  # None off rank 0
        self.plan = plan
        self._configure(trainer, pl_module)
        metric = self.target.metric
        figures = {f"budget/{metric}_{kind}": float(plan[kind][metric]) for kind in ("dense", "predicted")}
        if metric in plan["measured"]:
            figures[f"budget/{metric}_measured"] = float(plan["measured"][metric])
        figures["budget/layers"] = float(len(plan["options"]))
        pl_module.log_dict(figures, on_step=False, on_epoch=True, batch_size=1)
        rank_zero_info(
            f"BudgetPlanner at epoch {self.epoch}: {len(plan['options'])} layers compressed, {metric} dense "
            f"{plan['dense'][metric]:.6g}, predicted {plan['predicted'][metric]:.6g}, measured "
            f"{plan['measured'].get(metric, float('nan')):.6g}; {plan['options']}"
        )

    def _configure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.plan is not None
        sections = self.plan["settings"]
        pruning, low_rank, qat = _callbacks(trainer)
        for prunes in pruning:
            prunes.configure(trainer, pl_module, dict(sections.get("pruning", {}).get("layer_sparsity", {})))
        for factorises in low_rank:
            factorises.configure(dict(sections.get("low_rank", {}).get("ranks", {})))
        quantised = sections.get("quantization", {})
        for quantises in qat:
            quantises.configure(pl_module, list(quantised.get("include", [])), dict(quantised.get("layer_bits", {})))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "plan": self.plan}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.plan = state_dict.get("plan")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._train_batch = None


def _callbacks(
    trainer: pl.Trainer,
) -> tuple[list[MagnitudePruning], list[LowRankFactorization], list[QuantizationAwareTraining]]:
    return (find_callbacks(trainer, MagnitudePruning), find_callbacks(trainer, LowRankFactorization),
            find_callbacks(trainer, QuantizationAwareTraining))  # fmt: skip


def _as_state(plan: Plan) -> dict[str, Any]:
    """The plan as plain data (a checkpoint's, a broadcast's)."""
    return {
        "settings": plan.settings(), "options": {name: str(option) for name, option in plan.options.items()},
        "dense": dict(plan.dense), "predicted": dict(plan.predicted), "measured": dict(plan.measured),
        "seconds": plan.seconds, "target": {"metric": plan.target.metric, "value": plan.target.value},
    }  # fmt: skip


def _validation_batches(trainer: pl.Trainer, count: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``count`` validation batches (the training batches where the fit has no validation)."""
    loaders: Any = trainer.val_dataloaders
    datamodule = getattr(trainer, "datamodule", None)
    if loaders is None and datamodule is not None and hasattr(datamodule, "val_dataloader"):
        loaders = datamodule.val_dataloader()
    if loaders is None:
        loaders = trainer.train_dataloader
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    batches: list[tuple[Tensor, Tensor]] = []
    for batch in loader:
        batches.append((batch_input(batch), batch[1]))
        if len(batches) == count:
            break
    if not batches:
        raise CompressionConfigError("BudgetPlanner found no validation (or training) batch to analyse")
    return batches
