"""Knowledge distillation into a weak student, in one run, on mnist5k.

1. Train the teacher (``cnn_wide``, 635k parameters) once, seed 0, for its own epochs; freeze it.
2. For each seed, train the student (``cnn_tiny``, 12k parameters) for E epochs three ways, same
   seed, same data order, same optimizer (Adam 1e-3, cosine-annealed to 0 over the E epochs), arms
   interleaved:
   alone (cross-entropy); response KD (Hinton et al. 2015, T=4, alpha=0.9); response + feature KD
   (the student's last conv block matched to the teacher's through a learned 1x1 conv adapter).
3. Print top-1 accuracy on the 1,000 validation images (mean ± std over seeds, and per seed the
   gain over the student alone) and the training-time ratio of each arm vs the student alone
   (median epoch time; the KD arms also run the teacher's forward pass every step).

Run: ``.venv/bin/python benchmarks/distillation.py`` (about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path
from typing import Any

from common import RESULTS, fit, markdown, mean_spread, new_module, save

from lightning_compress import KnowledgeDistillation
from lightning_compress.deploy.measure import count_parameters

ARMS = ("alone", "response KD", "response + feature KD")


def callbacks(arm: str, teacher: Any, args: argparse.Namespace) -> list[Any]:
    if arm == "alone":
        return []
    student_layer, _, teacher_layer = args.features.partition("=")
    features = {student_layer: teacher_layer} if arm == "response + feature KD" else None
    teacher = copy.deepcopy(teacher)
    return [KnowledgeDistillation(teacher, args.temperature, args.alpha, features, feature_weight=args.feature_weight)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="cnn_wide")
    parser.add_argument("--student", default="cnn_tiny")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--features", default="model.features=model.features", help="STUDENT_LAYER=TEACHER_LAYER")
    parser.add_argument("--constant-lr", action="store_true", help="no cosine annealing (final-epoch noise is larger)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args(argv)

    cosine = not args.constant_lr
    teacher = new_module(args.teacher, args.data, seed=0, cosine=cosine)
    teacher_acc, _ = fit(teacher, args.data, args.teacher_epochs, seed=0)
    print(f"teacher {args.teacher}: {100 * teacher_acc:.2f}% after {args.teacher_epochs} epochs", flush=True)

    runs: list[dict[str, dict[str, float]]] = []
    for seed in range(args.seeds):
        run: dict[str, dict[str, float]] = {}
        for arm in ARMS:
            student = new_module(args.student, args.data, seed=seed, cosine=cosine)
            accuracy, epoch_s = fit(student, args.data, args.epochs, seed, callbacks(arm, teacher, args))
            run[arm] = {"acc": accuracy, "epoch_s": epoch_s}
            print(f"seed {seed} {arm}: {100 * accuracy:.2f}% ({epoch_s:.2f} s/epoch)", flush=True)
        runs.append(run)

    params = {"teacher": count_parameters(teacher), "student": count_parameters(new_module(args.student, args.data, 0))}
    rows = []
    for arm in ARMS:
        accs = [r[arm]["acc"] for r in runs]
        gains = [100 * (r[arm]["acc"] - r["alone"]["acc"]) for r in runs]
        time_ratio = statistics.median(r[arm]["epoch_s"] / r["alone"]["epoch_s"] for r in runs)
        rows.append([
            arm, mean_spread(accs), ", ".join(f"{g:+.2f}" for g in gains),
            f"{statistics.mean(gains):+.2f}", f"{time_ratio:.2f}",
        ])  # fmt: skip
    header = ["student arm", "top-1 % (mean ± std)", "gain per seed (pts)", "mean gain (pts)", "epoch time ratio"]
    table = markdown(header, rows)
    print(
        f"\n{args.student} ({params['student']:,} params) taught by {args.teacher} ({params['teacher']:,} params, "
        f"{100 * teacher_acc:.2f}%) on {args.data}, {args.epochs} epochs, {args.seeds} seeds, "
        f"T={args.temperature}, alpha={args.alpha}, features {args.features} (weight {args.feature_weight}), "
        f"{'constant LR' if args.constant_lr else 'cosine LR'}\n"
    )
    print(table)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "teacher_acc": teacher_acc, "params": params,
               "runs": runs, "table": table}  # fmt: skip
    save("distillation", payload, args.out)
    return payload


if __name__ == "__main__":
    main()
