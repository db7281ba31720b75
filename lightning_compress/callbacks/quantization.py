"""``QuantizationAwareTraining``: fake-quant training inside an ordinary ``lightning.Trainer``.

The callback only decides *when*; the fake quantisation comes from :mod:`lightning_compress.core.quantization`
and the int8 file from :func:`lightning_compress.export_onnx`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress.callbacks.base import (
    CompressionCallback,
    batch_input,
    before_model_change,
    check_epoch,
    check_layer_values,
    check_names,
    check_strategy,
)
from lightning_compress.callbacks.replace import notify
from lightning_compress.core import quantization as core
from lightning_compress.core.attention import expose_attention, unsupported
from lightning_compress.core.graph import find_bn_pairs
from lightning_compress.core.layers import (
    ATTENTION_IN_FLOAT,
    attention_internals,
    follow_replaced,
    per_layer,
    select_layers,
    unsupported_layers,
)
from lightning_compress.core.surgery import swap_modules
from lightning_compress.deploy.restore import QUANTIZATION_KIND
from lightning_compress.errors import CompressionConfigError, config_error

LEFT_IN_FLOAT = (
    "QuantizationAwareTraining leaves in float (excluded, or inside an nn.MultiheadAttention it cannot expose). "
    "HINT: name them in `include` or take them out of `exclude`"
)
LEARNED_CALIBRATION = 8  # training batches that set learned step sizes' start where calibration_batches is 0
SATURATION_WARN = 0.25  # a quantised activation with more of its evaluation values outside its range is named
# (an observed range clips 0-5% of a validation batch; small CNNs two epochs into QAT from scratch 13-18% of
# their logits, whose largest values grow; googlenet four steps from random init 100%)


class QuantizationAwareTraining(CompressionCallback):
    """Fake-quantise Conv/Linear weights and activations from ``start_epoch`` on.

    Weights: symmetric, per output channel (or per tensor), 2–8 bits, BatchNorm folded in
    (Jacob et al. 2018). Activations: the input and output of every quantised layer, per tensor,
    affine, 8 bits, ranges from a min/max or moving-average observer. Straight-through gradients.
    Nothing replaces ``forward``: weights are parametrized, activations quantised by module hooks.
    Everything is attached (disabled) at setup so checkpoints have the same keys in every phase;
    Conv→BatchNorm pairs are found on the first batch by matching tensors, not by tracing code.

    Ranges are observed in training mode; validation counts the values that fall outside them
    (``qat/saturation_max``, the worst quantised activation's share) and warns once, naming the layers,
    where more than :data:`SATURATION_WARN` of an activation clips: BatchNorm running statistics that
    lag the batch statistics the ranges were observed on (``freeze_bn_epoch`` is the remedy), or ranges
    frozen while the model still changed.

    Args:
        start_epoch: first epoch trained with fake quantisation (QAT as the last phase is common).
        weight_bits: 2–8.
        activation_bits: 8.
        per_channel: one weight scale per output channel.
        observer: ``ema`` (moving average of batch min/max) or ``minmax``.
        freeze_observers_epoch: from this epoch on, activation ranges stop changing.
        freeze_bn_epoch: from this epoch on, folded BatchNorms use their running statistics.
        fold_bn: fold Conv→BatchNorm pairs into the quantised weights.
        include: module-name patterns to quantise; default every Conv and Linear layer.
        exclude: module-name patterns to keep in float.
        calibration_batches: with a positive number, the activation ranges start from a calibration: at
            ``start_epoch``, before the first fake-quantised step, that many training batches run through the
            model in eval mode with only the observers on (post-training calibration, as
            :func:`~lightning_compress.core.quantization.calibrate` does), instead of from the first
            training batch. Once per fit (a resumed fit keeps its ranges); each rank calibrates on its own
            batches and the ranges are then made one (the union).
        scales: ``observed`` (the default) or ``learned``: step sizes trained by gradient descent (LSQ, Esser et
            al. 2020) for weights (per channel) and layer inputs / outputs, started from a calibration at
            ``start_epoch`` (``calibration_batches``, or :data:`LEARNED_CALIBRATION` batches where that is 0).
            They are parameters of the model from setup on (in ``self.parameters()``, so in the optimizer
            ``configure_optimizers`` builds, and in checkpoints); under DDP their gradients are averaged by
            this callback. Residual-sum ranges stay observed; ``freeze_observers_epoch`` stops the activation
            steps learning (the weight steps follow ``max|w|`` and keep learning their ratio to it).
        layer_bits: ``{module name or pattern: weight bits}`` for layers with a bit-width of their own (mixed
            precision, e.g. ``{"net.features.0.*": 8, "net.classifier.*": 4}``); the rest take ``weight_bits``.
            A layer that is factorised later passes its bits on to its factors. The int8 file stores weights of
            4 bits or fewer packed (two or four to a byte; see ``CompressionExport(pack_weights=)``).
        state_key_suffix: tells two instances apart in a checkpoint.

    Raises:
        CompressionConfigError: an argument out of range or of the wrong type (at construction);
            no layer to quantise (at setup).

    Example::

        qat = QuantizationAwareTraining(start_epoch=6, freeze_bn_epoch=8, freeze_observers_epoch=9)
        Trainer(max_epochs=10, callbacks=[MagnitudePruning(0.8, end_epoch=5), qat]).fit(model, data)
        export_onnx(model, example, "model.int8.onnx", int8=True)
    """

    kind = QUANTIZATION_KIND
    changes_model = True

    def __init__(
        self,
        start_epoch: int = 0,
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_channel: bool = True,
        observer: Literal["ema", "minmax"] = "ema",
        freeze_observers_epoch: int | None = None,
        freeze_bn_epoch: int | None = None,
        fold_bn: bool = True,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        layer_bits: dict[str, int] | None = None,
        calibration_batches: int = 0,
        scales: Literal["observed", "learned"] = "observed",
        state_key_suffix: str = "",
    ) -> None:
        self.config = core.QuantConfig(
            weight_bits, activation_bits, per_channel, observer, fold_bn=fold_bn, scales=scales
        )
        self.start_epoch: int = _epoch("start_epoch", start_epoch, optional=False) or 0
        self.freeze_observers_epoch = _epoch("freeze_observers_epoch", freeze_observers_epoch)
        self.freeze_bn_epoch = _epoch("freeze_bn_epoch", freeze_bn_epoch)
        for name, value in (("freeze_observers_epoch", freeze_observers_epoch), ("freeze_bn_epoch", freeze_bn_epoch)):
            if value is not None and value < start_epoch:
                raise config_error(name, f">= start_epoch ({start_epoch}) or None", value)
        self.include = check_names("include", include)
        self.exclude = check_names("exclude", exclude)
        self.layer_bits = check_layer_values("layer_bits", layer_bits, _fits_bits, "an integer from 2 to 8")
        if not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool) or calibration_batches < 0:
            raise config_error("calibration_batches", "a whole number of training batches >= 0", calibration_batches)
        self.calibration_batches = calibration_batches
        if scales == "learned" and not calibration_batches:
            self.calibration_batches = LEARNED_CALIBRATION
        self.calibrated = False  # callback state: a resumed fit does not calibrate again
        self._bits: dict[str, int] = {}  # layer_bits resolved to the quantised layers (what a checkpoint keeps)
        self.float_layers: list[str] = []  # quantisable layers a plan keeps in float (see configure)
        self._state_key_suffix = state_key_suffix
        self._linked = False
        self._folded_bns: list[nn.Module] = []
        self._now = self._phase(0)
        self._warned_saturation = False
        self.bn_pairs: dict[str, str] = {}  # {layer: BatchNorm} folded, by name: restore() links them again
        self._ddp_ignored: list[str] = []  # the learned step sizes DDP leaves to this callback, by name
        self._step_sizes: list[nn.Parameter] = []  # the same parameters (what each optimizer step averages)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(bits=self.config.weight_bits, suffix=self._state_key_suffix)

    def _phase(self, epoch: int) -> dict[str, bool]:
        def reached(at: int | None) -> bool:
            return at is not None and epoch >= at

        return {
            "enabled": epoch >= self.start_epoch,
            "observers_frozen": reached(self.freeze_observers_epoch),
            "bn_frozen": reached(self.freeze_bn_epoch),
        }

    # -- attach before any checkpoint is restored; fold BatchNorms once a real batch is at hand ----
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        exposed = expose_attention(pl_module, self.include, self.exclude)
        if exposed:  # the same function, with attention's projections as layers that fake quantisation reaches
            old = swap_modules(pl_module, exposed)
            notify(trainer, pl_module, {name: (old[name], new) for name, new in exposed.items()})
            rank_zero_info(
                f"QuantizationAwareTraining exposes the projections of {sorted(exposed)} to quantise them "
                "(nn.MultiheadAttention -> ProjectedAttention: the same function, in_proj / out_proj as layers)"
            )
        layers = core.attach(pl_module, self.config, self.include, self.exclude)
        if stage == "fit":
            self.float_layers = []  # a resumed fit loads its own list and `calibrated` after this
            self.calibrated = False
        others = [name for name in select_layers(pl_module) if name not in layers]
        self._bits = per_layer("layer_bits", self.layer_bits or {}, layers, left_out=(others, LEFT_IN_FLOAT))
        core.set_weight_bits(pl_module, self._bits)
        self._leave_scales_to_us(pl_module)
        self._linked = False
        self._folded_bns = []
        if stage == "fit":
            floats = _attention_in_float(pl_module)
            floats.update({name: "transposed convolutions are not supported" for name in unsupported_layers(pl_module)})
            for name, reason in floats.items():
                rank_zero_warn(f"QuantizationAwareTraining leaves {name!r} in float: {reason}")

    @override
    def on_modules_replaced(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, replaced: dict[str, tuple[nn.Module, nn.Module]]
    ) -> None:
        """Modules were replaced mid-fit: fake-quantise the new layers (in the
        run's current phase) and find BatchNorm pairs and shared ranges again on the next batch. A replaced
        layer's own bit-width passes to the layers that replace it (its factors), unless ``layer_bits`` names them."""
        self.include = follow_replaced(self.include, pl_module, replaced)  # `include` follows a factorised layer
        layers = core.attach(pl_module, self.config, self.include, self.exclude)
        inherited = {
            name: self._bits[old] for old in replaced if old in self._bits for name in layers
            if name.startswith(f"{old}.")
        }  # fmt: skip
        named = per_layer("layer_bits", self.layer_bits or {}, layers, strict=False)
        self._bits = {name: bits for name, bits in {**self._bits, **inherited, **named}.items() if name in layers}
        core.set_weight_bits(pl_module, self._bits)
        floats = set(self.float_layers)  # a layer kept in float keeps its factors in float
        gone = [old for old in replaced if old in floats]
        self.float_layers = sorted(n for n in layers if n in floats or any(n.startswith(f"{o}.") for o in gone))
        core.keep_in_float(pl_module, self.float_layers)
        core.enable(pl_module, self._now["enabled"])
        core.freeze_observers(pl_module, self._now["observers_frozen"])
        self._leave_scales_to_us(pl_module)  # before replace_modules wraps the model in DDP again
        self._linked = False

    def _leave_scales_to_us(self, pl_module: pl.LightningModule) -> None:
        """Keep the learned step sizes out of DDP's gradient sync (most are unused in any given step: before
        ``start_epoch``, and wherever another quantiser covers a tensor, which DDP would fail on); this callback
        averages their gradients itself (:meth:`on_before_optimizer_step`)."""
        ours = set(self._ddp_ignored)
        theirs = [n for n in getattr(pl_module, "_ddp_params_and_buffers_to_ignore", []) if n not in ours]
        scales = core.learned_scales(pl_module)
        self._ddp_ignored, self._step_sizes = sorted(scales), list(scales.values())
        if self._ddp_ignored or theirs:
            pl_module._ddp_params_and_buffers_to_ignore = [*theirs, *self._ddp_ignored]  # type: ignore[assignment]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scales = core.learned_scales(pl_module)
        groups = [group for optimizer in trainer.optimizers for group in optimizer.param_groups]
        trained = {id(p) for group in groups for p in group["params"]}
        missing = sorted(name for name, param in scales.items() if id(param) not in trained)
        if missing:
            rank_zero_warn(
                f"QuantizationAwareTraining(scales='learned'): {len(missing)} of {len(scales)} step sizes are in no "
                f"optimizer (e.g. {missing[0]!r}), so they will not learn. HINT: build the optimizer from "
                "self.parameters() (the step sizes are parameters of the model from setup on)"
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Under DDP, average the learned step sizes' gradients over the ranks (one all-reduce)."""
        if not self._ddp_ignored or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        # the same quantisers run on every rank, so every rank has gradients for the same ones
        grads = [p.grad for p in self._step_sizes if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for grad, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(chunk.view_as(grad))

    def configure(self, pl_module: pl.LightningModule, include: list[str], layer_bits: dict[str, int]) -> None:
        """Fake-quantise exactly these layers (at ``layer_bits`` where given) and keep the others in float, in
        the file too (a plan made during the fit, before QAT starts: :class:`~lightning_compress.BudgetPlanner`)."""
        checked = check_layer_values("layer_bits", layer_bits, _fits_bits, "an integer from 2 to 8") or {}
        layers = core.quantized_layers(pl_module)
        chosen = per_layer("include", {name: True for name in include}, layers)
        self.layer_bits = dict(checked)
        self._bits = per_layer("layer_bits", self.layer_bits, layers)
        core.set_weight_bits(pl_module, self._bits)
        self.float_layers = sorted(set(layers) - set(chosen))
        core.keep_in_float(pl_module, self.float_layers)
        core.enable(pl_module, self._now["enabled"])
        self._linked = False  # shared ranges, quantised sums and covered inputs follow the float layers

    def _link(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self._linked:
            return
        self._linked = True
        example = batch_input(batch)[:2]
        layers = core.quantized_layers(pl_module)
        if self.config.fold_bn:
            self.bn_pairs = find_bn_pairs(pl_module, layers, example)
            core.link_batchnorms(pl_module, self.bn_pairs)
        self._folded_bns = core.folded_batchnorms(pl_module)
        for name in core.leave_uncalled_in_float(pl_module, example):
            rank_zero_warn(f"QuantizationAwareTraining leaves {name!r} in float: its weight is read, never called")
        shared = core.share_ranges(pl_module, example)
        tails = core.move_to_tails(pl_module, example)
        sums = core.quantize_sums(pl_module, example)
        covered = core.share_inputs(pl_module, example)
        rank_zero_info(
            f"QuantizationAwareTraining: {len(layers)} layers, {len(self._folded_bns)} BatchNorms folded, "
            f"{len(shared)} output ranges shared with the next layer's input, {len(tails)} quantised after the "
            f"ReLU / pooling that follow them, {len(sums)} residual sums quantised, "
            f"{len(covered)} inputs already quantised"
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # the epoch's phase, once
        self._link(pl_module, batch)
        if self._now["enabled"] and self.calibration_batches and not self.calibrated:
            self._calibrate(trainer, pl_module)
        if self._now["bn_frozen"]:
            for bn in self._folded_bns:  # Lightning puts the model back in train mode every epoch
                bn.eval()

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Observe the ranges on ``calibration_batches`` training batches before the first fake-quantised step."""
        self.calibrated = True
        loader = trainer.train_dataloader
        if loader is None:
            return
        device = pl_module.device
        inputs = []
        for batch in loader:
            inputs.append(batch_input(batch).to(device))
            if len(inputs) == self.calibration_batches:
                break
        core.reset_observers(pl_module)
        samples = core.observe(pl_module, inputs)
        core.sync_observers(pl_module)
        learning = core.start_learning(pl_module) if self.config.scales == "learned" else 0
        rank_zero_info(
            f"QuantizationAwareTraining: activation ranges calibrated on {len(inputs)} training batches "
            f"({samples} samples) before the first fake-quantised step"
            + (f"; {learning} step sizes learn from here" if learning else "")
        )

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._link(pl_module, batch)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._now["enabled"] and not trainer.sanity_checking:
            core.watch_saturation(pl_module, True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._now["enabled"] or trainer.sanity_checking:
            return
        shares = core.saturation(pl_module)
        core.watch_saturation(pl_module, False)
        if not shares:
            return
        pl_module.log("qat/saturation_max", max(shares.values()), on_step=False, on_epoch=True, batch_size=1)
        clipping = sorted(((share, name) for name, share in shares.items() if share > SATURATION_WARN), reverse=True)
        if clipping and not self._warned_saturation:
            self._warned_saturation = True
            worst = ", ".join(f"{name!r} {share:.0%}" for share, name in clipping[:3])
            rank_zero_warn(
                f"QuantizationAwareTraining: in validation {len(clipping)} of {len(shares)} quantised activations "
                f"clip more than {SATURATION_WARN:.0%} of their values at the ranges observed in training "
                f"(worst: {worst}): evaluation puts them beyond what the observers saw. Usually BatchNorm's "
                "running statistics lag the batch statistics the ranges were observed on (early in training, or "
                "while the weights change fast), or the ranges were frozen while the model still changed. "
                f"HINT: freeze_bn_epoch={self.start_epoch} (folded BatchNorms on running statistics during QAT), "
                "a later freeze_observers_epoch, or start QAT later"
            )

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._link(pl_module, batch)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._link(pl_module, batch)

    # -- phases ------------------------------------------------------------------------------------
    @override
    def on_epoch_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._now = self._phase(trainer.current_epoch)  # read on every step: computed once an epoch
        if self._now["enabled"]:
            before_model_change(trainer, pl_module, self)
        core.keep_in_float(pl_module, self.float_layers)  # also after a resume: the list is callback state
        core.enable(pl_module, self._now["enabled"])
        core.freeze_observers(pl_module, self._now["observers_frozen"])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._now["enabled"] and not self._now["observers_frozen"]:
            core.sync_observers(pl_module)  # every rank ends each step with the same ranges

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        phase = self._now
        layers = core.quantized_layers(pl_module)
        widths = [high - low for low, high in core.observer_ranges(pl_module).values() if high >= low]
        figures = {
            "qat/enabled": float(phase["enabled"]),
            "qat/weight_bits": float(self.config.weight_bits),
            "qat/activation_bits": float(self.config.activation_bits),
            "qat/observers_frozen": float(phase["observers_frozen"]),
            "qat/bn_frozen": float(phase["bn_frozen"]),
            "qat/quantized_layers": float(len(layers)),
            "qat/calibration_batches": float(self.calibration_batches if self.calibrated else 0),
            "qat/learned_layers": float(sum(core.scale_kinds(m) != "observed" for m in layers.values())),
        }
        if widths:
            figures["qat/range_mean"] = sum(widths) / len(widths)
            figures["qat/range_max"] = max(widths)
        pl_module.log_dict(figures, on_step=False, on_epoch=True, batch_size=1)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "config": self.config.to_dict(),
            "start_epoch": self.start_epoch,
            "bn_pairs": dict(self.bn_pairs),
            "layer_bits": dict(self._bits),
            "float_layers": list(self.float_layers),
            "calibrated": self.calibrated,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.float_layers = list(state_dict.get("float_layers", []))
        self.calibrated = bool(state_dict.get("calibrated", False))
        saved = state_dict.get("config")
        if saved is not None and core.QuantConfig.from_dict(saved) != self.config:
            rank_zero_info(
                "QuantizationAwareTraining: the checkpoint was written with other settings; using the new ones"
            )


def _fits_bits(value: Any) -> bool:
    try:
        core.check_weight_bits("layer_bits", value)
    except CompressionConfigError:
        return False
    return True


def _epoch(name: str, value: Any, optional: bool = True) -> int | None:
    checked = check_epoch(name, value, optional)
    if checked is not None and checked != int(checked):
        raise config_error(name, "a whole epoch number" + (" or None" if optional else ""), value)
    return None if checked is None else int(checked)


def _attention_in_float(model: nn.Module) -> dict[str, str]:
    """``{name: why}`` of the attention left as ``nn.MultiheadAttention`` after the swap that fake quantisation
    cannot reach, for a configuration :class:`ProjectedAttention` does not cover. Attention the layer selection
    leaves out (``include`` / ``exclude``) is the user's choice and is not reported."""
    found: dict[str, str] = {}
    internals = attention_internals(model)
    for name, module in model.named_modules():
        why = unsupported(module) if isinstance(module, nn.MultiheadAttention) else None
        if why is not None:
            found[name] = f"{ATTENTION_IN_FLOAT}; it has {why}, which ProjectedAttention does not cover"
            prefix = f"{name}." if name else ""
            found.update({inner: reason for inner, reason in internals.items() if inner.startswith(prefix)})
    return found
