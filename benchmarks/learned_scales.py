"""QAT with learned step sizes (LSQ) vs observed scales, at w8a8 and w4a8, several seeds, in one run.

For each model and seed: train fp32 for E-Q epochs; from that snapshot, continue Q epochs four ways (same
data order, fresh optimizer each): QAT observed / learned at 8-bit and at 4-bit weights (activations 8-bit).
Both arms start from the same calibration (``calibration_batches``) and freeze BatchNorm for the last QAT
epoch; they differ only in ``scales``. Each model is exported as int8 QDQ and its accuracy measured in ONNX
Runtime on the validation images (what ships). Printed: accuracy mean ± std per arm, the paired learned -
observed difference per seed, and a learned QAT epoch's time over an observed one (median over seeds).

Models: ``cnn_wide`` on mnist5k (28x28) and torchvision's ``mobilenet_v2`` on mnist5k resized to 32x32 with
3 channels (``mnist5k32``), from random weights.

Run: ``.venv/bin/python benchmarks/learned_scales.py`` (about 25 minutes on 2 cores);
``--models cnn_small --data mnist5k --seeds 0 --epochs 2 --qat-epochs 1`` is a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import LAST_EPOCH_TIMES, RESULTS, fit, get_datamodule, markdown, mean_spread, new_module, save

from lightning_compress import QuantizationAwareTraining, export_onnx
from lightning_compress.deploy.measure import ort_accuracy

DATA = {"cnn_wide": "mnist5k", "cnn_small": "mnist5k", "mobilenet_v2": "mnist5k32", "resnet18": "mnist5k32"}
ARMS = [(bits, scales) for bits in (8, 4) for scales in ("observed", "learned")]


def run_seed(model: str, data: str, seed: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    base = new_module(model, data, seed)
    fit(base, data, args.epochs - args.qat_epochs, seed)
    dm = get_datamodule(data, batch_size=250, seed=seed)
    dm.setup("fit")
    example = dm.example_input()
    found: dict[str, Any] = {}
    for bits, scales in ARMS:
        module = copy.deepcopy(base)
        qat = QuantizationAwareTraining(
            weight_bits=bits, scales=scales, calibration_batches=args.calibration_batches,
            freeze_bn_epoch=args.qat_epochs - 1,
        )  # fmt: skip
        fake_quant, _ = fit(module, data, args.qat_epochs, seed, [qat])
        epoch_s = statistics.median(LAST_EPOCH_TIMES)
        module.eval()
        path = export_onnx(module.model, example, folder / f"{model}.{seed}.w{bits}.{scales}.onnx", int8=True)
        acc = ort_accuracy(path, dm.val_dataloader())
        found[f"w{bits}a8 {scales}"] = {"ort_acc": acc, "fake_quant_acc": fake_quant, "epoch_s": epoch_s}
        print(f"{model} seed {seed} w{bits}a8 {scales}: ORT {100 * acc:.2f}% (fake-quant {100 * fake_quant:.2f}%), "
              f"{epoch_s:.2f} s/epoch", flush=True)  # fmt: skip
    return found


def report(runs: dict[str, list[dict[str, Any]]]) -> str:
    header = ["model", "weights", "observed: ORT acc % (mean ± std)", "learned: ORT acc %",
              "learned − observed per seed", "paired mean", "learned epoch / observed"]  # fmt: skip
    rows = []
    for model, seeds in runs.items():
        for bits in (8, 4):
            observed = [s[f"w{bits}a8 observed"]["ort_acc"] for s in seeds]
            learned = [s[f"w{bits}a8 learned"]["ort_acc"] for s in seeds]
            paired = [100 * (a - b) for a, b in zip(learned, observed, strict=True)]
            time = statistics.median(
                s[f"w{bits}a8 learned"]["epoch_s"] / s[f"w{bits}a8 observed"]["epoch_s"] for s in seeds
            )
            rows.append([
                model, f"{bits}-bit", mean_spread(observed), mean_spread(learned),
                ", ".join(f"{d:+.1f}" for d in paired), f"{statistics.mean(paired):+.2f}", f"{time:.2f}",
            ])  # fmt: skip
    return markdown(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn_wide", "mobilenet_v2"])
    parser.add_argument("--data", default=None, help="one data set for every model (default: as DATA says)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="total epochs per arm (E)")
    parser.add_argument("--qat-epochs", type=int, default=2, help="the last Q epochs, with QAT")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            data = args.data or DATA[model]
            runs[model] = [run_seed(model, data, seed, args, Path(tmp)) for seed in args.seeds]
    save("learned_scales", {"args": {**vars(args), "out": str(args.out)}, "runs": runs}, args.out)
    print(f"\n{args.epochs - args.qat_epochs} fp32 + {args.qat_epochs} QAT epochs, seeds {args.seeds}\n")
    print(report(runs))


if __name__ == "__main__":
    main()
