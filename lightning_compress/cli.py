"""The ``lightning-compress`` command. Exit codes: 0 ok, 2 bad input."""

from __future__ import annotations

import argparse
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_compress.errors import CompressionConfigError, TrainingDivergedError
from lightning_compress.report import ExportVerificationError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-compress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a CNN dense, with 90%% GMP and with GMP + QAT int8 on embedded data; print the table"
    )
    demo.add_argument("--model", default="cnn_small", help="a registered model name (default: cnn_small)")
    demo.add_argument("--data", default="mnist5k", help="digits or mnist5k (default: mnist5k)")
    demo.add_argument("--epochs", type=int, default=6)
    demo.add_argument("--sparsity", type=float, default=0.9)
    demo.add_argument("--seed", type=int, default=0)
    pipeline = commands.add_parser(
        "pipeline", help="the main job: dense teacher, then low-rank + GMP + QAT + KD student, export; print the table"
    )
    pipeline.add_argument("--data", default="mnist5k", help="digits or mnist5k (default: mnist5k)")
    pipeline.add_argument("--teacher-epochs", type=int, default=6)
    pipeline.add_argument("--epochs", type=int, default=8)
    pipeline.add_argument("--seed", type=int, default=0)
    pipeline.add_argument("--out", default=None, help="keep the exported files here (default: a temporary folder)")
    for name, text in (("fit", "train with a recipe's compression callbacks"), ("validate", "check a recipe")):
        command = commands.add_parser(name, help=f"{text}; override any key with --a.b.c=VALUE", allow_abbrev=False)
        command.add_argument("recipe", help="a recipe YAML file (see recipes/)")
        command.add_argument("--print-config", action="store_true", help="print the resolved recipe and stop")
    sweep = commands.add_parser(
        "sweep", help="run a W&B sweep file locally (grid or random); write a CSV and a Pareto plot"
    )
    sweep.add_argument("sweep", help="a sweep YAML file in W&B's format (see recipes/sweeps/)")
    sweep.add_argument("--count", type=int, default=4, help="trials to run (default: 4)")
    sweep.add_argument("--out", default="sweep", help="output folder for results.csv, pareto.png and the runs")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the random search")
    export = commands.add_parser(
        "export", help="write verified ONNX fp32 / int8 files, a checkpoint and a report from a checkpoint"
    )
    export.add_argument("checkpoint", help="a checkpoint of lightning_compress's ClassificationModule")
    export.add_argument("--out", default="compressed", help="output folder (default: compressed)")
    export.add_argument("--data", default="mnist5k", help="validation data for the checks and accuracy")
    export.add_argument("--formats", nargs="+", default=None, help="onnx, onnx_int8, checkpoint (default: all it can)")
    export.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime checks")
    export.add_argument("--no-physical", action="store_true", help="keep zero channels (no physical removal)")
    return parser


def export_checkpoint(
    path: str, out: str, data: str, formats: Sequence[str] | None = None, verify: bool = True, physical: bool = True
) -> dict[str, Any]:
    """``lightning-compress export``: rebuild the compressed model from ``path`` and write the bundle."""
    from lightning_compress.bundle import write_bundle
    from lightning_compress.data import get_datamodule
    from lightning_compress.export import float_copy
    from lightning_compress.module import ClassificationModule
    from lightning_compress.quantization import quantized_layers
    from lightning_compress.report import check_formats
    from lightning_compress.restore import read_checkpoint, restore

    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if not isinstance(hparams.get("model"), str):
        raise CompressionConfigError(
            f"`export` needs a checkpoint of lightning_compress's ClassificationModule (with a named model), and "
            f"{path!r} has none. HINT: for your own LightningModule add CompressionExport(...) to its Trainer"
        )
    model = restore(ClassificationModule(**hparams), checkpoint).eval()
    before = float_copy(ClassificationModule(**hparams))
    datamodule = get_datamodule(data, batch_size=250)
    datamodule.setup("fit")
    val = [(x, y) for x, y in datamodule.val_dataloader()]
    default = ["onnx", "checkpoint"] + (["onnx_int8"] if quantized_layers(model) else [])
    chosen = check_formats(formats, ("onnx", "onnx_int8", "checkpoint")) if formats else default
    if "onnx_int8" in chosen and not quantized_layers(model):
        raise CompressionConfigError(f"{path!r} has no fake quantisation: `onnx_int8` needs a run with QAT")
    report = write_bundle(
        model, before, out, val[0][0][:2], val, chosen, dict(checkpoint), verify, physical, before_accuracy=False
    )
    after, first = report["after"], report["before"]
    accuracy = 100 * after.get("ort_accuracy", 0.0)
    print(f"wrote {', '.join(sorted(report['files']))} and report.json to {out}")
    print(f"params {first['params']:,.0f} -> {after['params']:,.0f}; ONNX Runtime top-1 {accuracy:.2f}%")
    return report


