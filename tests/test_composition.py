"""The techniques together (issue #8): every subset with export, order, a big and a keyword model, resume."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_compress import (
    BudgetPlanner,
    ClassificationModule,
    CompressionExport,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from lightning_compress.core.low_rank import LowRank
from lightning_compress.core.quantization import observer_ranges
from tests.helpers import TinyModule, TinyNet, fit, synthetic, trainer

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = ("low_rank", "pruning", "qat", "kd")
SUBSETS = [s for r in range(1, 5) for s in itertools.combinations(TECHNIQUES, r)]


def techniques(subset: tuple[str, ...], teacher: Any, low_rank_epoch: int = 1, ramp_end: int = 2, qat: int = 1) -> list:
    """The callbacks of ``subset`` on :class:`TinyModule` (fresh objects)."""
    made = {
        "low_rank": lambda: LowRankFactorization(epoch=low_rank_epoch, ratio=0.5, include=["net.fc1", "net.conv2"]),
        "pruning": lambda: MagnitudePruning(final_sparsity=0.6, end_epoch=ramp_end),
        "qat": lambda: QuantizationAwareTraining(start_epoch=qat),
        "kd": lambda: KnowledgeDistillation(teacher, temperature=2.0, alpha=0.5),
    }
    return [made[name]() for name in subset]


PLANNED = ("planned",)  # all four with per-layer settings, as a budget plan writes them


def planned(teacher: Any) -> list:
    """Every technique with per-layer settings: ranks, sparsities (patterns that reach the factors) and bits;
    QAT with learned step sizes from calibrated ranges."""
    return [
        LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1", "net.conv2"], ranks={"net.fc1": 3}),
        MagnitudePruning(final_sparsity=0.6, end_epoch=2, layer_sparsity={"net.fc1*": 0.8, "net.conv1": 0.3}),
        QuantizationAwareTraining(
            start_epoch=1, layer_bits={"net.fc2": 4, "net.fc1": 6}, calibration_batches=2, scales="learned"
        ),
        KnowledgeDistillation(teacher, temperature=2.0, alpha=0.5),
    ]


BUDGETED = ("budgeted",)  # all four, their per-layer settings planned during the fit


def budgeted(teacher: Any) -> list:
    """BudgetPlanner at epoch 1 with every technique starting there, and distillation."""
    return [
        BudgetPlanner("bytes=0.6", epoch=1, runs=2),
        LowRankFactorization(epoch=1),
        MagnitudePruning(final_sparsity=0.6, start_epoch=1, end_epoch=2),
        QuantizationAwareTraining(start_epoch=1),
        KnowledgeDistillation(teacher, temperature=2.0, alpha=0.5),
    ]


SELF_KD = ("self_kd",)  # all four, distilled from the model itself as it was when compression started


def self_distilled(teacher: Any) -> list:
    """Every technique from epoch 1, distillation from a copy of the model (no teacher of its own)."""
    return [
        LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1", "net.conv2"]),
        MagnitudePruning(final_sparsity=0.6, start_epoch=1, end_epoch=2),
        QuantizationAwareTraining(start_epoch=1),
        KnowledgeDistillation(
            "self", temperature=2.0, alpha=0.5, features={"net.conv2": "net.conv2"}, feature_loss="attention"
        ),
    ]


@pytest.fixture(scope="module")
def teacher() -> TinyModule:
    _, module = fit([], module=TinyModule(bn=True), max_epochs=2, seed=7)
    return module


@pytest.fixture(scope="module")
def matrix(teacher, tmp_path_factory) -> dict[tuple[str, ...], Path]:
    """Train and export every non-empty subset once; keep each folder and the model's outputs on a batch."""
    root = tmp_path_factory.mktemp("matrix")
    x = synthetic(16, seed=5).tensors[0]
    folders = {}
    for subset in [*SUBSETS, PLANNED, BUDGETED, SELF_KD]:
        folder = root / "-".join(subset)
        made = {PLANNED: planned, BUDGETED: budgeted, SELF_KD: self_distilled}
        chosen = made[subset](teacher) if subset in made else techniques(subset, teacher)
        callbacks = [*chosen, CompressionExport(folder, plots=False, val_batches=1)]
        _, module = fit(callbacks, module=TinyModule(bn=True), max_epochs=3)
        module.eval()
        with torch.no_grad():
            torch.save({"input": x, "output": module(x)}, folder / "reference.pt")
        folders[subset] = folder
    return folders


