"""The ``lightning-compress`` command: argument parsing and dispatch to :mod:`lightning_compress.app.run`.

Exit codes: 0 ok, 2 bad input (a one-paragraph message naming the key), 1 a run that failed (diverged, an
export that failed verification, a full disk, ...; the traceback with ``LIGHTNING_COMPRESS_DEBUG=1``),
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lightning_compress.deploy.cpu import WEIGHT_TYPES
from lightning_compress.errors import CompressionConfigError, ExportVerificationError, TrainingDivergedError


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("lightning-compress")
    except PackageNotFoundError:  # run from a checkout that is not installed
        installed = "(not installed)"
    parser = argparse.ArgumentParser(prog="lightning-compress", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed}")
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
    pipeline.add_argument(
        "--out", default="demo-output", help="the folder it keeps its results in: ONNX files, the compressed bundle "
        "(report, plots) and results.md (default: demo-output)"
    )
    for name, text in (("fit", "train with a recipe's compression callbacks"), ("validate", "check a recipe")):
        command = commands.add_parser(name, help=f"{text}; override any key with --a.b.c=VALUE", allow_abbrev=False)
        command.add_argument("recipe", help="a recipe YAML file (see recipes/)")
        command.add_argument("--print-config", action="store_true", help="print the resolved recipe and stop")
        command.add_argument(
            "--python-path", action="append", default=[], metavar="DIR",
            help="a folder a class_path may be imported from (repeatable; the current folder is not searched)",
        )  # fmt: skip
    sweep = commands.add_parser(
        "sweep", help="run a W&B sweep file locally (grid or random); write a CSV and a Pareto plot"
    )
    sweep.add_argument("sweep", help="a sweep YAML file in W&B's format (see recipes/sweeps/)")
    sweep.add_argument("--count", type=int, default=4, help="trials to run (default: 4)")
    sweep.add_argument("--out", default="sweep", help="output folder for results.csv, pareto.png and the runs")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the random search")
    sweep.add_argument(
        "--wandb-project", default=None, metavar="PROJECT", help="log each trial, the results and the Pareto front to "
        "this W&B project (offline with WANDB_MODE=offline)"
    )
    sweep.add_argument(
        "--check", action="store_true", help="run one short trial and check the sweep's metric is logged (before "
        "`wandb sweep`: W&B's agent cannot tell a trial its metric)"
    )
    plan = commands.add_parser(
        "plan", help="choose per-layer settings that meet a latency / bytes / params / MACs target; write a recipe",
        allow_abbrev=False,
    )  # fmt: skip
    plan.add_argument("recipe", help="a recipe YAML file: its model, data and trainer (see recipes/)")
    plan.add_argument(
        "--target", required=True, help="latency=0.5 (a ratio of the dense fp32 model), latency=2.5ms, bytes=200000, "
        "params=0.3 or macs=0.5"
    )  # fmt: skip
    plan.add_argument(
        "--techniques", default="channel,int8", help="comma-separated: channel or unstructured, low_rank, int8, int4 "
        "(default: channel,int8)"
    )  # fmt: skip
    plan.add_argument("--out", required=True, help="the planned recipe to write (YAML)")
    plan.add_argument("--epochs", type=int, default=1, help="warm-up epochs before the analysis (default: 1)")
    plan.add_argument("--batches", type=int, default=4, help="validation batches the sensitivity uses (default: 4)")
    plan.add_argument("--runs", type=int, default=20, help="timed ONNX Runtime calls per latency (default: 20)")
    quantize = commands.add_parser(
        "quantize", help="post-training quantisation: calibrate a checkpoint's (or a trained recipe's) model on a "
        "few batches, write the verified int8 bundle; override recipe keys with --a.b.c=VALUE", allow_abbrev=False,
    )  # fmt: skip
    quantize.add_argument("source", help="a checkpoint of lightning_compress's ClassificationModule, or a recipe YAML")
    quantize.add_argument("--calib-batches", type=int, default=8, help="training batches to observe (default: 8)")
    quantize.add_argument("--weight-bits", type=int, default=8, help="weight bits, 2-8 (default: 8)")
    quantize.add_argument("--equalize", action="store_true", help="cross-layer equalisation first (Nagel et al. 2019)")
    quantize.add_argument("--bias-correction", action="store_true", help="correct the bias weight quantisation shifts")
    quantize.add_argument("--out", default="quantized", help="output folder (default: quantized)")
    quantize.add_argument(
        "--data", default=None, help="for a checkpoint: the data to calibrate and check on (default: what it records)"
    )
    quantize.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime checks")
    quantize.add_argument("--int8-weights", choices=WEIGHT_TYPES, default="auto", help="as for `export`")
    quantize.add_argument("--no-pack", action="store_true", help="as for `export`")
    quantize.add_argument("--python-path", action="append", default=[], metavar="DIR", help="as for `fit`")
    export = commands.add_parser(
        "export", help="write verified ONNX fp32 / int8 files, a checkpoint and a report from a checkpoint"
    )
    export.add_argument("checkpoint", help="a checkpoint of lightning_compress's ClassificationModule")
    export.add_argument("--out", default="compressed", help="output folder (default: compressed)")
    export.add_argument(
        "--data", default=None, help="validation data for the checks and accuracy (default: what the checkpoint was "
        "trained on, as it records; else mnist5k)"
    )
    export.add_argument("--formats", nargs="+", default=None, help="onnx, onnx_int8, checkpoint (default: all it can)")
    export.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime checks")
    export.add_argument("--no-physical", action="store_true", help="keep zero channels (no physical removal)")
    export.add_argument(
        "--baseline", default=None, metavar="CKPT", help="a checkpoint (e.g. the dense model) whose accuracy the "
        "report compares with (default: none; the untrained model never is)"
    )
    export.add_argument(
        "--int8-weights", choices=WEIGHT_TYPES, default="auto", help="how model.int8.onnx stores its weights: int8 "
        "(fastest on x86 with VNNI and on ARM), uint8 (exact in ONNX Runtime on every CPU) or auto (by this CPU)"
    )
    export.add_argument(
        "--no-pack", action="store_true", help="store 4- and 2-bit weights as int8 (default: packed two or four to "
        "a byte, unpacked by ONNX Runtime at load)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    from lightning_compress.app.quiet import quiet_lightning

    quiet_lightning()
    args, extra = _parser().parse_known_args(argv)
    if extra and args.command not in ("fit", "validate", "plan", "quantize"):
        _parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in ("fit", "validate"):
            from lightning_compress.app.run import fit_recipe

            train = args.command == "fit"
            return fit_recipe(args.recipe, extra, args.print_config, train=train, python_path=args.python_path)
        if args.command == "plan":
            from lightning_compress.app.plan import plan_recipe

            done = plan_recipe(args.recipe, args.target, args.techniques, args.out, args.epochs, args.batches,
                               extra, runs=args.runs)  # fmt: skip
            metric = done.target.metric
            measured = done.measured.get(metric)
            print(
                f"wrote {args.out}: {len(done.options)} layers compressed; {metric} dense {done.dense[metric]:.6g}, "
                f"predicted {done.predicted[metric]:.6g}, measured {measured:.6g}; planned in {done.seconds:.1f} s"
            )
            return 0
        if args.command == "quantize":
            from lightning_compress.app.quantize import quantize_source

            report = quantize_source(
                args.source, args.out, args.calib_batches, args.weight_bits, args.equalize, args.bias_correction,
                args.data, extra, args.python_path, not args.no_verify, args.int8_weights, not args.no_pack,
            )  # fmt: skip
            after, baseline = report["after"], report["baseline"]
            line = f"wrote {', '.join(sorted(report['files']))} and report.json to {args.out}"
            line += f"; int8 ONNX Runtime top-1 {100 * after.get('int8_ort_accuracy', 0.0):.2f}%"
            if baseline:
                line += f" (fp32 {100 * baseline['ort_accuracy']:.2f}%)"
            print(line)
            return 0
        if args.command == "sweep":
            from lightning_compress.app.sweep import check_sweep, run_sweep

            if args.check:
                figures = check_sweep(args.sweep, args.out)
                print(f"{args.sweep}: one short trial logged the metric; it logs {', '.join(sorted(figures))}")
                return 0
            rows = run_sweep(args.sweep, args.count, args.out, args.seed, args.wandb_project)
            print(f"{len(rows)} trials; results.csv and pareto.png in {args.out}")
            for row in rows:
                print(row)
        if args.command == "pipeline":
            from lightning_compress.app.demo import run_pipeline

            run_pipeline(args.data, args.teacher_epochs, args.epochs, args.seed, args.out)
        if args.command == "demo":
            from lightning_compress.app.demo import run_demo

            run_demo(args.model, args.data, args.epochs, args.sparsity, args.seed)
        elif args.command == "export":
            from lightning_compress.app.run import export_checkpoint

            export_checkpoint(
                args.checkpoint, args.out, args.data, args.formats, not args.no_verify, not args.no_physical,
                args.baseline, args.int8_weights, not args.no_pack,
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
    except KeyboardInterrupt:
        print("lightning-compress: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a run that failed (a full disk, a bug): one paragraph, the traceback on request
        if os.environ.get(DEBUG):
            raise
        where = _where(err)
        print(
            f"lightning-compress: error: the run failed: {type(err).__name__}: {' '.join(str(err).split())[:600]}"
            f"{where}. HINT: set {DEBUG}=1 for the traceback",
            file=sys.stderr,
        )
        return 1
    return 0


DEBUG = "LIGHTNING_COMPRESS_DEBUG"


def _where(error: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame that raised ``error``."""
    trace = error.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return f" (at {trace.tb_frame.f_code.co_filename}:{trace.tb_lineno})" if trace is not None else ""


if __name__ == "__main__":
    sys.exit(main())
