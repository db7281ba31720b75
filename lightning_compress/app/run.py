"""Running what the command line asks for, as library code: a recipe's fit or validation, an export.

Shared by :mod:`lightning_compress.app.cli`, :mod:`lightning_compress.app.sweep` and the demo; none of
them imports another's module for it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from lightning_compress.callbacks import CompressionExport
from lightning_compress.config import build_trainer, load_recipe
from lightning_compress.config.build import built
from lightning_compress.config.schema import check_arguments
from lightning_compress.deploy.cpu import WeightType
from lightning_compress.errors import CompressionConfigError


def export_checkpoint(
    path: str,
    out: str,
    data: str | None,
    formats: Sequence[str] | None = None,
    verify: bool = True,
    physical: bool = True,
    baseline: str | None = None,
    int8_weights: str = "auto",
    pack_weights: bool = True,
) -> dict[str, Any]:
    """``lightning-compress export``: rebuild the compressed model from ``path`` and write the bundle; the report
    compares its accuracy with the ``baseline`` checkpoint's (none by default); ``int8_weights`` and
    ``pack_weights`` as in :class:`~lightning_compress.CompressionExport`."""
    from lightning_compress.core.quantization import quantized_layers
    from lightning_compress.deploy.bundle import write_bundle
    from lightning_compress.deploy.onnx import float_copy
    from lightning_compress.deploy.report import check_formats
    from lightning_compress.deploy.restore import read_checkpoint
    from lightning_compress.vision.data import get_datamodule
    from lightning_compress.vision.module import TRAINED_ON, ClassificationModule

    checkpoint = read_checkpoint(path)
    model, hparams = classification_module(path, checkpoint)
    before = float_copy(ClassificationModule(**hparams))
    baselines = {}
    if baseline:  # e.g. the dense run's checkpoint: what the compressed accuracy is compared with
        baselines[Path(baseline).name] = classification_module(baseline, read_checkpoint(baseline))[0]
    trained_on = dict(checkpoint.get(TRAINED_ON) or {})
    data = data or trained_on.get("data") or "mnist5k"
    datamodule = built("--data", lambda: get_datamodule(data, batch_size=250))
    datamodule.setup("fit")
    val = [(x, y) for x, y in datamodule.val_dataloader()]
    check_data(path, trained_on, data, val)
    default = ["onnx", "checkpoint"] + (["onnx_int8"] if quantized_layers(model) else [])
    chosen = check_formats(formats, ("onnx", "onnx_int8", "checkpoint")) if formats else default
    if "onnx_int8" in chosen and not quantized_layers(model):
        raise CompressionConfigError(f"{path!r} has no fake quantisation: `onnx_int8` needs a run with QAT")
    report = write_bundle(
        model, before, out, val[0][0][:2], val, chosen, dict(checkpoint), verify, physical, baselines=baselines,
        int8_weights=cast(WeightType, int8_weights), pack_weights=pack_weights,
    )
    after, first = report["after"], report["before"]
    accuracy = 100 * after.get("ort_accuracy", 0.0)
    print(f"wrote {', '.join(sorted(report['files']))} and report.json to {out}")
    line = f"params {first['params']:,.0f} -> {after['params']:,.0f}; ONNX Runtime top-1 {accuracy:.2f}%"
    if report["baseline"]:
        line += f" (baseline {baseline}: {100 * report['baseline']['ort_accuracy']:.2f}%)"
    print(line)
    return report


def classification_module(path: str, checkpoint: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The ``ClassificationModule`` a checkpoint of one describes, its weights restored; and its hyper-parameters."""
    from lightning_compress.deploy.restore import restore
    from lightning_compress.vision.module import ClassificationModule

    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if not isinstance(hparams.get("model"), str):
        raise CompressionConfigError(
            f"`export` needs a checkpoint of lightning_compress's ClassificationModule (with a named model), and "
            f"{path!r} has none. HINT: for your own LightningModule add CompressionExport(...) to its Trainer"
        )
    problems = check_arguments("hyper_parameters.", ClassificationModule, hparams)
    if problems:
        wrong = "; ".join(problems)
        raise CompressionConfigError(f"the checkpoint {path!r} has hyper-parameters that do not fit: {wrong}")
    return restore(built("hyper_parameters", lambda: ClassificationModule(**hparams)), checkpoint).eval(), hparams