def fit_recipe(path: str, overrides: Sequence[str], print_config: bool = False, train: bool = True) -> int:
    """``lightning-compress fit`` / ``validate``: load and validate the recipe; train it when ``train``."""
    import yaml

    from lightning_compress.recipe import load_recipe

    recipe = load_recipe(path, overrides)
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
    print({k: round(v, 4) for k, v in train_recipe(path, overrides).items()})
    return 0


def build_trainer(recipe: Any, callbacks: list[Any], loggers: list[Any]) -> Any:
    """``lightning.Trainer`` from the recipe; Lightning's own refusals become a :class:`CompressionConfigError`."""
    import lightning.pytorch as pl

    try:
        return pl.Trainer(callbacks=callbacks, logger=loggers or False, **recipe.trainer_kwargs())
    except (ValueError, TypeError) as err:  # MisconfigurationException is a ValueError
        raise CompressionConfigError(f"trainer: {err}") from None


def train_recipe(
    path: str, overrides: Sequence[str], run_name: str | None = None, log_dir: str | None = None
) -> dict[str, float]:
    """Train a recipe; return the final logged figures and ``model_bytes``: the exported ONNX file (int8
    when written, else fp32) zlib-compressed, as shipped over the wire, so pruned zeros count; without
    an export, the weights in a bitmap sparse format."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_compress.callbacks import CompressionExport
    from lightning_compress.measure import sparse_bytes
    from lightning_compress.recipe import load_recipe

    recipe = load_recipe(path, overrides)
    pl.seed_everything(recipe.seed, verbose=False)
    callbacks = recipe.callbacks()
    loggers = recipe.loggers(run_name)
    if not loggers and log_dir is not None:
        loggers = [CSVLogger(log_dir, name=run_name or "run")]
    trainer = build_trainer(recipe, callbacks, loggers)
    model = recipe.model()
    trainer.fit(model, datamodule=recipe.datamodule())
    figures = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    export = next((c for c in callbacks if isinstance(c, CompressionExport)), None)
    files = export.report.get("files", {}) if export is not None else {}
    onnx = files.get("onnx_int8") or files.get("onnx")
    if export is not None and onnx is not None:
        figures["model_bytes"] = float(len(zlib.compress(Path(onnx["path"]).read_bytes(), 9)))
    else:
        figures["model_bytes"] = float(sparse_bytes(model))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args, extra = _parser().parse_known_args(argv)
    if extra and args.command not in ("fit", "validate"):
        _parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in ("fit", "validate"):
            return fit_recipe(args.recipe, extra, args.print_config, train=args.command == "fit")
        if args.command == "sweep":
            from lightning_compress.sweep import run_sweep

            rows = run_sweep(args.sweep, args.count, args.out, args.seed)
            print(f"{len(rows)} trials; results.csv and pareto.png in {args.out}")
            for row in rows:
                print(row)
        if args.command == "pipeline":
            from lightning_compress.demo import run_pipeline

            run_pipeline(args.data, args.teacher_epochs, args.epochs, args.seed, args.out)
        if args.command == "demo":
            from lightning_compress.demo import run_demo

            run_demo(args.model, args.data, args.epochs, args.sparsity, args.seed)
        elif args.command == "export":
            export_checkpoint(
                args.checkpoint, args.out, args.data, args.formats, not args.no_verify, not args.no_physical
            )
    except CompressionConfigError as err:
        print(f"lightning-compress: error: {err}", file=sys.stderr)
        return 2
    except TrainingDivergedError as err:
        print(f"lightning-compress: error: {err}", file=sys.stderr)
        return 1
    except ExportVerificationError as err:  # the run worked, its export did not reproduce it: nothing written
        print(f"lightning-compress: export failed verification, nothing written: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
