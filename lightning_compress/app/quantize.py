"""``lightning-compress quantize CKPT|RECIPE --calib-batches N --out DIR``: post-training quantisation.

A checkpoint of lightning_compress's ``ClassificationModule`` is restored as trained, with the data it records;
a recipe is trained first as it says (its compression callbacks too, except quantisation and export; to quantise
trained weights without training give it ``model.checkpoint`` and ``--trainer.max_epochs=0``). Then
:func:`lightning_compress.core.quantization.calibrate` observes the ranges on ``N`` training batches (optionally
after cross-layer equalisation, with bias correction), and the same verified bundle ``export`` writes goes to
``DIR``: ``model.onnx``, ``model.int8.onnx``, a checkpoint :func:`lightning_compress.restore` rebuilds (and QAT can
resume from), and the report, whose ``calibration`` section and per-layer rows say what was done, with the float
model's accuracy as the baseline.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from lightning_compress.deploy.cpu import WeightType
from lightning_compress.errors import CompressionConfigError, config_error

RECIPE_SUFFIXES = (".yaml", ".yml")
PTQ_STATE = "PostTrainingQuantization"  # the checkpoint's callbacks key of the calibration state


def quantize_source(
    source: str,
    out: str,
    calib_batches: int = 8,
    weight_bits: int = 8,
    equalize: bool = False,
    bias_correction: bool = False,
    data: str | None = None,
    overrides: Sequence[str] = (),
    python_path: Sequence[str] = (),
    verify: bool = True,
    int8_weights: str = "auto",
    pack_weights: bool = True,
) -> dict[str, Any]:
    """``lightning-compress quantize``: the model of ``source`` (a checkpoint or a recipe) calibrated on
    ``calib_batches`` training batches and written as a bundle into ``out`` (``int8_weights``, ``pack_weights``
    as in :class:`~lightning_compress.CompressionExport`); returns the report."""
    from lightning_compress.core import quantization as q
    from lightning_compress.deploy.bundle import write_bundle
    from lightning_compress.deploy.onnx import float_copy

    if not isinstance(calib_batches, int) or isinstance(calib_batches, bool) or calib_batches < 1:
        raise config_error("--calib-batches", "a positive number of training batches", calib_batches)
    config = q.QuantConfig(weight_bits=q.check_weight_bits("--weight-bits", weight_bits), observer="minmax")
    if Path(source).suffix in RECIPE_SUFFIXES:
        if data is not None:
            raise CompressionConfigError("`--data` is for a checkpoint: a recipe names its data (`data:` section)")
        module, datamodule, checkpoint = _from_recipe(source, overrides, python_path)
    else:
        if overrides:
            raise CompressionConfigError(f"unrecognized arguments for a checkpoint: {' '.join(overrides)}")
        module, datamodule, checkpoint = _from_checkpoint(source, data)
    if q.quantized_layers(module):
        raise CompressionConfigError(
            f"{source!r} already carries fake quantisation (trained with QAT): `quantize` calibrates a float model. "
            "HINT: `lightning-compress export` writes its int8 file as trained"
        )
    train = list(datamodule.train_dataloader())
    val = [(x, y) for x, y in datamodule.val_dataloader()]
    if len(train) < calib_batches:
        raise config_error("--calib-batches", f"at most the {len(train)} training batches the data has", calib_batches)
    module.eval()
    fp32 = float_copy(module)
    before = copy.deepcopy(fp32)
    done = q.calibrate(module, [x for x, _ in train[:calib_batches]], config, equalize=equalize,
                       bias_correction=bias_correction)  # fmt: skip
    checkpoint = {**checkpoint, "state_dict": module.state_dict()}
    checkpoint["callbacks"] = {**(checkpoint.get("callbacks") or {}), PTQ_STATE: done.state()}
    report = write_bundle(
        module, before, out, val[0][0][:2], val, ["onnx", "onnx_int8", "checkpoint"], checkpoint, verify,
        baselines={"fp32": fp32}, int8_weights=cast(WeightType, int8_weights), pack_weights=pack_weights,
        sections={"calibration": calibration_report(done)},
    )  # fmt: skip
    return report


def calibration_report(done: Any) -> dict[str, Any]:
    """The report's ``calibration`` section: batches, samples, equalised pairs, bias corrections."""
    equalized = done.equalized
    return {
        "batches": done.batches,
        "samples": done.samples,
        "scales": "observed",
        "weight_bits": done.config.weight_bits,
        "equalized_pairs": [list(pair) for pair in equalized.pairs] if equalized else None,
        "equalization_skipped": dict(equalized.skipped) if equalized else None,
        "equalization_max_change": equalized.max_change if equalized else None,
        "clipped_pairs": [list(pair) for pair in equalized.clipped] if equalized else None,
        "bias_corrected": dict(done.bias_corrected),
        "bias_uncorrected": list(done.uncorrected),
        "float_layers": list(done.float_layers),
    }


def _from_checkpoint(path: str, data: str | None) -> tuple[Any, Any, dict[str, Any]]:
    from lightning_compress.app.run import check_data, classification_module
    from lightning_compress.config.build import built
    from lightning_compress.deploy.restore import read_checkpoint
    from lightning_compress.vision.data import get_datamodule
    from lightning_compress.vision.module import TRAINED_ON

    checkpoint = dict(read_checkpoint(path))
    module, hparams = classification_module(path, checkpoint)
    trained_on = dict(checkpoint.get(TRAINED_ON) or {})
    name = data or trained_on.get("data") or "mnist5k"
    datamodule = built("--data", lambda: get_datamodule(name, batch_size=int(hparams.get("batch_size", 64) or 64)))
    datamodule.setup("fit")
    check_data(path, trained_on, name, [next(iter(datamodule.val_dataloader()))])
    kept = {k: checkpoint[k] for k in ("hyper_parameters", TRAINED_ON) if k in checkpoint}
    return module, datamodule, kept


def _from_recipe(path: str, overrides: Sequence[str], python_path: Sequence[str]) -> tuple[Any, Any, dict[str, Any]]:
    import lightning.pytorch as pl

    from lightning_compress.config import build_trainer, load_recipe

    recipe = load_recipe(path, overrides, python_path)
    sections = dict(recipe.config.get("compression") or {})
    if "quantization" in sections:
        raise CompressionConfigError(
            f"{path!r} has a `compression.quantization` section (QAT): `quantize` is post-training. HINT: drop the "
            "section to calibrate after the fit, or run `lightning-compress fit` for QAT"
        )
    sections.pop("export", None)  # this command writes the bundle
    pl.seed_everything(recipe.seed, verbose=False)
    from lightning_compress.config.build import Recipe

    training = Recipe({**recipe.config, "compression": sections}, recipe.path, recipe.python_path)
    trainer = build_trainer(training, training.callbacks(), [])
    module = recipe.model()
    datamodule = recipe.datamodule()
    trainer.fit(module, datamodule=datamodule)
    from lightning_compress.vision.module import TRAINED_ON

    kept: dict[str, Any] = {}
    if getattr(module, "hparams", None):
        kept["hyper_parameters"] = dict(module.hparams)
    if getattr(module, "trained_on", None):
        kept[TRAINED_ON] = dict(module.trained_on)
    return module, datamodule, kept
