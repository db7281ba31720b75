"""Post-training quantisation: ours (plain, + cross-layer equalisation, + bias correction) vs ONNX Runtime's
``quantize_static``, in one run.

For each model (cnn_wide on mnist5k 28x28; mobilenet_v2 and efficientnet_b0 on mnist5k resized to 32x32 with 3
channels), one seed:
  1. train fp32 for E epochs (Adam, the ClassificationModule's defaults);
  2. export the fp32 ONNX file; ORT's ``quantize_static`` of it (QDQ, per-channel int8 weights, uint8
     activations, MinMax, after ``quant_pre_process``) on C calibration images -- the anchor; and our
     :func:`lightning_compress.core.quantization.calibrate` on the same images (4 arms: plain, ``equalize``,
     ``bias_correction``, both), exported int8 through the verified path;
  3. in ONNX Runtime: top-1 on the 1,000 validation images, file bytes, and batch-64 latency (R interleaved
     rounds over the files, each the median of N calls, one session alive at a time; median over rounds).
Prints the table with accuracy differences (points) and latency ratios against the ORT anchor.

Run: ``.venv/bin/python benchmarks/ptq.py`` (about 25 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from common import RESULTS, markdown, save
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import ClassificationModule, export_onnx, get_datamodule
from lightning_compress.core import quantization as q
from lightning_compress.deploy.measure import ort_accuracy, ort_latency_ms
from lightning_compress.deploy.onnx import int8_copy, pick_logits
from lightning_compress.deploy.verify import verify_int8
from lightning_compress.errors import ExportVerificationError
from lightning_compress.vision.models import MODELS, torchvision_model

SHAPES = {"cnn_wide": (1, 28), "mobilenet_v2": (3, 32), "efficientnet_b0": (3, 32)}  # (channels, size)
OURS = {
    "ours PTQ": {},
    "ours PTQ + CLE": {"equalize": True},
    "ours PTQ + BC": {"bias_correction": True},
    "ours PTQ + CLE + BC": {"equalize": True, "bias_correction": True},
}


def data(
    model: str, seed: int, dataset: str = "mnist5k", batch_size: int = 64
) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """``dataset`` as ``model`` takes it: 28x28 grey, or 32x32 with the grey channel repeated 3 times (resized)."""
    channels, size = SHAPES[model]
    dm = get_datamodule(dataset, batch_size=1000, seed=seed)
    dm.setup("fit")

    def tensors(loader: Any) -> TensorDataset:
        xs, ys = zip(*loader, strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        if size != x.shape[-1]:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return TensorDataset(x.repeat(1, channels // x.shape[1], 1, 1), y)

    train = tensors(dm.train_dataloader())
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(tensors(dm.val_dataloader()), batch_size=250))  # fmt: skip


class Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int = 64) -> None:
        self.batches = iter([{"input": images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def run_model(name: str, args: argparse.Namespace, folder: Path) -> dict[str, dict[str, float]]:
    pl.seed_everything(args.seed, verbose=False)
    train, val = data(name, args.seed, args.data)
    channels, size = SHAPES[name]
    module = ClassificationModule(name if name in MODELS else torchvision_model(name, 10, size), 10, channels)
    start = time.perf_counter()
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, train, val)
    print(f"{name}: trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    model = module.model.eval()
    images = torch.cat([x for x, _ in train])[: args.calibration]
    batches = [images[i : i + 64] for i in range(0, len(images), 64)]
    example = images[:1]
    paths = {"fp32": export_onnx(model, example, folder / f"{name}.fp32.onnx")}
    pre = folder / f"{name}.pre.onnx"
    quant_pre_process(str(paths["fp32"]), str(pre))
    paths["ORT quantize_static"] = folder / f"{name}.ort.onnx"
    start = time.perf_counter()
    quantize_static(
        str(pre), str(paths["ORT quantize_static"]), Reader(images.numpy()), quant_format=QuantFormat.QDQ,
        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    seconds = {"ORT quantize_static": time.perf_counter() - start}
    extra: dict[str, dict[str, Any]] = {}
    check = next(iter(val))[0][:64]
    for arm, options in OURS.items():
        ptq = copy.deepcopy(model)
        start = time.perf_counter()
        done = q.calibrate(ptq, batches, **options)
        seconds[arm] = time.perf_counter() - start
        path = export_onnx(ptq, example, folder / f"{name}.{len(paths)}.onnx", int8=True)
        paths[arm] = path
        with torch.no_grad():
            fake_quant, floats = ptq(check), model(check)
        try:
            verify_int8(path, int8_copy(ptq, example), check, fake_quant, floats, pick_logits)
            verified = True
        except ExportVerificationError as error:
            print(f"{name}: {arm}: the int8 file does not reproduce the model: {error}", flush=True)
            verified = False
        extra[arm] = {
            "pairs": len(done.equalized.pairs) if done.equalized else 0,
            "clipped": len(done.equalized.clipped) if done.equalized else 0,
            "corrected": len(done.bias_corrected),
            "verified": verified,
        }
        print(f"{name}: {arm}: {extra[arm]} in {seconds[arm]:.1f} s", flush=True)
    results = {arm: {"bytes": float(p.stat().st_size), "acc": ort_accuracy(p, val)} for arm, p in paths.items()}
    latency: dict[str, list[float]] = {arm: [] for arm in paths}
    batch = check
    for _ in range(args.rounds):
        for arm, path in paths.items():
            latency[arm].append(ort_latency_ms(path, batch, args.runs))
    for arm in paths:
        results[arm]["latency_ms"] = statistics.median(latency[arm])
        results[arm]["seconds"] = seconds.get(arm, 0.0)
        results[arm].update(extra.get(arm, {}))
        print(f"{name}: {arm}: {results[arm]}", flush=True)
    return results


def report(all_results: dict[str, dict[str, dict[str, Any]]]) -> str:
    header = ["model", "arm", "ORT acc %", "vs ORT PTQ (points)", "vs plain PTQ (points)", "bytes / fp32",
              "latency / ORT PTQ", "latency / fp32", "pairs equalised (ReLU6-bounded)", "time (s)"]  # fmt: skip
    rows = []
    for name, results in all_results.items():
        fp32, ort, plain = results["fp32"], results["ORT quantize_static"], results["ours PTQ"]
        for arm, r in results.items():
            ours = arm.startswith("ours")
            rows.append([
                name, arm, f"{100 * r['acc']:.2f}", f"{100 * (r['acc'] - ort['acc']):+.2f}" if ours else "",
                f"{100 * (r['acc'] - plain['acc']):+.2f}" if ours and arm != "ours PTQ" else "",
                f"{r['bytes'] / fp32['bytes']:.3f}", f"{r['latency_ms'] / ort['latency_ms']:.3f}",
                f"{r['latency_ms'] / fp32['latency_ms']:.2f} ({r['latency_ms']:.2f} ms)",
                f"{r['pairs']} ({r['clipped']})" if r.get("pairs") else "",
                f"{r['seconds']:.1f}" if r["seconds"] else "",
            ])  # fmt: skip
    return markdown(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--data", default="mnist5k", choices=["mnist5k", "digits"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=int, default=256, help="calibration images (C)")
    parser.add_argument("--runs", type=int, default=30, help="timed ORT calls per file and round (N)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds over the files (R)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = {name: run_model(name, args, Path(folder)) for name in args.models}
    save("ptq", {"args": {**vars(args), "out": str(args.out)}, "results": results}, args.out)
    print(f"\n{args.data}, {args.epochs} fp32 epochs, seed {args.seed}, {args.calibration} calibration images\n")
    print(report(results))


if __name__ == "__main__":
    main()