@pytest.mark.slow
@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_every_subset_trains_exports_and_verifies(matrix, subset):
    folder = matrix[subset]
    report = json.loads((folder / "report.json").read_text())
    expected = {"checkpoint", "onnx"} | ({"onnx_int8"} if "qat" in subset else set())
    assert set(report["files"]) == expected
    assert set(report["verification"]) == expected - {"checkpoint"}
    assert all(check["passed"] for check in report["verification"].values())
    names = {p.name for p in folder.iterdir()}
    assert names == {"report.json", "report.md", "reference.pt"} | {
        Path(f["path"]).name for f in report["files"].values()
    }
    rows = {row["name"]: row for row in report["layers"]}
    assert ("net.fc1.0" in rows and rows["net.fc1.0"]["rank"]) if "low_rank" in subset else "net.fc1" in rows
    sparsity = sum(r["sparsity"] for r in rows.values()) / len(rows)
    assert (sparsity > 0.3) if "pruning" in subset else (sparsity < 0.05)
    assert all(r["weight_bits"] == 8 for r in rows.values()) if "qat" in subset else True


@pytest.mark.slow
def test_per_layer_settings_compose_export_and_verify(matrix):
    report = json.loads((matrix[PLANNED] / "report.json").read_text())
    assert set(report["verification"]) == {"onnx", "onnx_int8"}
    assert all(check["passed"] for check in report["verification"].values()), report["verification"]
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["net.fc1.0"]["rank"] == 3  # the first factor carries the rank
    assert rows["net.fc1.0"]["sparsity"] == pytest.approx(0.8, abs=0.01)  # the pattern reached the factors
    assert rows["net.conv1"]["sparsity"] == pytest.approx(0.3, abs=0.05)
    bits = {name: row["weight_bits"] for name, row in rows.items()}
    assert bits["net.fc2"] == 4 and bits["net.fc1.0"] == bits["net.fc1.1"] == 6  # the factors keep fc1's bits
    assert {bits[name] for name in rows if name not in ("net.fc2", "net.fc1.0", "net.fc1.1")} == {8}
    assert {row["scales"] for row in rows.values()} <= {"learned", "learned weights"}  # the factors learn too
    assert "learned" in {row["scales"] for row in rows.values()}


@pytest.mark.slow
def test_a_plan_made_during_the_fit_composes_with_every_technique(matrix):
    report = json.loads((matrix[BUDGETED] / "report.json").read_text())
    assert report["verification"] and all(check["passed"] for check in report["verification"].values())
    assert "onnx_int8" in report["files"]  # the bytes target quantises


@pytest.mark.slow
def test_distillation_from_the_model_itself_composes_with_every_technique(matrix):
    report = json.loads((matrix[SELF_KD] / "report.json").read_text())
    assert set(report["files"]) == {"checkpoint", "onnx", "onnx_int8"}
    assert all(check["passed"] for check in report["verification"].values()), report["verification"]
    assert report["baseline"]["source"] == "teacher"  # the dense float copy taken at epoch 1
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["net.fc1.0"]["rank"] and sum(r["sparsity"] for r in rows.values()) / len(rows) > 0.3


