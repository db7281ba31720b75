"""What each "never wreck a model" default buys, measured on torchvision models: accuracy with the
default against the rule it replaced.

Each model (torchvision's own ``resnet18`` and ``mobilenet_v2``, random init, 1-channel stem, 10
classes) is trained dense on the embedded MNIST-5k (28x28) for ``--dense`` epochs; every arm then
starts from those weights and fine-tunes for ``--tune`` epochs with one compression callback (pruning
reaches its target after the first of them; low-rank factorises at the start). One run, one seed;
printed: validation accuracy of each arm and its ratio to the dense model's.

Arms:
- channel pruning 50%, global scope: **ours** (channel scores relative to each layer's mean, every
  layer keeps >= half of ``1 - target`` of its channels) vs **raw L1** (the old rule: raw L1 norms
  compared across layers, no floor — reproduced here by switching both off) vs ``scope="layer"``.
- unstructured pruning 95%, global scope: **ours** (every layer keeps >= half of ``1 - target`` of its
  weights) vs **no floor** (one threshold over raw magnitudes, the old rule).
- low-rank ``ratio=0.5``: **ours** (the classifier and layers of fan-in < 32 left alone, rank >= 4)
  vs **every layer** (``include=["*"]``, still rank >= 4).

Run: ``.venv/bin/python benchmarks/zoo_defaults.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from common import RESULTS, fit, markdown, new_module, save

from lightning_compress import LowRankFactorization, MagnitudePruning
from lightning_compress.core import pruning


@contextlib.contextmanager
def old_pruning_rule() -> Iterator[None]:
    """The allocation before the defaults: raw scores compared across layers, no per-layer floor."""
    relative, floor = pruning._relative, pruning.MIN_KEPT_SHARE
    pruning._relative = lambda scores: scores  # type: ignore[assignment]
    pruning.MIN_KEPT_SHARE = 0.0
    try:
        yield
    finally:
        pruning._relative, pruning.MIN_KEPT_SHARE = relative, floor  # type: ignore[assignment]


Arm = tuple[str, str, Callable[[], list[pl.Callback]], bool]
CHANNELS: dict[str, Any] = {"pattern": "channel", "end_epoch": 1}
ARMS: list[Arm] = [
    ("channel 50%", "ours", lambda: [MagnitudePruning(0.5, **CHANNELS)], False),
    ("channel 50%", "raw L1, no floor", lambda: [MagnitudePruning(0.5, **CHANNELS)], True),
    ("channel 50%", "scope=layer", lambda: [MagnitudePruning(0.5, scope="layer", **CHANNELS)], False),
    ("unstructured 95%", "ours", lambda: [MagnitudePruning(0.95, end_epoch=1)], False),
    ("unstructured 95%", "no floor", lambda: [MagnitudePruning(0.95, end_epoch=1)], True),
    ("low-rank 0.5", "ours", lambda: [LowRankFactorization(epoch=0, ratio=0.5)], False),
    ("low-rank 0.5", "every layer", lambda: [LowRankFactorization(epoch=0, ratio=0.5, include=["*"])], False),
]  # fmt: skip


def smallest_layer_share(module: torch.nn.Module) -> float:
    """The smallest share of non-zero weights in any Conv/Linear layer (0: a layer pruned away)."""
    shares = []
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
            weight = getattr(layer, "weight_mask", None)
            weight = weight if weight is not None else layer.weight
            shares.append(float((weight != 0).float().mean()))
    return min(shares)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--dense", type=int, default=3, help="dense training epochs")
    parser.add_argument("--tune", type=int, default=2, help="fine-tuning epochs per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="mnist5k", help="an embedded data set: mnist5k or digits")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows: list[dict[str, Any]] = []
    for model in args.models:
        dense = new_module(model, args.data, args.seed)
        dense_acc, _ = fit(dense, args.data, args.dense, args.seed)
        print(f"{model}: dense {dense_acc:.4f}", flush=True)
        weights = copy.deepcopy(dense.state_dict())
        for setting, arm, callbacks, old in ARMS:
            module = new_module(model, args.data, args.seed)
            module.load_state_dict(weights)
            with old_pruning_rule() if old else contextlib.nullcontext():
                acc, _ = fit(module, args.data, args.tune, args.seed, callbacks())
            row = {"model": model, "setting": setting, "arm": arm, "dense": dense_acc, "acc": acc,
                   "smallest_layer": smallest_layer_share(module)}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    table = [
        [r["model"], r["setting"], r["arm"], f"{100 * r['acc']:.2f}", f"{r['acc'] / r['dense']:.3f}",
         f"{r['smallest_layer']:.3f}"]
        for r in rows
    ]  # fmt: skip
    print(markdown(["model", "setting", "arm", "val acc %", "vs dense", "smallest layer kept"], table))
    save("zoo_defaults", rows, args.out)
    return rows


if __name__ == "__main__":
    main()