def check_data(path: str, trained_on: dict[str, Any], data: str, val: list[tuple[Any, Any]]) -> None:
    """Refuse validation data that is not what the checkpoint was trained on (its recorded data / input shape):
    the figures and checks would describe another data set."""
    if trained_on.get("data") not in (None, data):
        raise CompressionConfigError(
            f"the checkpoint {path!r} was trained on {trained_on['data']!r} and `--data` is {data!r}. "
            f"HINT: --data {trained_on['data']} (the default: the data the checkpoint records)"
        )
    shape = list(val[0][0].shape[1:]) if val else None
    if trained_on.get("input_shape") not in (None, shape):
        raise CompressionConfigError(
            f"the checkpoint {path!r} was trained on inputs of shape {trained_on['input_shape']} and `--data` "
            f"{data!r} gives {shape}"
        )


def fit_recipe(
    path: str, overrides: Sequence[str], print_config: bool = False, train: bool = True, python_path: Sequence[str] = ()
) -> int:
    """``lightning-compress fit`` / ``validate``: load and validate the recipe; train it when ``train``."""
    import yaml

    recipe = load_recipe(path, overrides, python_path)
    if print_config:
        print(yaml.safe_dump(recipe.config, sort_keys=False), end="")
        return 0
    if not train:  # build everything a fit would, short of reading the data: a missing teacher file fails here
        callbacks = recipe.callbacks()
        recipe.datamodule()
        recipe.model()
        build_trainer(recipe, list(callbacks), [])  # the Trainer appends its own callbacks to the list
        print(f"{path}: valid ({', '.join(type(c).__name__ for c in callbacks) or 'no compression'})")
        return 0
    print({k: round(v, 4) for k, v in train_recipe(path, overrides, python_path=python_path).items()})
    return 0


def train_recipe(
    path: str,
    overrides: Sequence[str],
    run_name: str | None = None,
    log_dir: str | None = None,
    python_path: Sequence[str] = (),
) -> dict[str, float]:
    """Train a recipe; return the final logged figures and ``model_bytes``: the exported ONNX file (int8
    when written, else fp32) zlib-compressed, as shipped over the wire, so pruned zeros count; without
    an export, the weights in a bitmap sparse format."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_compress.deploy.measure import sparse_bytes

    recipe = load_recipe(path, overrides, python_path)
    pl.seed_everything(recipe.seed, verbose=False)
    callbacks = recipe.callbacks()
    loggers = recipe.loggers(run_name)
    if not loggers and log_dir is not None:
        loggers = [CSVLogger(log_dir, name=run_name or "run")]
    trainer = build_trainer(recipe, callbacks, loggers)
    model = recipe.model()
    try:
        trainer.fit(model, datamodule=recipe.datamodule())
    finally:  # a W&B run left open would take the next trial's logging (wandb.init returns the open run)
        if any(type(logger).__name__ == "WandbLogger" for logger in loggers):
            from lightning_compress.integrations.wandb import finish_run

            finish_run()
    figures = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    export = next((c for c in callbacks if isinstance(c, CompressionExport)), None)
    files = export.report.get("files", {}) if export is not None else {}
    onnx = files.get("onnx_int8") or files.get("onnx")
    if export is not None and onnx is not None:
        figures["model_bytes"] = float(len(zlib.compress(Path(onnx["path"]).read_bytes(), 9)))
    else:
        figures["model_bytes"] = float(sparse_bytes(model))
    return figures