@pytest.mark.slow
def test_every_exported_checkpoint_restores_in_a_fresh_process(matrix):
    script = (
        "import sys, torch\n"
        "from lightning_compress import restore\n"
        "from tests.helpers import TinyModule\n"
        "for folder in sys.argv[1:]:\n"
        "    ref = torch.load(folder + '/reference.pt')\n"
        "    module = restore(TinyModule(bn=True), folder + '/model.ckpt').eval()\n"
        "    with torch.no_grad():\n"
        "        out = module(ref['input'])\n"
        "    assert torch.allclose(out, ref['output'], atol=1e-6), (folder, (out - ref['output']).abs().max())\n"
        "print('restored', len(sys.argv) - 1)\n"
    )
    folders = [str(f) for f in matrix.values()]
    done = subprocess.run([sys.executable, "-c", script, *folders], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"restored {len(SUBSETS) + 3}" in done.stdout  # every subset, the planned, budgeted and self-taught runs


def _state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.slow
def test_the_order_of_the_callbacks_does_not_change_the_result(teacher, tmp_path):
    results = []
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 3, 1]):
        made = [*techniques(TECHNIQUES, teacher), CompressionExport(tmp_path / str(order), plots=False)]
        pl.seed_everything(0, verbose=False)  # the same initial weights: built before `fit` seeds, they took
        module = TinyModule(bn=True)  # whatever RNG state the test before left (right only after the matrix)
        t, module = fit([made[i] for i in order], module=module, max_epochs=3)
        report = json.loads((tmp_path / str(order) / "report.json").read_text())
        results.append((_state(module), float(t.callback_metrics["val/acc"]), report["after"]["nonzero_params"]))
    first = results[0]
    for state, acc, nonzero in results[1:]:
        assert state.keys() == first[0].keys()
        for key, value in state.items():
            assert torch.equal(value, first[0][key]), key
        assert (acc, nonzero) == first[1:]


class _Images(Dataset):
    """Synthetic RGB images of ``size`` as ``(image, label)`` or ``{"input", "target"}``."""

    def __init__(self, n: int, size: int, as_dict: bool = False, seed: int = 0) -> None:
        data = synthetic(n, seed)
        images = F.interpolate(data.tensors[0], size=(size, size)).repeat(1, 3, 1, 1)
        self.images, self.labels, self.as_dict = images, data.tensors[1], as_dict

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Any:
        if self.as_dict:
            return {"input": self.images[i], "target": self.labels[i]}
        return self.images[i], self.labels[i]


@pytest.mark.slow
def test_the_full_combination_on_resnet18(tmp_path):
    pl.seed_everything(0, verbose=False)
    student = ClassificationModule("resnet18", num_classes=4, in_channels=3, lr=0.01)
    teacher = ClassificationModule("cnn_tiny", num_classes=4, in_channels=3)
    callbacks = [
        LowRankFactorization(epoch=1, ratio=0.5, include=["model.layer4.1.conv2", "model.fc"]),
        MagnitudePruning(final_sparsity=0.5, pattern="channel", scope="layer", end_epoch=1),
        QuantizationAwareTraining(start_epoch=1, layer_bits={"model.layer3.*": 4}),  # mixed precision, packed
        KnowledgeDistillation(teacher),
        CompressionExport(tmp_path / "out", plots=False, val_batches=1),
    ]
    train = DataLoader(_Images(32, 32), batch_size=8, shuffle=True)
    val = DataLoader(_Images(16, 32, seed=1), batch_size=8)
    trainer(callbacks=callbacks, max_epochs=2, limit_train_batches=2).fit(student, train, val)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["files"]) == {"checkpoint", "onnx", "onnx_int8"}
    assert all(check["passed"] for check in report["verification"].values())
    assert report["structure"]["physical"] and report["after"]["params"] < 0.5 * report["before"]["params"]
    # the int8 file is physically smaller too: about a quarter of the (already smaller) fp32 file
    assert report["files"]["onnx_int8"]["bytes"] < 0.4 * report["files"]["onnx"]["bytes"]
    # layer3's 4-bit weights, channels removed, are stored two to a byte; every other layer a byte a weight
    storage = report["files"]["onnx_int8"]["storage"]
    layer3 = {row["name"] for row in report["layers"] if row["name"].startswith("model.layer3.")}
    assert storage["int8_storage_reason"] is None and storage["packed"] == dict.fromkeys(layer3, 4)
    assert isinstance(student.model.layer4[1].conv2, LowRank)
    # the 4-class head is named, but at the rank floor (4) its factors would not save parameters (#14:
    # this run used to factorise it to rank 1)
    assert not isinstance(student.model.fc, LowRank)


