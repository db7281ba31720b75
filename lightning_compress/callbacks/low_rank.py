"""``LowRankFactorization``: replace layers with factorised ones at the start of epoch N, mid-fit.

The callback only decides *when*; the factorisations come from :mod:`lightning_compress.core.low_rank`
and the swap (optimizers, schedulers, DDP, other callbacks) from
:func:`lightning_compress.callbacks.replace.replace_modules`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_compress.callbacks.base import (
    CompressionCallback,
    batch_input,
    before_model_change,
    check_layer_values,
    check_names,
    check_strategy,
)
from lightning_compress.callbacks.replace import notify, replace_modules
from lightning_compress.core import low_rank as core
from lightning_compress.core.layers import matches, per_layer, select_layers
from lightning_compress.errors import CompressionConfigError, config_error

DEFAULT_RATIO = 0.5


class LowRankFactorization(CompressionCallback):
    """Factorise the selected Linear/Conv2d layers at the start of epoch ``epoch``, then train on.

    Linear layers by truncated SVD (two Linears); Conv2d by spatial SVD (``k×k`` to ``r`` channels,
    then ``1×1``) or Tucker-2 (``1×1``, ``k×k``, ``1×1``; Kim et al. 2016). The rank of each layer
    comes from one rule: a fixed ``rank``, a parameter ``ratio`` per layer (default 0.5), or the
    singular-value ``energy`` to keep. A layer whose factorisation would not save parameters, a
    grouped/depthwise conv, or (with a fixed rank) a layer smaller than the rank is left alone,
    and the reason is logged. The swap goes through :func:`~lightning_compress.callbacks.replace.replace_modules`:
    optimizers keep the state of every untouched parameter, LR schedulers keep their place, DDP is
    re-wrapped, pruning masks and QAT fake-quantise the new layers.

    A checkpoint taken after the factorisation resumes (the factorised structure is rebuilt from
    the checkpoint's keys before its weights load), and :func:`lightning_compress.restore` rebuilds
    it in a fresh model.

    Args:
        epoch: the epoch at whose start the layers are factorised (0: before any training).
        rank: a fixed rank for every selected layer.
        ratio: each factorised layer keeps at most this fraction of its parameters, in (0, 1).
        energy: keep the smallest rank holding this fraction of the squared singular values, in (0, 1].
        include: module-name patterns to factorise; default every Linear and Conv2d.
        exclude: module-name patterns to leave alone.
        conv_method: ``svd`` (spatial SVD) or ``tucker2``.
        ranks: ``{module name or pattern: rank}`` for layers with a rank of their own (e.g. ``{"net.fc": 8}``);
            the others follow ``rank`` / ``ratio`` / ``energy``. A layer named here is factorised even where
            the default leaves it alone (the classifier, a small fan-in); one that cannot be is an error at
            setup, naming it and why.
        state_key_suffix: tells two instances apart in a checkpoint.

    Raises:
        CompressionConfigError: bad settings (at construction); no layer selected, or a fixed rank not
            below the smallest dimension of every selected layer (at setup).

    Example::

        Trainer(max_epochs=10, callbacks=[LowRankFactorization(epoch=3, ratio=0.5, exclude=["classifier.3"])])
    """

    kind = "low_rank"
    changes_model = True

    def __init__(
        self,
        epoch: int = 0,
        rank: int | None = None,
        ratio: float | None = None,
        energy: float | None = None,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        conv_method: Literal["svd", "tucker2"] = "svd",
        ranks: dict[str, int] | None = None,
        state_key_suffix: str = "",
    ) -> None:
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise config_error("epoch", "a whole epoch number >= 0", epoch)
        if rank is None and ratio is None and energy is None:
            ratio = DEFAULT_RATIO
        core.check_settings(rank, ratio, energy, conv_method)
        self.epoch = epoch
        self.rank, self.ratio, self.energy = rank, ratio, energy
        self.conv_method = conv_method
        self.include = check_names("include", include)
        self.exclude = check_names("exclude", exclude)
        self.ranks = check_layer_values(
            "ranks", ranks, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"
        )
        self._state_key_suffix = state_key_suffix
        self.factorized: dict[str, dict[str, Any]] = {}  # what a checkpoint keeps: {layer: kind, ranks, params}
        self.skipped: dict[str, str] = {}
        self._trainer: weakref.ReferenceType[pl.Trainer] | None = None  # weak: the hook lives on the model
        self._hook: RemovableHandle | None = None
        self._example: Tensor | None = None  # two inputs of the first batch: which layers forward calls
        self._idle = False  # a plan chose no layer (see configure)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(suffix=self._state_key_suffix)

    # -- set-up: check the selection; rebuild the structure whenever a factorised checkpoint loads --
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage == "fit":
            self.factorized, self.skipped = {}, {}
        if not any(isinstance(m, core.LowRank) for m in pl_module.modules()):  # a model not factorised yet
            self._check_selection(pl_module)
        self.teardown(trainer, pl_module, stage)  # one hook, on this model only
        self._trainer = weakref.ref(trainer)
        self._hook = pl_module.register_load_state_dict_pre_hook(self._rebuild_before_loading)

    def _check_selection(self, pl_module: nn.Module) -> None:
        exposable = [f"{name}.in_proj" for name in core.attention_to_expose(pl_module, self.include, self.exclude)]
        include = self.include  # a pattern for an attention's `in_proj` names a layer that exposing it creates
        if include is not None and exposable:
            include = [p for p in include if not any(matches(n, [p]) for n in exposable)] or None
            if include is None:
                return
        layers = select_layers(pl_module, include, self.exclude)
        if not layers:
            raise CompressionConfigError(
                f"LowRankFactorization selected no Linear/Conv2d layer of {type(pl_module).__name__} "
                f"(include={self.include}, exclude={self.exclude})"
            )
        core.check_ranks(pl_module, per_layer("ranks", self.ranks or {}, [*layers, *exposable]))
        smallest = {name: core.smallest_dimension(m) for name, m in layers.items()}
        if self.rank is not None and all(d <= self.rank for d in smallest.values()):
            raise config_error("rank", f"below the smallest dimension of a selected layer {smallest}", self.rank)

    def configure(self, ranks: dict[str, int]) -> None:
        """Factorise exactly these layers at these ranks when the epoch comes (a plan made during the fit:
        :class:`~lightning_compress.BudgetPlanner`); an empty mapping factorises nothing."""
        checked = check_layer_values(
            "ranks", ranks, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"
        )
        self.ranks = dict(checked or {})
        self.include = sorted(self.ranks)
        self._idle = not self.ranks
        if self._idle:
            rank_zero_info("LowRankFactorization factorises nothing: the plan leaves every layer whole")

    def _rebuild_before_loading(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        rebuilt = core.rebuild(module, local)
        trainer = self._trainer() if self._trainer is not None else None
        if rebuilt and trainer is not None and isinstance(module, pl.LightningModule):
            factorised = {name: new for name, (_, new) in rebuilt.items() if isinstance(new, core.LowRank)}
            self.factorized.update({name: core.describe(new).to_dict() for name, new in factorised.items()})
            notify(trainer, module, rebuilt)  # masks and fake-quant for the new layers, before their keys load

    # -- the factorisation ---------------------------------------------------------------------------
    @override
    def on_epoch_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.epoch or self.factorized or self._idle:
            return
        if any(isinstance(m, core.LowRank) for m in pl_module.modules()):
            rank_zero_info("LowRankFactorization: the model is factorised already (an earlier fit); nothing to do")
            self.factorized = {name: core.describe(m).to_dict() for name, m in pl_module.named_modules()
                               if isinstance(m, core.LowRank)}  # fmt: skip
            return
        before_model_change(trainer, pl_module, self)
        example = self._example if self._example is not None else pl_module.example_input_array
        exposed = core.attention_to_expose(pl_module, self.include, self.exclude)
        if exposed:  # attention's projections become layers that are called, and can be factorised
            replace_modules(trainer, pl_module, exposed)
            rank_zero_info(
                f"LowRankFactorization exposes the projections of {sorted(exposed)} (nn.MultiheadAttention -> "
                "ProjectedAttention, the same function with in_proj / out_proj as layers)"
            )
        chosen, self.skipped = core.plan(
            pl_module, self.rank, self.ratio, self.energy, self.conv_method, self.include, self.exclude,
            example=example if isinstance(example, Tensor) else None, ranks=self.ranks,
        )
        self._example = None
        replace_modules(trainer, pl_module, {name: new for name, (new, _) in chosen.items()})
        self.factorized = {name: result.to_dict() for name, (_, result) in chosen.items()}
        before = sum(f["params_before"] for f in self.factorized.values())
        after = sum(f["params_after"] for f in self.factorized.values())
        ranks = {name: f["ranks"] for name, f in self.factorized.items()}
        rank_zero_info(
            f"LowRankFactorization at epoch {trainer.current_epoch}: {len(chosen)} layers, {before:,} -> {after:,} "
            f"parameters; ranks {ranks}"
        )
        for name, reason in self.skipped.items():
            rank_zero_info(f"LowRankFactorization leaves {name!r} alone: {reason}")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._example is None and not self.factorized:
            self._example = batch_input(batch)[:2].detach()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # factorises at the epoch's first batch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.factorized:
            return
        figures = {
            "lowrank/layers": float(len(self.factorized)),
            "lowrank/params_before": float(sum(f["params_before"] for f in self.factorized.values())),
            "lowrank/params_after": float(sum(f["params_after"] for f in self.factorized.values())),
            "lowrank/model_params": float(sum(p.numel() for p in pl_module.parameters())),
        }
        for name, result in self.factorized.items():
            figures[f"lowrank/rank/{name}"] = float(min(result["ranks"]))
        pl_module.log_dict(figures, on_step=False, on_epoch=True, batch_size=1)

    # -- end of fit and checkpoint state -----------------------------------------------------------
    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._trainer, self._example = None, None, None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "epoch": self.epoch, "factorized": self.factorized}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.factorized.update(state_dict.get("factorized", {}))
