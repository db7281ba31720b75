"""QAT int8 vs ONNX Runtime's static post-training quantisation, in one run, on mnist5k.

For each model (cnn_small, cnn_wide), one seed:
  1. train fp32 for E-Q epochs; from that snapshot, train Q more epochs three ways (same data order,
     fresh optimizer each): fp32, QAT 8-bit, QAT 4-bit weights (QAT as the last phase of the run);
  2. export: fp32 ONNX; ORT's ``quantize_static`` of that fp32 ONNX (QDQ, per-channel, 256
     calibration images) -- the anchor; our QAT models as int8 QDQ; and, at 4 bits, a PTQ anchor made
     with our own quantiser (observers calibrated on the same 256 images, no training);
  3. run everything in ONNX Runtime: accuracy on the 1,000 validation images, file size, and
     latency at batch 64 (5 interleaved rounds over the files, each the median of 30 calls after
     warm-up, one session alive at a time; median over rounds; thread spinning on and off), as
     ratios to fp32.
Training-time ratio: median epoch time of a QAT continuation / the fp32 continuation.

Run: ``.venv/bin/python benchmarks/qat_int8.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from common import RESULTS, EpochTimer, markdown, ort_figures, save
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from lightning_compress import ClassificationModule, QuantizationAwareTraining, export_onnx, get_datamodule
from lightning_compress.core import quantization as q
from lightning_compress.core.graph import find_bn_pairs


def train(module: pl.LightningModule, epochs: int, seed: int, callbacks: list[pl.Callback]) -> float:
    """Continue training ``module``; return the median epoch time."""
    pl.seed_everything(seed, verbose=False)
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs, callbacks=[*callbacks, timer], accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=get_datamodule("mnist5k", seed=seed))
    return statistics.median(timer.times)


def calibration_images(n: int = 256) -> np.ndarray:
    dm = get_datamodule("mnist5k", batch_size=n)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))[0].numpy()


class Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 32) -> None:
        self.batches = iter([{"input": images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def ptq_ours(fp32: ClassificationModule, images: np.ndarray, bits: int) -> torch.nn.Module:
    """Post-training quantisation with our own quantiser: calibrate observers on ``images``, no training."""
    model = copy.deepcopy(fp32.model).eval()
    config = q.QuantConfig(weight_bits=bits, observer="minmax")
    layers = q.attach(model, config)
    x = torch.from_numpy(images)
    q.link_batchnorms(model, find_bn_pairs(model, layers, x[:2]))
    q.enable(model)
    for module in model.modules():  # observe activations only: BatchNorm statistics stay as trained
        module.train(isinstance(module, q.ActivationFakeQuant))
    with torch.no_grad():
        for i in range(0, len(x), 32):
            model(x[i : i + 32])
    return model.eval()


def run_model(name: str, args: argparse.Namespace, folder: Path) -> dict[str, dict[str, float]]:
    images = calibration_images()
    example = torch.zeros(1, 1, 28, 28)
    pl.seed_everything(args.seed, verbose=False)
    base = ClassificationModule(name)
    train(base, args.epochs - args.qat_epochs, args.seed, [])
    arms: dict[str, Any] = {}
    epoch_time: dict[str, float] = {}
    for arm, callbacks in (
        ("fp32", []),
        ("QAT int8", [QuantizationAwareTraining(freeze_bn_epoch=args.qat_epochs - 1)]),
        ("QAT w4a8", [QuantizationAwareTraining(weight_bits=4, freeze_bn_epoch=args.qat_epochs - 1)]),
    ):
        module = copy.deepcopy(base)
        epoch_time[arm] = train(module, args.qat_epochs, args.seed, callbacks)
        arms[arm] = module
        print(f"{name}: trained {arm} ({epoch_time[arm]:.2f} s/epoch)", flush=True)

    paths = {"fp32": export_onnx(arms["fp32"].model, example, folder / f"{name}.fp32.onnx")}
    pre = folder / f"{name}.fp32.pre.onnx"
    quant_pre_process(str(paths["fp32"]), str(pre))
    paths["ORT PTQ int8"] = folder / f"{name}.ort_ptq.onnx"
    quantize_static(
        str(pre), str(paths["ORT PTQ int8"]), Reader(images), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    paths["QAT int8"] = export_onnx(arms["QAT int8"].model, example, folder / f"{name}.qat8.onnx", int8=True)
    paths["PTQ w4a8 (ours, no training)"] = export_onnx(
        ptq_ours(arms["fp32"], images, 4), example, folder / f"{name}.ptq4.onnx", int8=True
    )
    paths["QAT w4a8"] = export_onnx(arms["QAT w4a8"].model, example, folder / f"{name}.qat4.onnx", int8=True)

    results = ort_figures(paths, args.runs, args.rounds)
    for arm, figures in results.items():
        print(f"{name}: {arm}: {figures}", flush=True)
    for arm in ("QAT int8", "QAT w4a8"):
        results[arm]["train_ratio"] = epoch_time[arm] / epoch_time["fp32"]
    return results


def report(all_results: dict[str, dict[str, dict[str, float]]]) -> str:
    header = ["model", "arm", "ORT acc %", "size / fp32", "latency / fp32 (spin on)", "latency / fp32 (spin off)",
              "train epoch / fp32"]  # fmt: skip
    rows = []
    for name, results in all_results.items():
        fp32 = results["fp32"]
        for arm, r in results.items():
            rows.append([
                name, arm, f"{100 * r['acc']:.2f}", f"{r['bytes'] / fp32['bytes']:.3f}",
                f"{r['latency_ms_spin1'] / fp32['latency_ms_spin1']:.2f} ({r['latency_ms_spin1']:.2f} ms)",
                f"{r['latency_ms_spin0'] / fp32['latency_ms_spin0']:.2f} ({r['latency_ms_spin0']:.2f} ms)",
                f"{r['train_ratio']:.2f}" if "train_ratio" in r else "",
            ])  # fmt: skip
    return markdown(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn_small", "cnn_wide"])
    parser.add_argument("--epochs", type=int, default=6, help="total epochs per arm (E)")
    parser.add_argument("--qat-epochs", type=int, default=2, help="the last Q epochs: fp32, QAT 8-bit or QAT 4-bit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=30, help="timed ORT calls per file and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds over the files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {name: run_model(name, args, Path(folder)) for name in args.models}
    save("qat_int8", {"args": {**vars(args), "out": str(args.out)}, "results": results}, args.out)
    print(f"\nmnist5k, {args.epochs} epochs ({args.qat_epochs} of them QAT for the QAT arms), seed {args.seed}\n")
    print(report(results))


if __name__ == "__main__":
    main()
