"""50% channel pruning that becomes a smaller, faster file: ours vs Torch-Pruning's one-shot MagnitudePruner.

Part 1, ``cnn_wide`` on mnist5k (one seed, Adam 1e-3):
  dense                 -- E epochs;
  ours                  -- ``MagnitudePruning(0.5, pattern="channel", scope="layer", end_epoch=R)`` for E epochs
                           + ``CompressionExport`` (zero channels removed physically, files verified);
  ours, 2E-R epochs      -- the same with the anchor's total training (ramp over the first E epochs);
  Torch-Pruning one-shot -- the dense model, ``tp.pruner.MagnitudePruner`` (L1, 50% of each layer's
                           channels, the classifier's outputs kept) in one step, then fine-tuned for
                           the E-R epochs ours trains after its ramp ends (2E-R epochs in all);
  ours, <criterion>      -- ours ranked by ``--criterion`` (default ``slimming``), E epochs;
  ours, <criterion> + self-KD -- the same, pruning from epoch 1 (one dense warm-up epoch), distilled from a
                           copy of the model taken there (``KnowledgeDistillation(teacher="self")``), E epochs.
Part 2, ``resnet18`` at 32x32 (random weights and inputs; structure and speed only): our channel
masks (50% per layer, L1, layers feeding one residual add sharing a mask, as ``MagnitudePruning``
chooses them) removed physically by the export path vs Torch-Pruning's one-shot pruning.
Printed as ratios to dense: parameters, ONNX file bytes, ORT latency (batch 64, interleaved rounds,
median), and ORT accuracy on the 1,000 validation images (part 1).

Run: ``.venv/bin/python benchmarks/structured_export.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, fit, markdown, new_module, ort_figures, save
from torch import nn

from lightning_compress import (
    CompressionExport,
    KnowledgeDistillation,
    MagnitudePruning,
    build_model,
    export_onnx,
    get_datamodule,
)
from lightning_compress.core import pruning as P
from lightning_compress.core.graph import coupled_layers
from lightning_compress.deploy.measure import count_parameters, ort_latency_ms
from lightning_compress.deploy.shrink import remove_zero_channels


def tp_one_shot(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    last = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio, ignored_layers=[last]
    )
    pruner.step()
    return model


def ours_masks(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    layers = P.select_layers(model)
    layers.pop(next(reversed(layers)))
    weights = {n: P.weight_of(m) for n, m in layers.items()}
    couplings = coupled_layers(model, layers, example)  # what MagnitudePruning(pattern="channel") does
    masks = P.compute_masks(weights, ratio, P.Pattern.parse("channel"), "layer", couplings=couplings)
    P.attach_masks(layers, with_bias=True)
    P.set_masks(layers, masks)
    P.apply_masks(layers.values())
    return remove_zero_channels(P.fold_masks(model), example)[0]


def part1(args: argparse.Namespace, folder: Path) -> tuple[list[list[Any]], dict[str, Any]]:
    example = get_datamodule(args.data).example_input(2)
    dense = new_module("cnn_wide", args.data, args.seed)
    fit(dense, args.data, args.epochs, args.seed)
    ours = new_module("cnn_wide", args.data, args.seed)
    pruning = MagnitudePruning(args.ratio, pattern="channel", scope="layer", end_epoch=args.ramp_end)
    export = CompressionExport(folder / "ours", formats=["onnx"], example_input=example, plots=False)
    fit(ours, args.data, args.epochs, args.seed, [pruning, export])
    total = 2 * args.epochs - args.ramp_end  # the anchor's dense epochs + its fine-tuning epochs
    matched = new_module("cnn_wide", args.data, args.seed)
    pruning = MagnitudePruning(args.ratio, pattern="channel", scope="layer", end_epoch=args.epochs)
    export_matched = CompressionExport(folder / "matched", formats=["onnx"], example_input=example, plots=False)
    fit(matched, args.data, total, args.seed, [pruning, export_matched])
    anchor = copy.deepcopy(dense)
    tp_one_shot(anchor.model.eval(), example, args.ratio).train()
    fit(anchor, args.data, args.epochs - args.ramp_end, args.seed)
    exports = {"ours (CompressionExport)": export, f"ours, {total} epochs (ramp to {args.epochs})": export_matched}
    extra = ((f"ours, {args.criterion}", 0, False), (f"ours, {args.criterion} + self-KD", 1, True))
    for i, (arm, start, teach) in enumerate(extra):
        module = new_module("cnn_wide", args.data, args.seed)
        pruning = MagnitudePruning(args.ratio, pattern="channel", scope="layer", start_epoch=start,
                                   end_epoch=args.ramp_end, criterion=args.criterion)  # fmt: skip
        exports[arm] = CompressionExport(folder / f"extra{i}", formats=["onnx"], example_input=example, plots=False)
        taught = [KnowledgeDistillation("self", alpha=0.5)] if teach else []
        fit(module, args.data, args.epochs, args.seed, [pruning, *taught, exports[arm]])
    paths = {
        "dense": export_onnx(dense.model, example, folder / "dense.onnx"),
        **{arm: Path(done.report["files"]["onnx"]["path"]) for arm, done in exports.items()},
        "Torch-Pruning one-shot + FT": export_onnx(anchor.model, example, folder / "tp.onnx"),
    }
    ort = ort_figures(paths, args.runs, args.rounds, spinning=(True,), data=args.data)
    params = {
        "dense": count_parameters(dense.model),
        **{arm: int(done.report["after"]["params"]) for arm, done in exports.items()},
        "Torch-Pruning one-shot + FT": count_parameters(anchor.model),
    }
    rows = [
        [f"cnn_wide: {arm}", f"{params[arm] / params['dense']:.2f}", f"{ort[arm]['bytes'] / ort['dense']['bytes']:.2f}",
         f"{ort[arm]['latency_ms_spin1'] / ort['dense']['latency_ms_spin1']:.2f}", f"{100 * ort[arm]['acc']:.2f}"]
        for arm in paths
    ]  # fmt: skip
    checks = {f"{arm}/{k}": v for arm, done in exports.items() for k, v in done.report["verification"].items()}
    return rows, {"params": params, "ort": ort, "verification": checks}


def part2(args: argparse.Namespace, folder: Path) -> tuple[list[list[Any]], dict[str, Any]]:
    torch.manual_seed(args.seed)
    dense = build_model("resnet18", 10, 3).eval()
    example = torch.randn(2, 3, 32, 32)
    batch = torch.randn(64, 3, 32, 32)
    models = {
        "dense": dense,
        "ours (masks -> removed)": ours_masks(copy.deepcopy(dense), example, args.ratio),
        "Torch-Pruning one-shot": tp_one_shot(copy.deepcopy(dense), example, args.ratio),
    }
    paths = {arm: export_onnx(m, example, folder / f"resnet18-{i}.onnx") for i, (arm, m) in enumerate(models.items())}
    latency: dict[str, list[float]] = {arm: [] for arm in paths}
    for _ in range(args.rounds):
        for arm, path in paths.items():
            latency[arm].append(ort_latency_ms(path, batch, args.runs))
    median = {arm: statistics.median(v) for arm, v in latency.items()}
    params = {arm: count_parameters(m) for arm, m in models.items()}
    size = {arm: path.stat().st_size for arm, path in paths.items()}
    rows = [
        [f"resnet18 32x32: {arm}", f"{params[arm] / params['dense']:.2f}", f"{size[arm] / size['dense']:.2f}",
         f"{median[arm] / median['dense']:.2f}", "—"]
        for arm in paths
    ]  # fmt: skip
    return rows, {"params": params, "bytes": size, "latency_ms": median}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ramp-end", type=int, default=3, help="the epoch our pruning reaches its target")
    parser.add_argument("--ratio", type=float, default=0.5, help="fraction of channels pruned")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--criterion", default="slimming", help="the criterion of the two extra arms")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows, raw = part1(args, Path(tmp))
        raw2: dict[str, Any] = {}
        if not args.skip_resnet:
            rows2, raw2 = part2(args, Path(tmp))
            rows += rows2
    table = markdown(["arm", "params ratio", "file bytes ratio", "latency ratio", "top-1 % (ORT)"], rows)
    setting = f"{args.epochs} epochs, ramp to epoch {args.ramp_end}; seed {args.seed}"
    print(f"\n{int(100 * args.ratio)}% channels pruned; {setting}\n")
    print(table)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "cnn_wide": raw, "resnet18": raw2, "table": table}
    save("structured_export", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
