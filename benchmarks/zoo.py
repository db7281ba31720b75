"""The torchvision zoo at full size: channel pruning or low-rank, + QAT + ``CompressionExport``, on each family.

Each model is torchvision's own class at its full size with random weights (``torchvision.models.get_model``,
10 classes, nothing downloaded), wrapped in a plain ``LightningModule`` and trained for two short epochs
on a few of the embedded MNIST-5k images, resized and in colour (structure, size, speed and
verification only — no accuracy claims; BatchNorm statistics recomputed from those images first, as a
trained model has them). Techniques (``--techniques``): ``channel``, 50% channel pruning (default
global allocation) over the first epoch and QAT int8 in the second; ``low_rank``, low-rank
factorisation (default ratio 0.5 and skips) and QAT int8 from the second epoch. Then the export.
Printed per model, as ratios of the exported files to the model as fit started (from ``report.json``):
parameters, MACs, ONNX bytes (fp32 and int8), ORT latency of the int8 file (batch of the example,
median), quantised layers / all Conv+Linear of the exported model, whether channels were removed
physically (or why not), the int8 verification (the largest layer-by-layer difference in quantisation
steps over every quantised tensor; SQNR of the int8 file and of the fake-quant model against the fp32
model), the fp32 file's SQNR and the seconds it took.

Inception-v3 runs at 75x75 and MaxViT at 224x224 at least (their strides and windows need it).

Run: ``.venv/bin/python benchmarks/zoo.py`` (about 30 minutes on 2 cores at 64x64;
``--models resnet18 vit_b_16 --size 224 --techniques channel`` for a part).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import RESULTS, markdown, save
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionExport, LowRankFactorization, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.core.calibration import recalibrate_batchnorm
from lightning_compress.vision.models import torchvision_model

MODELS = [
    "alexnet", "vgg11_bn", "resnet18", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
    "shufflenet_v2_x0_5", "efficientnet_b0", "regnet_y_400mf", "densenet121", "googlenet", "inception_v3",
    "squeezenet1_1", "convnext_tiny", "vit_b_16", "swin_t", "maxvit_t",
]  # fmt: skip
SMALLEST = {"inception_v3": 75, "maxvit_t": 224}  # the input sizes their strides and windows need at least
TECHNIQUES = {
    "channel": "50% channel pruning (default global allocation) over the first epoch, QAT int8 in the second",
    "low_rank": "low-rank (default ratio 0.5 and skips) at the second epoch with QAT int8",
}


class Wrapped(pl.LightningModule):
    """A user's module around a torchvision classifier."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__()
        self.net = torchvision_model(name, 10, size)
        self.example_input_array = torch.zeros(2, 3, size, size)

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), 1e-4)


def mnist(count: int, size: int) -> TensorDataset:
    """``count`` of the embedded MNIST-5k images, in colour (the grey copied to 3 channels) at ``size``."""
    from lightning_compress.vision.data import MNIST5kDataModule

    data = MNIST5kDataModule()
    data.setup("fit")
    train = data.train_set
    assert train is not None
    x = torch.stack([train[i][0] for i in range(count)])
    y = torch.tensor([int(train[i][1]) for i in range(count)])
    return TensorDataset(F.interpolate(x, size=size, mode="bilinear").repeat(1, 3, 1, 1), y)


def run(name: str, size: int, batches: int, out: Path, technique: str = "channel") -> dict[str, Any]:
    size = max(size, SMALLEST.get(name, size))
    pl.seed_everything(0, verbose=False)
    images = mnist(8 * batches, size)
    module = Wrapped(name, size)
    # running statistics of the data, as in a trained model (torchvision's initial ones make several
    # families' outputs independent of the input, and a verification of those checks nothing)
    recalibrate_batchnorm(module, [images.tensors[0]])
    compression: list[pl.Callback] = (
        [MagnitudePruning(0.5, pattern="channel", end_epoch=1)] if technique == "channel" else [LowRankFactorization(1)]
    )
    export = CompressionExport(out, plots=False, val_batches=1)
    callbacks = [*compression, QuantizationAwareTraining(start_epoch=1), export]
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        trainer.fit(module, DataLoader(images, batch_size=8), DataLoader(images, batch_size=8))
    except Exception as error:  # a family that fails is a row of the table, not the end of the run
        return {"model": name, "technique": technique, "error": f"{type(error).__name__}: {str(error)[:160]}"}
    report = json.loads((out / "report.json").read_text())
    before, after, check = report["before"], report["after"], report["verification"]["onnx_int8"]
    quantised = sum(1 for row in report["layers"] if row["weight_bits"])
    return {
        "model": name,
        "technique": technique,
        "params": after["params"] / before["params"],
        "macs": after["macs"] / before["macs"],
        "onnx_bytes": after["onnx_bytes"] / before["onnx_bytes"],
        "int8_bytes": after["int8_onnx_bytes"] / before["onnx_bytes"],
        "int8_latency": after["int8_ort_latency_ms"] / before["ort_latency_ms"],
        "int8_layers": f"{quantised}/{len(report['layers'])}",  # of the Conv/Linear layers of the exported model
        "physical": physical(report["structure"], technique),
        "int8_check": f"{check['layers']['max_steps']:.0f} step, {check['layers']['compared']} tensors; "
        f"{check['sqnr_vs_float_db']:.0f} dB ({check['fake_quant_sqnr_vs_float_db']:.0f})",
        "fp32_sqnr": report["verification"]["onnx"]["sqnr_db"],
        "seconds": time.perf_counter() - start,
    }


def physical(structure: dict[str, Any], technique: str) -> str:
    """Whether channels came out: ``yes``, ``no: why`` or ``—`` (no channel pruning in this technique)."""
    if structure["physical"]:
        return "yes"
    if technique != "channel" and not structure["reason"]:
        return "—"
    return f"no: {(structure['reason'] or 'no zero channels')[:70]}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--batches", type=int, default=3, help="training batches (of 8) per epoch")
    parser.add_argument("--techniques", nargs="+", default=list(TECHNIQUES), choices=list(TECHNIQUES))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for technique in args.techniques:
        for name in args.models:
            with tempfile.TemporaryDirectory() as folder:
                rows.append(run(name, args.size, args.batches, Path(folder), technique))
            print(json.dumps(rows[-1]), flush=True)
    header = ["model", "technique", "params", "MACs", "fp32 bytes", "int8 bytes", "int8 latency", "int8 layers",
              "channels removed", "int8 check: max layer diff, SQNR vs fp32 (fake-quant's)", "fp32 SQNR dB",
              "s"]  # fmt: skip
    table = [
        [r["model"], r["technique"], *(["—"] * 9), r["error"]] if "error" in r else [
            r["model"], r["technique"], f"{r['params']:.2f}", f"{r['macs']:.2f}", f"{r['onnx_bytes']:.2f}",
            f"{r['int8_bytes']:.2f}", f"{r['int8_latency']:.2f}", r["int8_layers"], r["physical"], r["int8_check"],
            f"{r['fp32_sqnr']:.0f}", f"{r['seconds']:.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    print(markdown(header, table))
    save("zoo", rows, args.out)
    return rows


if __name__ == "__main__":
    main()
