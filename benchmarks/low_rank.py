"""Low-rank factorisation during training vs after training, in one run, on mnist5k with cnn_wide.

Arms (one seed, same data order, Adam 1e-3):
  dense                 -- E epochs;
  ours (epoch N)        -- ``LowRankFactorization(epoch=N, ratio=r)``: E epochs in all, E-N of them factorised;
  post-hoc + fine-tune  -- the dense model factorised after its E epochs with the same rule, then
                           fine-tuned for the same E-N epochs that ours trains factorised;
  ours + self-KD        -- (``--self-distill``) ours with ``KnowledgeDistillation(teacher="self")``: the
                           factorised model learns from a frozen copy of itself taken at epoch N, before the
                           factorisation (same E epochs, no separate teacher).
For each per-layer parameter ratio r (the classifier's last layer is left alone), print parameters,
MACs (one 28x28 image), top-1 accuracy (ONNX Runtime on the 1,000 validation images) and ORT
latency at batch 64 (interleaved rounds, median), each as a ratio to dense.

Run: ``.venv/bin/python benchmarks/low_rank.py`` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

from common import RESULTS, fit, markdown, new_module, ort_figures, publish

from lightning_compress import KnowledgeDistillation, LowRankFactorization, export_onnx, get_datamodule
from lightning_compress.core.low_rank import plan
from lightning_compress.core.surgery import swap_modules
from lightning_compress.deploy.measure import count_macs, count_parameters

KEEP = ["model.classifier.3"]  # the last layer's outputs are the classes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn_wide")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--at", type=int, default=2, help="the epoch at whose start ours factorises")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--conv-method", default="svd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved ORT latency rounds")
    parser.add_argument("--runs", type=int, default=30, help="calls per latency measurement")
    parser.add_argument("--self-distill", action="store_true", help="add the ours + self-KD arm")
    parser.add_argument("--alpha", type=float, default=0.5, help="the self-KD arm's alpha")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args(argv)
    example = get_datamodule(args.data).example_input()[:1]

    models: dict[str, Any] = {}
    dense = new_module(args.model, args.data, args.seed)
    fit(dense, args.data, args.epochs, args.seed)
    models["dense"] = dense
    print("dense trained", flush=True)
    for ratio in args.ratios:
        ours = new_module(args.model, args.data, args.seed)
        rule = LowRankFactorization(args.at, ratio=ratio, exclude=KEEP, conv_method=args.conv_method)
        fit(ours, args.data, args.epochs, args.seed, [rule])
        models[f"ours r={ratio}"] = ours
        if args.self_distill:
            taught = new_module(args.model, args.data, args.seed)
            rule = LowRankFactorization(args.at, ratio=ratio, exclude=KEEP, conv_method=args.conv_method)
            fit(taught, args.data, args.epochs, args.seed, [rule, KnowledgeDistillation("self", alpha=args.alpha)])
            models[f"ours + self-KD r={ratio}"] = taught
        post = copy.deepcopy(dense)
        chosen, _ = plan(post, ratio=ratio, exclude=KEEP, conv_method=args.conv_method)
        swap_modules(post, {name: new for name, (new, _) in chosen.items()})
        fit(post, args.data, args.epochs - args.at, args.seed)
        models[f"post-hoc r={ratio}"] = post
        print(f"ratio {ratio} trained", flush=True)

    with tempfile.TemporaryDirectory() as folder:
        paths = {
            arm: export_onnx(module.model, example, Path(folder) / f"{i}.onnx")
            for i, (arm, module) in enumerate(models.items())
        }
        ort = ort_figures(paths, args.runs, args.rounds, spinning=(True,), data=args.data)
    base = {"params": count_parameters(dense.model), "macs": count_macs(dense.model, example)[0]}
    rows, figures = [], {}
    for arm, module in models.items():
        params, macs = count_parameters(module.model), count_macs(module.model, example)[0]
        figures[arm] = {"params": params, "macs": macs, **ort[arm]}
        rows.append([
            arm, f"{params:,}", f"{params / base['params']:.2f}", f"{macs / base['macs']:.2f}",
            f"{100 * ort[arm]['acc']:.2f}", f"{100 * (ort[arm]['acc'] - ort['dense']['acc']):+.2f}",
            f"{ort[arm]['latency_ms_spin1'] / ort['dense']['latency_ms_spin1']:.2f}",
        ])  # fmt: skip
    header = ["arm", "params", "params ratio", "MACs ratio", "top-1 % (ORT)", "vs dense (pts)", "latency ratio"]
    table = markdown(header, rows)
    print(
        f"\n{args.model} on {args.data}, {args.epochs} epochs, factorised at epoch {args.at} "
        f"({args.conv_method} for convs), seed {args.seed}; dense latency "
        f"{ort['dense']['latency_ms_spin1']:.2f} ms at batch 64\n"
    )
    return publish("low_rank", args, table, figures=figures)


if __name__ == "__main__":
    main()