class KeywordModule(pl.LightningModule):
    """A user module whose forward is called with keywords and whose batches are dicts."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet(bn=True)

    def forward(self, images: Tensor, *, temperature: float = 1.0) -> Tensor:
        return self.net(images) / temperature

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(images=batch["input"], temperature=1.0), batch["target"])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/acc", (self(images=batch["input"]).argmax(1) == batch["target"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@pytest.mark.slow
def test_the_full_combination_on_a_keyword_argument_model(tmp_path):
    pl.seed_everything(0, verbose=False)
    teacher = TinyModule(bn=True)
    train = DataLoader(_Images(64, 8, as_dict=True), batch_size=16)
    val = DataLoader(_Images(32, 8, as_dict=True, seed=1), batch_size=16)
    train.dataset.images = train.dataset.images[:, :1]  # TinyNet takes one channel
    val.dataset.images = val.dataset.images[:, :1]
    callbacks = [*techniques(TECHNIQUES, teacher), CompressionExport(tmp_path / "out", plots=False)]
    module = KeywordModule()
    t = trainer(callbacks=callbacks, max_epochs=3)
    t.fit(module, train, val)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values())
    assert set(report["files"]) == {"checkpoint", "onnx", "onnx_int8"}
    assert float(t.callback_metrics["kd/response_loss"]) > 0 and isinstance(module.net.fc1, LowRank)


def _snapshot(module: torch.nn.Module) -> dict[str, Any]:
    masks = {k: v for k, v in _state(module).items() if k.endswith("_mask")}
    ranks = {n: int(m[0].weight.shape[0]) for n, m in module.named_modules() if isinstance(m, LowRank)}
    return {"state": _state(module), "masks": masks, "ranks": ranks, "ranges": observer_ranges(module)}


@pytest.mark.slow
def test_resume_before_and_after_low_rank_mid_ramp_and_mid_qat_matches_the_uninterrupted_run(teacher, tmp_path):
    """Schedule: pruning ramps over epochs 0-4, low-rank at 2, QAT from 4, KD throughout; 6 epochs."""
    options = {"low_rank_epoch": 2, "ramp_end": 4, "qat": 4}
    every_epoch = ModelCheckpoint(tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    t, module = fit([*techniques(TECHNIQUES, teacher, **options), every_epoch], module=TinyModule(bn=True),
                    max_epochs=6, enable_checkpointing=True)  # fmt: skip
    full, accuracy = _snapshot(module), float(t.callback_metrics["val/acc"])
    assert full["masks"] and set(full["ranks"]) == {"net.fc1", "net.conv2"} and full["ranges"]
    # after epoch 1: before low-rank and mid ramp; 2: right after low-rank; 3: mid ramp; 4: mid QAT
    for epoch in (1, 2, 3, 4):
        t, module = fit(techniques(TECHNIQUES, teacher, **options), module=TinyModule(bn=True), max_epochs=6,
                        ckpt_path=str(tmp_path / f"epoch={epoch}.ckpt"))  # fmt: skip
        resumed = _snapshot(module)
        assert resumed["ranks"] == full["ranks"] and resumed["ranges"] == full["ranges"], epoch
        assert resumed["masks"].keys() == full["masks"].keys()
        for key, value in resumed["state"].items():
            assert torch.equal(value, full["state"][key]), (epoch, key)
        assert float(t.callback_metrics["val/acc"]) == accuracy
