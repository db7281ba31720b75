"""``MagnitudePruning``: gradual magnitude pruning inside an ordinary ``lightning.Trainer``.

The callback only decides *when* to prune; the masks come from :mod:`lightning_compress.core.pruning`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_compress.callbacks.base import (
    CompressionCallback,
    batch_input,
    before_model_change,
    check_epoch,
    check_layer_values,
    check_names,
    check_strategy,
    distributed,
    is_number,
)
from lightning_compress.core import criteria, graph
from lightning_compress.core import pruning as core
from lightning_compress.core.layers import (
    attention_internals,
    follow_replaced,
    per_layer,
    select_layers,
    unsupported_layers,
    weight_of,
)
from lightning_compress.core.schedules import SCHEDULES, SparsitySchedule
from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of

DEFAULT_SPARSITY = 0.9
LEFT_OUT = (
    "MagnitudePruning does not prune (excluded, frozen, a shared weight's second name, the classifier of channel "
    "pruning or a layer N:M does not fit). HINT: name them in `include` or take them out of `exclude`"
)
UPDATES_PER_RAMP = 16  # default: about 16 mask updates over the ramp ...
MAX_UPDATES_PER_EPOCH = 2  # ... but at most two an epoch (each costs a few ms)


class MagnitudePruning(CompressionCallback):
    """Prune Conv/Linear weights by magnitude (or another ``criterion``) on a schedule while the model trains.

    Masks are boolean buffers on the pruned modules (``weight_mask``), so checkpoints hold them;
    they are multiplied into the weights after every optimizer step (no forward hook, no wrapper,
    no forward overhead). Figures logged (``pruning/*``) are counted from the weight tensors.

    Args:
        final_sparsity: fraction of the selected weights pruned at the end, in ``[0, 1)``. Defaults to
            0.9, or to ``1 - N/M`` for an ``N:M`` pattern (which allows no other value).
        start_epoch: when pruning starts; fractional epochs are allowed.
        end_epoch: when ``final_sparsity`` is reached; default: three quarters of the way from
            ``start_epoch`` to the end of training, leaving the rest to recover.
        initial_sparsity: sparsity of the first pruning step, in ``[0, final_sparsity]``.
        update_frequency: optimizer steps between mask updates; default about 16 updates over the ramp,
            at most two an epoch.
        schedule: ``cubic`` (Zhu & Gupta 2017), ``linear`` or ``constant`` (the final sparsity from
            the start: one-shot pruning at ``start_epoch``).
        scope: ``global`` (one magnitude threshold across all selected layers), ``layer`` or, for
            ``unstructured``, ``lamp`` (one threshold over LAMP scores, Lee et al. 2021, which compare layers
            of different sizes fairly; see :func:`lightning_compress.core.pruning.lamp_scores`).
        pattern: ``unstructured``, ``N:M`` (e.g. ``2:4``, along the input dimension) or ``channel``
            (whole output channels ranked by ``norm``; the last selected layer, normally the
            classifier, is left out unless ``include`` names it; the BatchNorm a conv feeds is
            masked along with it, so a pruned channel outputs exactly zero, and layers feeding the
            same residual add share one mask, so :class:`~lightning_compress.CompressionExport` can
            remove the channels without changing the model).
        norm: channel score, ``l1`` or ``l2``.
        criterion: what ranks the weights or channels (:mod:`lightning_compress.core.criteria`): ``magnitude``
            (the default), ``taylor`` (first-order Taylor importance from the gradients since the last mask
            update, Molchanov et al. 2019), ``fpgm`` (channels: distance to the layer's other filters, He et al.
            2019), ``slimming`` (channels: ``|gamma|`` of their BatchNorm, under an L1 penalty on gamma until
            the end of the ramp, Liu et al. 2017) or ``movement`` (weights: ``-sum g * w`` over the fit, Sanh et
            al. 2020, for fine-tuning pretrained weights). Scores from gradients are checkpointed with the
            callback and agree across DDP ranks (the same synchronised gradients; the masks are rank 0's).
        slimming_strength: the L1 strength on BatchNorm gamma with ``criterion="slimming"`` (>= 0).
        include: module-name patterns (``fnmatch``) to prune; default every Conv and Linear layer that
            trains (frozen layers, ``requires_grad=False``, are left alone unless named).
        exclude: module-name patterns to leave alone.
        fold_on_fit_end: multiply the masks into the weights and drop them when ``fit`` ends (the
            model's ``state_dict`` then loads into its original class); default keeps them for
            further training and for checkpoints.
        layer_sparsity: ``{module name or pattern: sparsity}`` for selected layers pruned to a sparsity of
            their own, each on its own (e.g. ``{"net.fc": 0.3, "net.layer4.*": 0.8}``); the rest share
            ``final_sparsity`` under ``scope``. They ramp on the same schedule, in proportion (half-way to
            ``final_sparsity`` is half-way to each). Layers that share one channel mask (a residual add)
            take one value. Not with ``N:M`` patterns, whose sparsity is fixed.
        state_key_suffix: tells two instances apart in a checkpoint.

    Raises:
        CompressionConfigError: any argument out of range or of the wrong type (at construction);
            no layer selected, or an explicitly included layer that cannot take an N:M pattern
            (at setup).

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[MagnitudePruning(final_sparsity=0.9, end_epoch=6)])
        trainer.fit(model, datamodule)
    """

    kind = "pruning"
    changes_model = True

    def __init__(
        self,
        final_sparsity: float | None = None,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        initial_sparsity: float = 0.0,
        update_frequency: int | None = None,
        schedule: Literal["cubic", "linear", "constant"] = "cubic",
        scope: Literal["global", "layer", "lamp"] = "global",
        pattern: str = "unstructured",
        norm: str = "l1",
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        fold_on_fit_end: bool = False,
        layer_sparsity: dict[str, float] | None = None,
        criterion: Literal["magnitude", "taylor", "fpgm", "slimming", "movement"] = "magnitude",
        slimming_strength: float = criteria.SLIMMING_STRENGTH,
        state_key_suffix: str = "",
    ) -> None:
        self.pattern = core.Pattern.parse(pattern)
        self.criterion = criteria.check_criterion(criterion, self.pattern.kind, str(self.pattern))
        if criterion == "movement" and scope == "lamp":
            raise config_error("scope", "'global' or 'layer' with criterion 'movement' (its scores are signed)", scope)
        if not is_number(slimming_strength) or slimming_strength < 0:
            raise config_error("slimming_strength", "a number >= 0", slimming_strength)
        self.slimming_strength = float(slimming_strength)
        self.final_sparsity = self._check_final(final_sparsity)
        if not is_number(initial_sparsity) or not 0.0 <= initial_sparsity <= self.final_sparsity:
            raise config_error("initial_sparsity", f"in [0, final_sparsity={self.final_sparsity}]", initial_sparsity)
        check_epoch("start_epoch", start_epoch, optional=False)
        if end_epoch is not None and (not is_number(end_epoch) or end_epoch < start_epoch):
            raise config_error("end_epoch", f"a number >= start_epoch ({start_epoch}) or None", end_epoch)
        if update_frequency is not None and (
            not isinstance(update_frequency, int) or isinstance(update_frequency, bool) or update_frequency < 1
        ):
            raise config_error("update_frequency", "a positive number of optimizer steps or None", update_frequency)
        if schedule not in SCHEDULES:
            raise config_error("schedule", one_of(SCHEDULES), schedule, did_you_mean(str(schedule), SCHEDULES))
        if scope not in core.SCOPES:
            raise config_error("scope", one_of(core.SCOPES), scope, did_you_mean(str(scope), core.SCOPES))
        if scope == "lamp" and self.pattern.kind != "unstructured":
            raise config_error("scope", f"'global' or 'layer' with pattern '{self.pattern}' ({core.LAMP_NEEDS})", scope)
        if norm not in core.NORMS:
            raise config_error("norm", one_of(core.NORMS), norm, did_you_mean(str(norm), core.NORMS))
        if not isinstance(fold_on_fit_end, bool):
            raise config_error("fold_on_fit_end", "True or False", fold_on_fit_end)
        self.initial_sparsity = float(initial_sparsity)
        self.start_epoch = float(start_epoch)
        self.end_epoch = None if end_epoch is None else float(end_epoch)
        self.update_frequency = update_frequency
        self.schedule_name = schedule
        self.scope = scope
        self.norm = norm
        self.include = check_names("include", include)
        self.exclude = check_names("exclude", exclude)
        self.fold_on_fit_end = fold_on_fit_end
        self.layer_sparsity = check_layer_values(
            "layer_sparsity", layer_sparsity, lambda v: is_number(v) and 0.0 <= v < 1.0, "a sparsity in [0, 1)"
        )
        if self.layer_sparsity and self.pattern.kind == "n:m":
            raise config_error(
                "layer_sparsity", f"None with pattern '{self.pattern}' (its sparsity is fixed at 1 - N/M)",
                self.layer_sparsity,
            )  # fmt: skip
        if self.layer_sparsity and self.final_sparsity == 0:
            raise config_error(
                "final_sparsity", "> 0 with layer_sparsity (the layers ramp in proportion to it)", self.final_sparsity
            )
        self._targets: dict[str, float] = {}  # layer_sparsity resolved to the selected layers
        self._idle = False  # a plan chose no layer (see configure)
        self._state_key_suffix = state_key_suffix
        # Run state: the schedule position is what a checkpoint keeps (the masks are model buffers).
        self.last_update_step = -1
        self.current_target = 0.0
        self.schedule: SparsitySchedule | None = None
        self._modules: dict[str, nn.Module] = {}
        self._pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._added: list[nn.Module] = []
        self._bns: dict[str, nn.Module] = {}  # channel pattern: BatchNorms masked with their conv's channels
        self._bn_pairs: dict[str, str] | None = None
        self._couplings: list[list[str]] = []  # channel pattern: layers feeding one residual add share a mask
        self._entangled: set[str] = set()  # channel pattern: layers whose channels a LayerNorm / attention mixes
        self._links: dict[str, list[graph.ChannelLink]] = {}  # channel pattern: BatchNorms / grouped convs reached
        self._untraced: str | None = None  # why the couplings could not be traced (warned once)
        self._handles: list[RemovableHandle] = []
        self._stage = "fit"
        self._accumulator: criteria.Accumulator | None = None  # taylor / movement: scores from gradients
        self._saved_scores: dict[str, Any] | None = None  # the accumulator's state, from a checkpoint
        self._fallback_said = False

    def configure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer_sparsity: dict[str, float]) -> None:
        """Prune exactly these layers, each to its sparsity, from now on (a plan made during the fit, before
        pruning starts: :class:`~lightning_compress.BudgetPlanner`); an empty mapping prunes nothing."""
        checked = check_layer_values(
            "layer_sparsity", layer_sparsity, lambda v: is_number(v) and 0.0 <= v < 1.0, "a sparsity in [0, 1)"
        )
        self.layer_sparsity = {name: float(value) for name, value in (checked or {}).items() if value > 0}
        self.include = sorted(self.layer_sparsity)
        self._idle = not self.layer_sparsity
        if self._idle:
            self._modules, self._targets, self._pairs, self.schedule = {}, {}, ([], []), None
            rank_zero_info("MagnitudePruning prunes nothing: the plan leaves every layer dense")
            return
        self.final_sparsity = max(self.layer_sparsity.values())
        self.initial_sparsity = min(self.initial_sparsity, self.final_sparsity)
        self._modules = self._select(pl_module)
        self._targets = per_layer("layer_sparsity", self.layer_sparsity, self._modules)
        self._pairs = self._mask_pairs()
        self._bn_pairs = None  # couplings found again on the next batch, for these layers
        if self.schedule is not None:
            self.schedule = self._build_schedule(trainer)

    def _check_final(self, final_sparsity: float | None) -> float:
        implied = self.pattern.fixed_sparsity
        if implied is not None:
            if final_sparsity is not None and not math.isclose(final_sparsity, implied):
                raise config_error(
                    "final_sparsity", f"{implied} for pattern '{self.pattern}' (1 - N/M) or None", final_sparsity
                )
            return implied
        if final_sparsity is None:
            return DEFAULT_SPARSITY
        if not is_number(final_sparsity) or not 0.0 <= final_sparsity < 1.0:
            raise config_error("final_sparsity", "in [0, 1)", final_sparsity)
        return float(final_sparsity)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            final_sparsity=self.final_sparsity, pattern=str(self.pattern), suffix=self._state_key_suffix
        )

    @property
    def modules(self) -> dict[str, nn.Module]:
        """The pruned modules of the current run, by qualified name (empty outside a run)."""
        return dict(self._modules)

    # -- set-up: select layers and give them masks before any checkpoint is restored --------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage == "fit":  # a new run starts its schedule afresh; a resumed one loads its state after this
            self.last_update_step, self.current_target = -1, 0.0
        self._stage = stage
        self._modules = self._select(pl_module)
        others = [name for name in select_layers(pl_module) if name not in self._modules]
        self._targets = per_layer(
            "layer_sparsity", self.layer_sparsity or {}, self._modules, left_out=(others, LEFT_OUT)
        )
        unsupported = unsupported_layers(pl_module)
        if unsupported and stage == "fit":
            rank_zero_warn(f"MagnitudePruning leaves {unsupported} unpruned: transposed convolutions are not supported")
        # Outside fit, masks are attached only so that a pruned checkpoint can load; teardown
        # removes the ones added here, so validate/test leave the model's structure as it was.
        self._bns = _batchnorms(pl_module) if self.pattern.kind == "channel" else {}
        self._bn_pairs = None
        candidates = [*self._modules.values(), *self._bns.values()]
        self._added = [] if stage == "fit" else [m for m in candidates if not hasattr(m, core.WEIGHT_MASK)]
        core.attach_masks(self._modules, with_bias=self.pattern.kind == "channel")
        core.attach_masks(self._bns, with_bias=True)  # a pruned channel's BatchNorm outputs 0, not beta

    @override
    def on_modules_replaced(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, replaced: dict[str, tuple[nn.Module, nn.Module]]
    ) -> None:
        """Modules were replaced mid-fit: select again (``include``/``exclude``
        decide whether the new layers are pruned), give new layers masks and, once pruning has
        started, prune them at once to the current target (one global threshold over all layers)."""
        if self._idle:
            return
        self.include = follow_replaced(self.include, pl_module, replaced)  # `include` follows a factorised layer
        before = set(map(id, self._modules.values()))
        self._modules = self._select(pl_module)
        self._targets = per_layer("layer_sparsity", self.layer_sparsity or {}, self._modules, strict=False)
        new = {name: m for name, m in self._modules.items() if id(m) not in before}
        if self._stage != "fit":
            self._added += [m for m in new.values() if not hasattr(m, core.WEIGHT_MASK)]
        core.attach_masks(new, with_bias=self.pattern.kind == "channel")
        self._pairs = self._mask_pairs()
        self._bn_pairs = None  # found again on the next batch
        if self._stage == "fit" and self.current_target > 0:
            self.update_masks(self.current_target)

    def _select(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        modules = core.select_prunable(pl_module, self.pattern, self.include, self.exclude)
        seen: set[int] = set()
        for name, module in list(modules.items()):  # a shared weight is pruned (and counted) once
            if id(weight_of(module)) in seen:
                del modules[name]
            seen.add(id(weight_of(module)))
        if self.include is None:  # a frozen layer stays as the user froze it, unless named
            for name in [n for n, m in modules.items() if not weight_of(m).requires_grad]:
                del modules[name]
                rank_zero_info(f"MagnitudePruning leaves {name!r} alone: it is frozen (name it in `include`)")
        if self.pattern.kind == "channel" and self.include is None and modules:
            modules.pop(next(reversed(modules)))  # the classifier's outputs are the classes
        if self.pattern.kind == "channel":
            for name, why in attention_internals(pl_module).items():
                if modules.pop(name, None) is not None:
                    rank_zero_info(f"MagnitudePruning leaves {name!r} out of channel pruning: {why}")
        if self.pattern.kind == "n:m":
            for name, module in list(modules.items()):
                reason = core.nm_incompatibility(module, self.pattern)
                if reason is None:
                    continue
                if self.include is not None:
                    raise core.incompatible_layer_error(name, self.pattern, reason)
                rank_zero_info(f"MagnitudePruning leaves {name!r} out of pattern {self.pattern}: {reason}")
                del modules[name]
        if not modules:
            raise CompressionConfigError(
                f"MagnitudePruning selected no layer of {type(pl_module).__name__} to prune with pattern "
                f"'{self.pattern}' (include={self.include}, exclude={self.exclude}). HINT: prunable layers "
                f"are {[n for n, _ in select_layers(pl_module).items()][:12]}"
            )
        return modules

    # -- the schedule in optimizer steps ---------------------------------------------------------
    def _build_schedule(self, trainer: pl.Trainer) -> SparsitySchedule:
        batches = trainer.num_training_batches
        if math.isinf(batches):
            raise CompressionConfigError(
                "MagnitudePruning converts epochs to optimizer steps and needs a train dataloader with a length"
            )
        steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
        start = round(self.start_epoch * steps_per_epoch)
        total = float(trainer.estimated_stepping_batches)  # inf without max_epochs and max_steps
        if self.end_epoch is not None:
            end = round(self.end_epoch * steps_per_epoch)
        elif math.isinf(total):
            raise config_error("end_epoch", "set when the Trainer has neither max_epochs nor max_steps", None)
        else:
            end = start + max(0, round(0.75 * (total - start)))
        if end == total:  # "by the end of training": the last optimizer step is total - 1
            end = max(start, end - 1)
        elif end > total:
            rank_zero_warn(
                f"MagnitudePruning: end_epoch={self.end_epoch} is past the end of training ({total:.0f} optimizer "
                f"steps): the sparsity will not reach {self.final_sparsity}"
            )
        ramp = max(0, end - start)
        frequency = self.update_frequency or max(1, ramp // UPDATES_PER_RAMP, steps_per_epoch // MAX_UPDATES_PER_EPOCH)
        return SparsitySchedule(self.initial_sparsity, self.final_sparsity, start, end, frequency, self.schedule_name)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.schedule = None if self._idle else self._build_schedule(trainer)
        if self.criterion in criteria.FROM_GRADIENTS:
            self._accumulator = criteria.Accumulator(self.criterion, channel=self.pattern.kind == "channel")
            saved, self._saved_scores = self._saved_scores, None
            if saved is not None and saved.get("criterion") == self.criterion:
                self._accumulator.load_state_dict(saved, pl_module.device)
            elif saved is not None:
                rank_zero_warn(
                    f"MagnitudePruning(criterion={self.criterion!r}) starts its scores afresh: the checkpoint holds "
                    f"{saved.get('criterion')!r} scores, which do not rank the same way"
                )
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._pairs = self._mask_pairs()
        core.apply_masks(self._pairs)

    def _after_optimizer_step(self, *_: Any) -> None:
        core.apply_masks(self._pairs)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.pattern.kind == "channel" and self._bn_pairs is None and self._modules:  # once a batch is at hand
            example = batch_input(batch)[:2]
            self._bn_pairs = graph.find_bn_pairs(pl_module, self._modules, example) if self._bns else {}
            entangled = graph.entangled_layers(pl_module, example)
            for name in sorted(set(entangled) & set(self._modules) - self._entangled):
                rank_zero_info(f"MagnitudePruning leaves {name!r} out of channel pruning: {entangled[name]}")
            self._entangled = set(entangled) & set(self._modules)
            self._couplings = graph.coupled_layers(pl_module, self._modules, example)
            self._links = graph.channel_links(pl_module, example)
            problem = graph.untraced(pl_module, example)
            if problem is not None and problem != self._untraced:
                rank_zero_warn(
                    "MagnitudePruning prunes each layer's channels on its own (no residual couplings, no grouped-conv "
                    "or BatchNorm links), so the export may keep masks: Torch-Pruning could not trace the model: "
                    f"{problem}"
                )
            self._untraced = problem
        step = trainer.global_step
        if self.schedule is None or step == self.last_update_step or not self.schedule.is_update_step(step):
            return
        before_model_change(trainer, pl_module, self)
        self.update_masks(self.schedule.target(step))
        self.last_update_step = step
        self._log(pl_module, on_step=True)

    # -- criteria other than magnitude -------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.schedule is None or not trainer.optimizers or optimizer is not trainer.optimizers[0]:
            return
        if self._accumulator is not None and trainer.global_step < self.schedule.end_step:  # no update follows after
            # the gradients of this step, synchronised across DDP ranks already
            weights = [(name, weight_of(m)) for name, m in self._modules.items() if name not in self._entangled]
            self._accumulator.add({name: (w, w.grad) for name, w in weights})
        if self.criterion == "slimming" and trainer.global_step < self.schedule.end_step:
            for gamma in self._slimmed().values():
                criteria.slimming_penalty_(gamma, self.slimming_strength)

    def _slimmed(self) -> dict[str, Tensor]:
        """``{layer: gamma}``: the pruned layers whose channels a BatchNorm with a scale normalises, and its scale."""
        pairs = self._bn_pairs or {}
        return {
            layer: cast(Tensor, self._bns[bn].weight) for layer, bn in pairs.items()
            if layer in self._modules and bn in self._bns
        }  # fmt: skip

    def _importance(self, weights: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The scores ``criterion`` ranks (``None``: the magnitudes)."""
        if self.criterion == "fpgm":
            return {name: criteria.fpgm_scores(w) for name, w in weights.items()}
        if self.criterion == "slimming":
            found = {name: criteria.slimming_scores(gamma) for name, gamma in self._slimmed().items()}
            found = {name: score for name, score in found.items() if name in weights}
            self._say_fallback(sorted(set(weights) - set(found)), "no BatchNorm with a scale follows them")
            return found
        if self._accumulator is not None and self._accumulator.steps == 0:
            return None  # no step yet (pruning from step 0): magnitudes, as the schedule's first update expects
        if self._accumulator is not None:
            scores = {name: s for name, s in self._accumulator.scores().items() if name in weights}
            missing = sorted(set(weights) - set(scores))
            if missing:  # gradient scores and magnitudes do not compare: this update ranks all by magnitude
                self._say_fallback(sorted(weights), f"no gradient has reached {missing} since the last update "
                                   "(frozen, unused in training, or just replaced)", warn=True)  # fmt: skip
                return None
            return scores
        return None

    def _say_fallback(self, names: list[str], why: str, warn: bool = False) -> None:
        if names and not self._fallback_said:  # once a run of this instance
            self._fallback_said = True
            say = rank_zero_warn if warn else rank_zero_info
            say(f"MagnitudePruning(criterion={self.criterion!r}) ranks {names} by magnitude: {why}")

    def update_masks(self, target: float) -> None:
        """Recompute the masks for ``target`` sparsity, agree on them across ranks, zero the weights."""
        weights = {name: weight_of(m) for name, m in self._modules.items() if name not in self._entangled}
        found = {n: graph.channel_segments(self._links.get(n, []), int(w.shape[0])) for n, w in weights.items()}
        segments = {n: s for n, s in found.items() if s is not None}
        share = target / self.final_sparsity if self.final_sparsity else 0.0  # how far along the ramp
        own = {name: value * share for name, value in self._targets.items() if name in weights}
        masks = core.compute_masks(
            weights, target, self.pattern, self.scope, self.norm, self._couplings, segments, own,
            importance=self._importance(weights),
        )  # fmt: skip
        if self._accumulator is not None:
            self._accumulator.reset()  # taylor: the next update averages the steps from here
        if distributed():
            masks = {name: _broadcast_mask(mask) for name, mask in masks.items()}
        core.set_masks(self._modules, masks)
        for bn, keep in core.batchnorm_masks(masks, self._bn_pairs or {}, self._links, self._bns).items():
            for buffer in (core.WEIGHT_MASK, core.BIAS_MASK):
                getattr(self._bns[bn], buffer).copy_(keep)
        self._pairs = self._mask_pairs()  # a snapshot of the masks that prune something, in the weights' dtype
        core.apply_masks(self._pairs)
        self.current_target = target

    def _mask_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        return core.mask_pairs([*self._modules.values(), *self._bns.values()])

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, pl_module: pl.LightningModule, on_step: bool) -> None:
        """At mask updates the two headline figures (cheap); at epoch end also non-zeros and per layer."""
        figures = {"pruning/sparsity": core.sparsity(self._modules), "pruning/target": self.current_target}
        if not on_step:
            figures["pruning/nonzero_params"] = float(sum(int(torch.count_nonzero(p)) for p in pl_module.parameters()))
            for name, value in core.layer_sparsity(self._modules).items():
                figures[f"pruning/layer/{name}"] = value
        pl_module.log_dict(figures, on_step=on_step, on_epoch=not on_step, batch_size=1)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(pl_module, on_step=False)

    # -- end of fit and checkpoint state ---------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fold_on_fit_end:  # this instance's layers only: another instance may keep its masks
            core.fold_module_masks(self._modules.values())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        core.fold_module_masks(self._added)
        self._added = []
        self._modules = {}
        self._pairs = ([], [])
        self._bns, self._bn_pairs, self._couplings, self._entangled, self._links = {}, None, [], set(), {}
        self._targets = {}
        self.schedule = None

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"kind": self.kind, "last_update_step": self.last_update_step, "current_target": self.current_target}
        if self._accumulator is not None:
            state["scores"] = self._accumulator.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_update_step = int(state_dict.get("last_update_step", -1))
        self.current_target = float(state_dict.get("current_target", 0.0))
        self._saved_scores = state_dict.get("scores")


def _broadcast_mask(mask: Tensor) -> Tensor:
    """Rank zero's mask on every rank (gloo has no bool collectives: sent as uint8)."""
    as_bytes = mask.to(torch.uint8)
    dist.broadcast(as_bytes, src=0)
    return as_bytes.bool()


def _batchnorms(model: nn.Module) -> dict[str, nn.Module]:
    """Every affine BatchNorm of ``model`` (masked along with the channel they follow, if any)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
