"""``CompressionExport``: at the end of ``fit``, deployable files, verified, and a report of what was bought.

The callback only decides *when* (the end of fit, rank zero) and finds the data; the files,
checks and report come from :func:`lightning_compress.deploy.bundle.write_bundle`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_compress.callbacks.base import CompressionCallback, check_strategy, find_callback
from lightning_compress.callbacks.distillation import KnowledgeDistillation
from lightning_compress.callbacks.quantization import QuantizationAwareTraining
from lightning_compress.core.quantization import quantized_layers, weight_quantizer
from lightning_compress.deploy import report as rep
from lightning_compress.deploy.bundle import FORMATS, write_bundle
from lightning_compress.deploy.cpu import WeightType, resolve_weight_type
from lightning_compress.deploy.folder import check_replaceable
from lightning_compress.deploy.onnx import float_copy
from lightning_compress.deploy.restore import read_checkpoint, restore
from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of, require

LABEL_KEYS = ("target", "label", "labels", "y")  # where a dict batch keeps its labels
BASELINES = ("auto", "teacher", "start", "first_epoch")  # besides a checkpoint path, a module, or None
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # what W&B allows in an artifact's name


class CompressionExport(CompressionCallback):
    """Write the compressed model as ONNX fp32, ONNX int8 QDQ and a checkpoint, verify them, and report.

    At the end of ``fit``, on rank zero: masks are folded; whole zero output channels (pattern
    ``channel``) are removed physically with Torch-Pruning's dependency graph (residual networks
    shrink consistently; where tracing fails the masks stay, with a warning and the reason in the
    report); the files are exported, every ONNX file is run by ONNX Runtime on a real validation
    batch and compared with the PyTorch model (fp32: tight tolerance; int8: against the fake-quant
    model, within 2·√(quantised layers) output quantisation steps and top-1 agreement ≥ 0.9: the
    two round differently layer by layer) — a failed check raises
    :class:`~lightning_compress.errors.ExportVerificationError` and nothing is written. Then
    ``report.json`` (keys documented in :mod:`lightning_compress.deploy.report`), ``report.md`` and PNG
    plots compare the model as fit started with the exported one: params, non-zeros, MACs, bytes
    (raw and compressed), ONNX bytes and ORT latency; and the exported files' ORT accuracy on the validation
    data with a ``baseline``'s — never with the untrained model a fit from scratch starts from.
    ``dirpath`` is replaced as a whole once the new bundle is complete and verified (built beside it and
    swapped in with one rename: :mod:`lightning_compress.deploy.folder`). The headline figures
    (``export/*``) go to every logger.

    Args:
        dirpath: output folder: missing (created), empty, or an earlier export (replaced).
        formats: any of ``onnx``, ``onnx_int8``, ``checkpoint``; default all three when the trainer has
            a ``QuantizationAwareTraining`` callback, else ``onnx`` and ``checkpoint``.
        example_input: a batch to trace and measure with; default the module's
            ``example_input_array`` or the first validation batch (a tuple ``(x, y)`` or a dict with
            ``"input"`` and one of ``"target"``, ``"label"``, ``"labels"``, ``"y"``).
        verify: run the ONNX Runtime checks.
        physical: remove zero channels physically.
        plots: write PNG plots (needs matplotlib).
        val_batches: at most this many validation batches for the ORT accuracy (None: all).
        logits_fn: ``output -> logits`` for a ``forward`` that returns more than the logits; default a
            tensor, a ``logits`` key or attribute, or a tuple's first element (as distillation finds them).
        baseline: what the accuracy is compared with: ``"teacher"`` (the ``KnowledgeDistillation`` teacher),
            ``"start"`` (the model as fit started: a pretrained model being compressed), ``"first_epoch"`` (the
            model at the end of the fit's first epoch), a checkpoint file of this module (e.g. the dense run's,
            read with :func:`~lightning_compress.restore`), an ``nn.Module`` taking the same input, or
            ``None``. ``"auto"`` (default): the teacher when there is one, else the more accurate of
            ``start`` and ``first_epoch`` (a pretrained model is its own baseline; one trained from scratch
            is compared with its first epoch, not with random weights). ``report.json``'s ``baseline`` names it.
        artifact_name: the W&B artifact's name (letters, digits, ``-``, ``_``, ``.``), the same every run so
            W&B keeps the exports as versions of one artifact; default ``compressed-<module class>[-<model>]``
            (a recipe's export: ``compressed-<recipe file name>``).
        int8_weights: how ``model.int8.onnx`` stores its weights: ``"int8"`` (fastest where ONNX Runtime's
            u8s8 kernels are exact: x86 with VNNI, ARM), ``"uint8"`` (zero point 128: the same values, exact
            on every CPU, including x86 without VNNI, where int8 weights saturate), or ``"auto"`` (default: by
            the CPU the export runs and is verified on). ``report.json``'s ``files.onnx_int8`` says which and why.
        pack_weights: store weights of 4 bits or fewer packed in ``model.int8.onnx`` (two or four to a byte;
            ONNX Runtime unpacks them once at load and runs the same integer kernels), where this ONNX Runtime
            does so; otherwise int8 storage and a warning saying why. ``files.onnx_int8.storage`` in
            ``report.json`` names the packed layers.

    Raises:
        CompressionConfigError: an unknown format, ``onnx_int8`` without quantisation-aware
            training, or a ``dirpath`` that cannot be written or holds files that are not a bundle (at setup).

    Example::

        Trainer(callbacks=[MagnitudePruning(0.5, pattern="channel"), QuantizationAwareTraining(start_epoch=6),
                           CompressionExport("exported/")]).fit(model, datamodule)
    """

    def __init__(
        self,
        dirpath: str | os.PathLike[str] = "compressed",
        formats: Sequence[str] | None = None,
        example_input: Tensor | None = None,
        verify: bool = True,
        physical: bool = True,
        plots: bool = True,
        val_batches: int | None = None,
        logits_fn: Callable[[Any], Tensor] | None = None,
        baseline: str | os.PathLike[str] | nn.Module | None = "auto",
        artifact_name: str | None = None,
        int8_weights: WeightType = "auto",
        pack_weights: bool = True,
    ) -> None:
        if not isinstance(dirpath, (str, os.PathLike)):
            raise config_error("dirpath", "a folder path", dirpath)
        self.formats = None if formats is None else rep.check_formats(formats, FORMATS)
        flags = (("verify", verify), ("physical", physical), ("plots", plots), ("pack_weights", pack_weights))
        for name, flag in flags:
            if not isinstance(flag, bool):
                raise config_error(name, "True or False", flag)
        if example_input is not None and not isinstance(example_input, Tensor):
            raise config_error("example_input", "a tensor batch or None", example_input)
        if val_batches is not None and (not isinstance(val_batches, int) or val_batches < 1):
            raise config_error("val_batches", "a positive number of batches or None", val_batches)
        if logits_fn is not None and not callable(logits_fn):
            raise config_error("logits_fn", "a callable or None", logits_fn)
        if baseline is not None and not isinstance(baseline, (str, os.PathLike, nn.Module)):
            raise config_error("baseline", f"{one_of(BASELINES)}, a checkpoint path, a module or None", baseline)
        named = isinstance(artifact_name, str) and ARTIFACT_NAME.fullmatch(artifact_name)
        if artifact_name is not None and not named:
            raise config_error("artifact_name", "a W&B artifact name: letters, digits, '-', '_' and '.'", artifact_name)
        resolve_weight_type(int8_weights)  # a bad value is refused here, with what is allowed
        self.logits_fn, self.int8_weights, self.pack_weights = logits_fn, int8_weights, pack_weights
        self.baseline, self.artifact_name = baseline, artifact_name
        self._first_epoch: nn.Module | None = None
        self.dirpath = Path(dirpath)
        self.example_input = example_input
        self.verify, self.physical, self.plots, self.val_batches = verify, physical, plots, val_batches
        self.report: dict[str, Any] = {}
        self._before: nn.Module | None = None
        self._formats: list[str] = []

    # -- checks before any compute -----------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage != "fit":
            return
        qat = find_callback(trainer, QuantizationAwareTraining) is not None or bool(quantized_layers(pl_module))
        self._formats = list(self.formats or (FORMATS if qat else ("onnx", "checkpoint")))
        if "onnx_int8" in self._formats and not qat:
            raise CompressionConfigError(
                "CompressionExport cannot write `onnx_int8`: the run has no quantisation-aware training, so there "
                "are no int8 scales to export. HINT: add QuantizationAwareTraining(...) to the callbacks, or drop "
                "'onnx_int8' from `formats`"
            )
        for module in ("onnx", "onnxruntime", "onnxscript"):  # before any compute: the extras it needs
            require(module, "export", "CompressionExport")
        if self.plots:
            require("matplotlib", "plots", "CompressionExport(plots=True)")
        if self.baseline == "teacher" and find_callback(trainer, KnowledgeDistillation) is None:
            raise CompressionConfigError(
                "CompressionExport(baseline='teacher') needs a KnowledgeDistillation callback in the Trainer. HINT: "
                "baseline='auto' (the teacher when there is one), 'first_epoch', 'start' or a checkpoint path"
            )
        if isinstance(self.baseline, (str, os.PathLike)) and str(self.baseline) not in BASELINES:
            if not Path(self.baseline).is_file():
                hint = did_you_mean(str(self.baseline), BASELINES)
                raise config_error("baseline", f"{one_of(BASELINES)}, a checkpoint file, a module or None",
                                   self.baseline, hint or "no such file")  # fmt: skip
            read_checkpoint(self.baseline)  # a file that is not a checkpoint fails here, not after training
        if trainer.is_global_zero:
            check_replaceable(self.dirpath)  # before any compute: the export replaces the folder as a whole

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = float_copy(pl_module).cpu() if trainer.is_global_zero else None
        self._first_epoch = None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wanted = self.baseline == "first_epoch" or (self.baseline == "auto" and self._teacher(trainer) is None)
        if wanted and self._first_epoch is None and self._before is not None:
            self._first_epoch = float_copy(pl_module).cpu()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._before = self._first_epoch = None  # the model's float copies: no more than the fit's memory outlives it

    # -- the export ----------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._before is None:
            return
        val = self._val_batches(trainer)
        example = self._example(pl_module, val)
        checkpoint = _plain_checkpoint(trainer, pl_module)
        formats = list(self._formats)
        enabled = any(bool(weight_quantizer(m).enabled) for m in quantized_layers(pl_module).values())
        if "onnx_int8" in formats and self.formats is None and not enabled:
            formats.remove("onnx_int8")
            rank_zero_info(
                "CompressionExport writes no int8 file: no layer is fake-quantised (QAT had not started, or a plan "
                "kept every layer in float)"
            )
        try:
            report = write_bundle(
                pl_module, self._before, self.dirpath, example, val, formats, checkpoint,
                verify=self.verify, physical=self.physical, plots=self.plots, logits_fn=self.logits_fn,
                baselines=self._baselines(trainer, self._before), int8_weights=self.int8_weights,
                pack_weights=self.pack_weights,
            )  # fmt: skip
        finally:
            self._before = self._first_epoch = None
        self.report = report
        self._log(trainer, report)
        message = f"CompressionExport wrote {sorted(report['files'])} and report.json to {self.dirpath}"
        if "checkpoint" in report["files"]:  # a compressed model does not load into a fresh one by itself
            name = type(pl_module).__name__
            message += f"; load it with lightning_compress.restore({name}(...), {str(self.dirpath / 'model.ckpt')!r})"
        if report["baseline"]:
            base, accuracy = report["baseline"], report["after"].get("ort_accuracy", 0.0)
            message += f"; ONNX Runtime top-1 {accuracy:.2%} vs {base['ort_accuracy']:.2%} ({base['source']})"
        rank_zero_info(message)

    def _teacher(self, trainer: pl.Trainer) -> nn.Module | None:
        distillation = find_callback(trainer, KnowledgeDistillation)
        return distillation.teacher if distillation is not None else None

    def _baselines(self, trainer: pl.Trainer, before: nn.Module) -> dict[str, nn.Module]:
        """The candidates :func:`~lightning_compress.deploy.bundle.write_bundle` measures (it reports the best)."""
        if self.baseline is None:
            return {}
        if isinstance(self.baseline, nn.Module):
            return {"given": float_copy(self.baseline)}
        found = self._teacher(trainer)
        teacher = float_copy(found) if found is not None else None
        first = {"first_epoch": self._first_epoch} if self._first_epoch is not None else {}
        if self.baseline == "auto":
            return {"teacher": teacher} if teacher is not None else {"start": before, **first}
        if self.baseline == "teacher" and teacher is not None:
            return {"teacher": teacher}
        if self.baseline == "start":
            return {"start": before}
        if self.baseline == "first_epoch":
            return first or {"start": before}  # a fit that ran no epoch: the model is as it started
        return {Path(self.baseline).name: float_copy(restore(copy.deepcopy(before), self.baseline))}

    def _val_batches(self, trainer: pl.Trainer) -> list[tuple[Tensor, Tensor]]:
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.datamodule is not None:  # type: ignore[attr-defined]
            try:
                loaders = trainer.datamodule.val_dataloader()  # type: ignore[attr-defined]
            except Exception:  # a datamodule without validation data
                loaders = None
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        batches: list[tuple[Tensor, Tensor]] = []
        for i, item in enumerate(loader or []):
            if self.val_batches is not None and i >= self.val_batches:
                break
            if isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[1], Tensor):
                batches.append((item[0].cpu(), item[1].cpu()))
            elif isinstance(item, Mapping) and isinstance(item.get("input"), Tensor):  # {"input": x, "target": y}
                label = next((item[k] for k in LABEL_KEYS if isinstance(item.get(k), Tensor)), None)
                if label is not None:
                    batches.append((item["input"].cpu(), label.cpu()))
        return batches

    def _example(self, pl_module: pl.LightningModule, val: list[tuple[Tensor, Tensor]]) -> Tensor:
        for candidate in (self.example_input, pl_module.example_input_array, val[0][0] if val else None):
            if isinstance(candidate, Tensor):
                return candidate[:2].cpu()
        raise CompressionConfigError(
            "CompressionExport needs an input batch to trace the model: pass `example_input`, set the module's "
            "`example_input_array`, or give the Trainer validation data"
        )

    def _log(self, trainer: pl.Trainer, report: dict[str, Any]) -> None:
        before, after = report["before"], report["after"]
        figures = {f"export/{k}": float(v) for k, v in after.items()}
        for key in ("params", "nonzero_params", "macs", "onnx_bytes", "ort_latency_ms"):
            if before.get(key) and key in after:  # a checkpoint-only export has no file to time
                figures[f"export/{key}_ratio"] = after[key] / before[key]
        if report["baseline"] and "ort_accuracy" in after:  # what the compressed model lost (or gained)
            figures["export/baseline_accuracy"] = report["baseline"]["ort_accuracy"]
            figures["export/accuracy_delta"] = after["ort_accuracy"] - report["baseline"]["ort_accuracy"]
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)
            if type(logger).__name__ == "WandbLogger":
                from lightning_compress.integrations.wandb import log_export

                log_export(logger, report, self.dirpath, self.artifact_name or _artifact_name(trainer.lightning_module))


def artifact_name(*parts: str) -> str:
    """``compressed-<part>-...`` in the letters W&B allows in an artifact's name (others become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(["compressed", *parts]))


def _artifact_name(pl_module: pl.LightningModule) -> str:
    """``compressed-<module class>[-<its hparams' model name>]``: the same every run, so W&B keeps versions."""
    model = dict(getattr(pl_module, "hparams", {})).get("model")
    return artifact_name(type(pl_module).__name__, *([model] if isinstance(model, str) else []))


def _plain_checkpoint(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """What :func:`lightning_compress.restore` reads: the state dict and the compression callbacks' state."""
    callbacks = {}
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        state = callback.state_dict()
        if state and not isinstance(callback, CompressionExport):
            callbacks[callback.state_key] = state
    hparams = dict(getattr(pl_module, "hparams", {}))
    plain = {"state_dict": pl_module.state_dict(), "callbacks": callbacks, "hyper_parameters": hparams}
    trained_on = getattr(pl_module, "trained_on", None)  # ClassificationModule's record of its data
    if isinstance(trained_on, dict) and trained_on:
        plain["trained_on"] = dict(trained_on)
    return plain
