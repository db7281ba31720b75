"""Pruning criteria side by side, in one run: magnitude vs Taylor vs movement at 98% of the weights, and
magnitude vs Taylor vs FPGM vs network slimming at 50% of the channels.

Same model (``cnn_small``), data (mnist5k), optimizer (the ClassificationModule's Adam, lr 1e-3), batch 64,
epochs and seeds for every arm; ``MagnitudePruning`` with its default schedule (cubic from epoch 0 to 3/4 of the
way) and only ``criterion`` changed; a dense arm per seed as the reference. Top-1 on the 1,000 validation images
(PyTorch, masks on). Printed: mean ± std over the seeds, and each arm's paired difference to magnitude.

Run: ``.venv/bin/python benchmarks/criteria.py`` (about 10 minutes on 2 cores);
``--data digits --epochs 1 --seeds 1`` is a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import RESULTS, fit, markdown, new_module, publish

from lightning_compress import MagnitudePruning

ARMS: dict[str, dict[str, Any]] = {
    "dense": {},
    "98% weights, magnitude": {"final_sparsity": 0.98},
    "98% weights, taylor": {"final_sparsity": 0.98, "criterion": "taylor"},
    "98% weights, movement": {"final_sparsity": 0.98, "criterion": "movement"},
    "50% channels, magnitude": {"final_sparsity": 0.5, "pattern": "channel"},
    "50% channels, taylor": {"final_sparsity": 0.5, "pattern": "channel", "criterion": "taylor"},
    "50% channels, fpgm": {"final_sparsity": 0.5, "pattern": "channel", "criterion": "fpgm"},
    "50% channels, slimming": {"final_sparsity": 0.5, "pattern": "channel", "criterion": "slimming"},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn_small")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args(argv)
    accuracy: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):  # interleaved by seed: every arm sees the same machine state
        for arm, options in ARMS.items():
            module = new_module(args.model, args.data, seed)
            callbacks = [MagnitudePruning(**options)] if options else []
            accuracy[arm].append(fit(module, args.data, args.epochs, seed, callbacks)[0])
            print(f"seed {seed}: {arm}: {100 * accuracy[arm][-1]:.2f}%", flush=True)
    rows = []
    for arm, values in accuracy.items():
        reference = f"{arm.split(',')[0]}, magnitude"
        base = accuracy.get(reference) if arm != reference else None
        paired = [100 * (a - b) for a, b in zip(values, base, strict=True)] if base else []
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append([
            arm, f"{100 * statistics.mean(values):.2f} ± {100 * spread:.2f}",
            ", ".join(f"{d:+.1f}" for d in paired), f"{statistics.mean(paired):+.2f}" if paired else "",
        ])  # fmt: skip
    table = markdown(["arm", "top-1 % (mean ± std)", "vs magnitude per seed", "paired mean"], rows)
    print(f"\n{args.model} on {args.data}, {args.epochs} epochs, seeds 0-{args.seeds - 1}\n")
    return publish("criteria", args, table, accuracy=accuracy)


if __name__ == "__main__":
    main()
