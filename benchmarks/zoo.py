"""The torchvision zoo at full size: channel pruning + QAT + ``CompressionExport`` on each family.

Each model is torchvision's own class at its full size with random weights (``torchvision.models.get_model``,
10 classes, nothing downloaded), wrapped in a plain ``LightningModule`` and trained for two short epochs
on random images (structure, size, speed and verification only — no accuracy claims): 50% channel
pruning (default global allocation) over the first epoch, QAT int8 in the second, then the export.
Printed per model, as ratios of the exported files to the model as fit started (from ``report.json``):
parameters, MACs, ONNX bytes (fp32 and int8), ORT latency of the int8 file (batch of the example,
median), quantised layers / all Conv+Linear, whether channels were removed physically (or why not),
the int8 verification (max |difference| / tolerance, top-1 agreement) and the seconds it took.

Run: ``.venv/bin/python benchmarks/zoo.py`` (about 10 minutes on 2 cores at 64x64;
``--models resnet18 vit_b_16 --size 224`` for others).
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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import CompressionExport, MagnitudePruning, QuantizationAwareTraining

MODELS = [
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "shufflenet_v2_x0_5", "efficientnet_b0",
    "regnet_y_400mf", "densenet121", "googlenet", "squeezenet1_1", "convnext_tiny",
]  # fmt: skip


class Wrapped(pl.LightningModule):
    """A user's module around a torchvision classifier."""

    def __init__(self, name: str, size: int) -> None:
        super().__init__()
        import torchvision

        extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
        self.net = torchvision.models.get_model(name, weights=None, num_classes=10, **extra)
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


def run(name: str, size: int, batches: int, out: Path) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randn(8 * batches, 3, size, size, generator=g), torch.randint(0, 10, (8 * batches,)))
    module = Wrapped(name, size)
    layers = sum(isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) for m in module.modules())
    callbacks = [
        MagnitudePruning(0.5, pattern="channel", end_epoch=1),
        QuantizationAwareTraining(start_epoch=1),
        CompressionExport(out, plots=False, val_batches=1),
    ]
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        trainer.fit(module, DataLoader(images, batch_size=8), DataLoader(images, batch_size=8))
    except Exception as error:  # a family that fails is a row of the table, not the end of the run
        return {"model": name, "error": f"{type(error).__name__}: {str(error)[:160]}"}
    report = json.loads((out / "report.json").read_text())
    before, after, check = report["before"], report["after"], report["verification"]["onnx_int8"]
    quantised = sum(1 for row in report["layers"] if row["weight_bits"])
    return {
        "model": name,
        "params": after["params"] / before["params"],
        "macs": after["macs"] / before["macs"],
        "onnx_bytes": after["onnx_bytes"] / before["onnx_bytes"],
        "int8_bytes": after["int8_onnx_bytes"] / before["onnx_bytes"],
        "int8_latency": after["int8_ort_latency_ms"] / before["ort_latency_ms"],
        "int8_layers": f"{quantised}/{layers}",
        "physical": "yes" if report["structure"]["physical"] else f"no: {(report['structure']['reason'] or '')[:70]}",
        "int8_check": f"{check['max_abs_diff']:.3g} / {check['tolerance']:.3g}, {check['top1_agreement']:.2f}",
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--batches", type=int, default=3, help="training batches (of 8) per epoch")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the raw JSON results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            rows.append(run(name, args.size, args.batches, Path(folder)))
        print(json.dumps(rows[-1]), flush=True)
    header = ["model", "params", "MACs", "fp32 bytes", "int8 bytes", "int8 latency", "int8 layers", "channels removed",
              "int8 check (max abs diff / tol, top-1)", "s"]  # fmt: skip
    table = [
        [r["model"], *(["—"] * 8), r["error"]] if "error" in r else [
            r["model"], f"{r['params']:.2f}", f"{r['macs']:.2f}", f"{r['onnx_bytes']:.2f}", f"{r['int8_bytes']:.2f}",
            f"{r['int8_latency']:.2f}", r["int8_layers"], r["physical"], r["int8_check"], f"{r['seconds']:.0f}",
        ]
        for r in rows
    ]  # fmt: skip
    print(markdown(header, table))
    save("zoo", rows, args.out)
    return rows


if __name__ == "__main__":
    main()
