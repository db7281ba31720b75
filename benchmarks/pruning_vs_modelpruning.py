"""Our MagnitudePruning vs Lightning's ModelPruning vs one-shot pruning + fine-tuning, in one run.

Same CNN, data, optimizer and epochs for every arm; several seeds; runs interleaved by seed.
Arms, at every target sparsity:
  - dense                : no pruning, E epochs (the accuracy and epoch-time baseline)
  - dense 2E             : no pruning, 2E epochs (the compute-matched control for one-shot)
  - ModelPruning (LTH)   : Lightning's ModelPruning, global L1, per-epoch amounts reaching the
                           target over the first R epochs; its default use_lottery_ticket_hypothesis=True
  - ModelPruning         : the same with the lottery-ticket rewind off
  - one-shot + FT        : torch.nn.utils.prune global L1 on the dense model, then E fine-tuning epochs
                           (2E epochs in all)
  - ours                 : MagnitudePruning, cubic GMP from epoch 0 to R, E epochs
  - ours 2E              : MagnitudePruning over 2E epochs (ramp to 2R): compute-matched with one-shot
  - ours (LAMP)          : MagnitudePruning(scope="lamp"): one threshold over LAMP scores (Lee et al. 2021)
`--arms` runs a subset (dense and dense 2E always run: the time baseline).
Time ratio: median epoch time of the arm / median epoch time of the dense runs of the same seed; and,
sharper, an interleaved timing section first: rounds of [dense, ModelPruning, ours] 2-epoch runs
pruning in every epoch, ratio of median epoch times (``--timing-rounds``, ``--timing-only``).

Run: ``.venv/bin/python benchmarks/pruning_vs_modelpruning.py`` (about 30 minutes on 2 cores);
``--epochs 1 --seeds 1 --targets 0.5 --data digits`` is a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from common import LAST_EPOCH_TIMES, RESULTS, fit, markdown, mean_spread, new_module, prunable, save, weight_sparsity
from lightning.pytorch.callbacks import ModelPruning
from torch.nn.utils import prune as torch_prune

from lightning_compress import MagnitudePruning

ANCHORS = ("ModelPruning (LTH)", "ModelPruning", "one-shot + FT")
ARMS = (*ANCHORS, "ours", "ours (LAMP)", "ours 2E")


def modelpruning(module: torch.nn.Module, target: float, ramp: int, lottery: bool) -> ModelPruning:
    per_epoch = 1.0 - (1.0 - target) ** (1.0 / ramp)  # ModelPruning's amount applies to what is left
    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=[(m, "weight") for m in prunable(module)],
        amount=lambda epoch: per_epoch if epoch < ramp else 0.0,
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=lottery,
        make_pruning_permanent=True,
        verbose=0,
    )


def one_shot(dense_state: dict[str, Any], args: argparse.Namespace, seed: int, target: float) -> dict[str, float]:
    module = new_module(args.model, args.data, seed)
    module.load_state_dict(dense_state)
    params = [(m, "weight") for m in prunable(module)]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=target)
    accuracy, epoch = fit(module, args.data, args.epochs, seed)
    for layer, name in params:
        torch_prune.remove(layer, name)
    return {"acc": accuracy, "epoch_s": epoch, "sparsity": weight_sparsity(module)}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    ramp = max(1, round(args.ramp * args.epochs))
    out: dict[str, dict[str, float]] = {}

    def arm(name: str, epochs: int, make_callbacks: Any = None) -> torch.nn.Module | None:
        if "/" in name and name.split("/", 1)[1] not in args.arms:
            return None
        module = new_module(args.model, args.data, seed)
        callbacks = make_callbacks(module) if make_callbacks else []
        accuracy, epoch = fit(module, args.data, epochs, seed, callbacks)
        out[name] = {"acc": accuracy, "epoch_s": epoch, "sparsity": weight_sparsity(module)}
        print(f"seed {seed} {name:28s} acc {accuracy:.4f} sparsity {out[name]['sparsity']:.4f} epoch {epoch:.2f}s")
        return module

    dense = arm("dense", args.epochs)
    assert dense is not None
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    for target in args.targets:
        t = f"{target:g}"
        arm(f"{t}/ModelPruning (LTH)", args.epochs, lambda m, t_=target: [modelpruning(m, t_, ramp, lottery=True)])
        arm(f"{t}/ModelPruning", args.epochs, lambda m, target=target: [modelpruning(m, target, ramp, lottery=False)])
        if "one-shot + FT" in args.arms:
            out[f"{t}/one-shot + FT"] = one_shot(dense_state, args, seed, target)
            print(f"seed {seed} {t}/one-shot + FT: {out[f'{t}/one-shot + FT']}")
        arm(f"{t}/ours", args.epochs, lambda m, target=target: [MagnitudePruning(target, end_epoch=ramp)])
        arm(f"{t}/ours (LAMP)", args.epochs,
            lambda m, target=target: [MagnitudePruning(target, end_epoch=ramp, scope="lamp")])  # fmt: skip
        arm(f"{t}/ours 2E", 2 * args.epochs, lambda m, target=target: [MagnitudePruning(target, end_epoch=2 * ramp)])
        if target == args.targets[len(args.targets) // 2]:
            arm("dense 2E", 2 * args.epochs)  # the control, run mid-way so the dense timings bracket the rest
    return out


def report(runs: list[dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    epochs = {"dense": 1, "dense 2E": 2, "ModelPruning (LTH)": 1, "ModelPruning": 1, "one-shot + FT": 2, "ours": 1}
    acc: dict[str, list[float]] = defaultdict(list)
    ratio: dict[str, list[float]] = defaultdict(list)
    sparsity: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        dense_epoch = statistics.median([run["dense"]["epoch_s"], run["dense 2E"]["epoch_s"]])
        for name, figures in run.items():
            acc[name].append(figures["acc"])
            ratio[name].append(figures["epoch_s"] / dense_epoch)
            sparsity[name].append(figures["sparsity"])

    def row(name: str, label: str) -> list[Any]:
        r = ratio[name]
        ep = epochs.get(label, 2 if label.endswith("2E") else 1) * args.epochs
        spread = f"{statistics.median(r):.3f} [{min(r):.3f}–{max(r):.3f}]"
        return [label, ep, mean_spread(acc[name]), f"{statistics.mean(sparsity[name]):.4f}", spread]

    header = ["arm", "epochs", "val acc % (mean ± std)", "sparsity", "epoch time vs dense (median [range])"]
    rows = [row("dense", "dense"), row("dense 2E", "dense 2E")]
    lines: list[str] = []
    for target in args.targets:
        t = f"{target:g}"
        names = [n.split("/", 1)[1] for n in acc if n.startswith(f"{t}/")]
        rows.append([f"**target {t}**", "", "", "", ""])
        rows += [row(f"{t}/{n}", n) for n in names]
        dense = statistics.mean(acc["dense"])
        anchors = {n: statistics.mean(acc[f"{t}/{n}"]) for n in ANCHORS if f"{t}/{n}" in acc}
        for ours_name in (n for n in ("ours", "ours (LAMP)") if f"{t}/{n}" in acc):
            ours = statistics.mean(acc[f"{t}/{ours_name}"])
            line = f"target {t}: {ours_name} {100 * ours:.2f}%; vs dense {100 * (ours - dense):+.2f} points"
            if anchors:
                best = max(anchors, key=lambda n: anchors[n])
                line += f"; best anchor {best} {100 * anchors[best]:.2f}% ({'≥' if ours >= anchors[best] else '<'})"
            if f"{t}/ModelPruning" in ratio:
                line += (f"; time ratio {statistics.median(ratio[f'{t}/{ours_name}']):.3f} vs ModelPruning "
                         f"{statistics.median(ratio[f'{t}/ModelPruning']):.3f}")  # fmt: skip
            lines.append(line)
    return markdown(header, rows) + "\n\n" + "\n".join(lines)


def timing(args: argparse.Namespace) -> str:
    """Training-time ratios measured interleaved: rounds of [dense, ModelPruning, ours] fresh 2-epoch runs
    that prune to the middle target over both epochs, so pruning work happens in every timed epoch."""
    target = args.targets[len(args.targets) // 2]
    arms = {
        "dense": lambda m: [],
        "ModelPruning": lambda m: [modelpruning(m, target, 2, lottery=False)],
        "ours": lambda m: [MagnitudePruning(target, end_epoch=2)],
    }
    times: dict[str, list[list[float]]] = {arm: [] for arm in arms}
    for round_ in range(args.timing_rounds):
        for arm, callbacks in arms.items():
            module = new_module(args.model, args.data, round_)
            fit(module, args.data, 2, round_, callbacks(module), args.batch_size)
            times[arm].append(list(LAST_EPOCH_TIMES))
    dense = statistics.median(t for run in times["dense"] for t in run)
    rows = []
    for arm, runs in times.items():
        per_round = [statistics.median(run) / statistics.median(d) for run, d in zip(runs, times["dense"], strict=True)]
        ratio = statistics.median(t for run in runs for t in run) / dense
        rows.append([arm, f"{ratio:.3f}", f"{min(per_round):.3f}–{max(per_round):.3f}"])
    header = ["arm", f"epoch time / dense (median of {2 * args.timing_rounds} epochs)", "per-round range"]
    return f"Interleaved timing at target {target:g}, {args.timing_rounds} rounds:\n\n" + markdown(header, rows)


def self_time(args: argparse.Namespace) -> str:
    """The callback's own time, instrumented in-process: every hook of ours wrapped in a timer, over a
    2-epoch run pruning in every epoch (the worst case), as a share of the training time."""
    target = args.targets[len(args.targets) // 2]
    pruning = MagnitudePruning(target, end_epoch=2)
    spent = [0.0]

    def timed(method: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    for name in ("on_train_start", "on_train_batch_start", "_after_optimizer_step", "on_train_epoch_end"):
        setattr(pruning, name, timed(getattr(pruning, name)))
    module = new_module(args.model, args.data, 0)
    fit(module, args.data, 2, 0, [pruning], args.batch_size)
    total = sum(LAST_EPOCH_TIMES)
    return f"MagnitudePruning's own time: {1000 * spent[0]:.0f} ms of {total:.2f} s training = {spent[0] / total:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn_small")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ramp", type=float, default=0.6, help="fraction of the epochs over which sparsity ramps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    parser.add_argument("--timing-rounds", type=int, default=8, help="interleaved timing rounds (0: none)")
    parser.add_argument("--timing-only", action="store_true", help="skip the accuracy runs")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of the timing section")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, metavar="ARM",
                        help=f"the arms at each target (default all: {', '.join(ARMS)})")  # fmt: skip
    args = parser.parse_args()
    if args.timing_rounds:
        table = timing(args)
        print(f"\n{args.model} on {args.data}, batch {args.batch_size}\n\n{table}\n\n{self_time(args)}\n", flush=True)
    if args.timing_only:
        return
    runs = [run_seed(args, seed) for seed in range(args.seeds)]
    save("pruning_vs_modelpruning", {"args": {**vars(args), "out": str(args.out)}, "runs": runs}, args.out)
    print(f"\n{args.model} on {args.data}, {args.epochs} epochs (E), {args.seeds} seeds\n")
    print(report(runs, args))


if __name__ == "__main__":
    main()
