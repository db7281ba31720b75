"""Compressing to a latency budget: the planned per-layer allocation vs a uniform one, in one run.

For each target (a ratio of the dense fp32 model's ONNX Runtime latency at the batch size):
  planned      -- ``plan_model``: sensitivity on 4 validation batches after a warm-up epoch, per-layer
                  latency measured, knapsack allocation (``lightning_compress.app.plan``);
  uniform      -- the same structure on every layer that can take it (the classifier keeps its outputs),
                  int8 everywhere when allowed, at the strength whose *measured* latency is closest to
                  the planned model's measured latency (a grid of channel fractions);
  MACs-aware   -- ``plan_model`` with a MACs target equal to the planned model's predicted MACs: the
                  same MACs, chosen without the latency table (its measured latency is compared).
Each allocation is applied one-shot to the warm model, exported and timed (ORT, 1 thread, median of
``--runs`` calls); then each planned and uniform allocation is trained from scratch with the compression
callbacks carrying it (``--epochs``, seeds ``--seeds``) and its validation accuracy compared.

Run: ``.venv/bin/python benchmarks/budget.py`` (cnn_wide on mnist5k; about 20 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, fit, get_datamodule, markdown, mean_spread, new_module, save

from lightning_compress import LowRankFactorization, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.app.plan import scheduled
from lightning_compress.core.sensitivity import Setting
from lightning_compress.deploy.cost import Option
from lightning_compress.deploy.planning import Plan, Target, measure_plan, plan_model

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def callbacks_for(plan: Plan, epochs: int) -> list[Any]:
    """The compression callbacks that carry out ``plan`` in a run of ``epochs``."""
    sections = scheduled(plan.settings(), epochs)
    made: list[Any] = []
    if "low_rank" in sections:
        made.append(LowRankFactorization(**sections["low_rank"]))
    if "pruning" in sections:
        made.append(MagnitudePruning(**sections["pruning"]))
    if "quantization" in sections:
        made.append(QuantizationAwareTraining(**sections["quantization"]))
    return made


def uniform(plan: Plan, fraction: float, bits: int | None) -> Plan:
    """``plan``'s layers, every one that took channels in the analysis at ``fraction``, every one at ``bits``."""
    options = {}
    for name, results in plan.sensitivity.results.items():
        can = any(key.startswith("channels=") for key in results)  # the analysis offered it channels
        structure = Setting("channels", fraction) if can else None
        if structure is not None or bits:
            options[name] = Option(structure, bits)
    return Plan(plan.target, options, {}, plan.dense, 0.0, plan.sensitivity, 0.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn_wide")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--techniques", default="channel,int8")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64, help="the batch size latencies are measured at")
    parser.add_argument("--batches", type=int, default=4, help="validation batches of the sensitivity analysis")
    parser.add_argument("--runs", type=int, default=30, help="timed ORT calls per latency")
    parser.add_argument("--warmup", type=int, default=1, help="epochs trained before the sensitivity analysis")
    parser.add_argument("--train-threads", type=int, default=1, help="torch threads of the trainings (after timing)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    warm = new_module(args.model, args.data, args.seeds[0])
    fit(warm, args.data, args.warmup, args.seeds[0])
    warm.eval()
    dm = get_datamodule(args.data, batch_size=args.batch_size, seed=args.seeds[0])
    dm.setup("fit")
    val = [batch for _, batch in zip(range(args.batches), dm.val_dataloader(), strict=False)]
    techniques = args.techniques.split(",")
    bits = 8 if "int8" in techniques else 4 if "int4" in techniques else None
    cache = args.out / f"budget.{args.model}.latency.json"
    # Every latency first (planning, the uniform grid, the MACs-aware plan), training after: the timed phase is
    # contiguous, so nothing else needs to wait for the trainings.
    arms: dict[float, tuple[Plan, float, Plan, Plan]] = {}
    for ratio in args.targets:
        planned = plan_model(warm, val, Target("latency", ratio), techniques, args.batch_size, cache, args.runs)
        planned.measured = planned.measured or measure_plan(warm, planned, val, args.batch_size, args.runs)
        candidates = {f: measure_plan(warm, uniform(planned, f, bits), val, args.batch_size, args.runs)
                      for f in FRACTIONS}  # fmt: skip
        fraction = min(candidates, key=lambda f: abs(candidates[f]["latency"] - planned.measured["latency"]))
        flat = uniform(planned, fraction, bits)
        flat.measured = candidates[fraction]
        macs_ratio = planned.predicted["macs"] / planned.dense["macs"]
        by_macs = plan_model(warm, val, Target("macs", macs_ratio), techniques, args.batch_size, cache, args.runs)
        by_macs.measured = measure_plan(warm, by_macs, val, args.batch_size, args.runs)
        arms[ratio] = (planned, fraction, flat, by_macs)
        print(f"target {ratio}: planned {planned.measured['latency'] / planned.dense['latency']:.2f}x dense, "
              f"uniform {fraction} {flat.measured['latency'] / planned.dense['latency']:.2f}x", flush=True)
    print("latencies done; training", flush=True)
    torch.set_num_threads(args.train_threads)
    rows, results = [], {}
    for ratio, (planned, fraction, flat, by_macs) in arms.items():
        dense = planned.dense["latency"]
        accuracy: dict[str, list[float]] = {"planned": [], f"uniform {fraction}": []}
        for seed in args.seeds:
            for arm, chosen in (("planned", planned), (f"uniform {fraction}", flat)):
                module = new_module(args.model, args.data, seed)
                accuracy[arm].append(fit(module, args.data, args.epochs, seed, callbacks_for(chosen, args.epochs))[0])
            print(f"target {ratio}: seed {seed} trained: planned {accuracy['planned'][-1]:.4f}, "
                  f"uniform {accuracy[f'uniform {fraction}'][-1]:.4f}", flush=True)  # fmt: skip
        for arm, chosen in (("planned", planned), (f"uniform {fraction}", flat), ("MACs-aware", by_macs)):
            got = accuracy.get(arm)
            rows.append([
                f"{ratio}", arm, f"{chosen.measured['latency'] / dense:.2f}",
                f"{chosen.predicted['latency'] / dense:.2f}" if chosen.predicted else "—",
                f"{chosen.measured['macs'] / planned.dense['macs']:.2f}",
                mean_spread(got) if got else "—", f"{chosen.seconds:.1f}" if chosen.seconds else "—",
            ])  # fmt: skip
        paired = [a - b for a, b in zip(accuracy["planned"], accuracy[f"uniform {fraction}"], strict=True)]
        results[str(ratio)] = {
            "dense_latency_ms": dense, "accuracy": accuracy, "paired_planned_minus_uniform": paired,
            "planned": {"options": {n: str(o) for n, o in planned.options.items()}, "measured": planned.measured,
                        "predicted": planned.predicted, "seconds": planned.seconds},
            "uniform": {"fraction": fraction, "measured": flat.measured},
            "macs_aware": {"options": {n: str(o) for n, o in by_macs.options.items()}, "measured": by_macs.measured},
        }  # fmt: skip
        spread = statistics.stdev(paired) if len(paired) > 1 else 0.0
        print(f"target {ratio}: planned - uniform {100 * statistics.mean(paired):+.2f} ± {100 * spread:.2f} points "
              f"(paired over seeds); latency-aware / MACs-aware measured latency "
              f"{planned.measured['latency'] / by_macs.measured['latency']:.2f}", flush=True)  # fmt: skip
    header = ["target", "arm", "measured latency / dense", "predicted / dense", "MACs / dense",
              f"top-1 % ({len(args.seeds)} seeds)", "planning s"]  # fmt: skip
    table = markdown(header, rows)
    print(table)
    payload = {"args": vars(args) | {"out": str(args.out)}, "results": results, "table": table}
    save(f"budget.{args.model}", payload, args.out)
    return results


if __name__ == "__main__":
    main()
