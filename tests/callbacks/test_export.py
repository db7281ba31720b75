import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import (
    CompressionConfigError,
    CompressionExport,
    KnowledgeDistillation,
    MagnitudePruning,
    QuantizationAwareTraining,
    restore,
)
from lightning_compress.deploy import bundle
from lightning_compress.deploy.cpu import resolve_weight_type
from lightning_compress.deploy.measure import ort_session
from lightning_compress.deploy.report import REPORT_VERSION
from lightning_compress.errors import ExportVerificationError
from tests.helpers import TinyModule, fit, loaders, logged_metrics, synthetic, trainer


def compressed_run(out, **kwargs):
    callbacks = [
        MagnitudePruning(final_sparsity=0.5, pattern="channel", end_epoch=1),
        QuantizationAwareTraining(start_epoch=1),
        CompressionExport(out, **kwargs),
    ]
    return fit(callbacks, module=TinyModule(bn=True), max_epochs=3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"formats": ["onnx", "tflite"]}, r"`formats` must be a list of formats, each one of 'onnx', .* got 'tflite'"),
        ({"formats": []}, r"`formats` must name at least one of"),
        ({"verify": "yes"}, "`verify` must be True or False, got 'yes'"),
        ({"pack_weights": "no"}, "`pack_weights` must be True or False, got 'no'"),
        ({"example_input": [1, 2]}, r"`example_input` must be a tensor batch or None, got \[1, 2\]"),
        ({"val_batches": 0}, "`val_batches` must be a positive number of batches or None, got 0"),
        ({"dirpath": 3}, "`dirpath` must be a folder path, got 3"),
        ({"int8_weights": "u8"}, "`int8_weights` must be one of 'auto', 'int8', 'uint8', got 'u8'"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        CompressionExport(**{"dirpath": "out", **kwargs})


def test_exports_verifies_and_reports(tmp_path):
    out = tmp_path / "exported"
    export = CompressionExport(out)
    _, module = compressed_run(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "before_after.png",
        "layers.png",
        "model.ckpt",
        "model.int8.onnx",
        "model.onnx",
        "report.json",
        "report.md",
    ]  # fmt: skip  (nothing temporary left behind)
    report = json.loads((out / "report.json").read_text())
    assert report["version"] == REPORT_VERSION and report["model"] == "TinyModule"
    assert set(report["verification"]) == {"onnx", "onnx_int8"}
    assert all(check["passed"] for check in report["verification"].values())
    assert report["structure"]["physical"] and report["structure"]["removed_channels"]
    assert report["after"]["params"] < 0.6 * report["before"]["params"]
    for key in ("ort_accuracy", "ort_latency_ms", "onnx_bytes", "int8_onnx_bytes", "compressed_bytes", "macs"):
        assert key in report["after"], key
    assert report["after"]["int8_onnx_bytes"] == (out / "model.int8.onnx").stat().st_size
    stored, why = resolve_weight_type("auto")  # the CPU decides: int8 with VNNI or on ARM, uint8 elsewhere
    assert report["files"]["onnx_int8"]["weights"] == stored and report["files"]["onnx_int8"]["weights_reason"] == why
    layers = {row["name"]: row for row in report["layers"]}
    assert layers["net.fc2"]["weight_bits"] == 8 and layers["net.conv1"]["sparsity"] >= 0.0
    assert "| params |" in (out / "report.md").read_text()
    session = ort_session(out / "model.onnx")  # the physically smaller file takes any batch size
    assert session.run(None, {session.get_inputs()[0].name: synthetic(5).tensors[0].numpy()})[0].shape == (5, 4)
    restored = restore(TinyModule(bn=True), out / "model.ckpt").eval()
    x = synthetic(8).tensors[0]
    with torch.no_grad():
        assert torch.equal(restored(x), module.eval()(x))
    del export


def test_without_qat_int8_is_refused_before_training_and_not_the_default(tmp_path):
    with pytest.raises(CompressionConfigError, match=r"cannot write `onnx_int8`: the run has no quantisation-aware"):
        fit([CompressionExport(tmp_path, formats=["onnx_int8"])], max_epochs=1)
    fit([MagnitudePruning(final_sparsity=0.5, end_epoch=1), CompressionExport(tmp_path / "plain")], max_epochs=1)
    assert sorted(p.name for p in (tmp_path / "plain").glob("model*")) == ["model.ckpt", "model.onnx"]


def test_a_folder_that_cannot_be_written_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(CompressionConfigError, match="`dirpath` must be a folder this process can write"):
        fit([CompressionExport(blocker / "out")], max_epochs=1)


def test_a_failed_verification_raises_and_writes_nothing(tmp_path, monkeypatch):
    def wrong(path, batch):
        return torch.full((len(batch), 4), 100.0).numpy()

    monkeypatch.setattr(bundle, "_run", wrong)
    with pytest.raises(ExportVerificationError, match=r"model.onnx: ONNX Runtime's output differs"):
        fit([CompressionExport(tmp_path, formats=["onnx"])], max_epochs=1)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_headline_figures_reach_the_loggers(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    callbacks = [MagnitudePruning(0.5, end_epoch=1), CompressionExport(tmp_path / "out", plots=False)]
    fit(callbacks, max_epochs=2, logger=logger)
    logger.save()
    metrics = logged_metrics(logger, prefix="export/")
    assert float(metrics["export/nonzero_params_ratio"]) == pytest.approx(0.5, abs=0.05)
    assert float(metrics["export/ort_accuracy"]) > 0 and "export/onnx_bytes_ratio" in metrics


def test_a_checkpoint_only_export_finishes_and_compares_no_file(tmp_path):
    # regression: `formats=["checkpoint"]` ended the fit with KeyError 'onnx_bytes' (a ratio with no file to
    # measure) after exporting the model as fit started for nothing
    logger = CSVLogger(tmp_path, name="run")
    callbacks = [MagnitudePruning(0.5, end_epoch=1), CompressionExport(tmp_path / "out", formats=["checkpoint"])]
    fit(callbacks, max_epochs=2, logger=logger)
    logger.save()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["before_after.png", "layers.png", "model.ckpt", "report.json", "report.md"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["baseline"] is None and "onnx_bytes" not in report["before"] and not report["verification"]
    metrics = logged_metrics(logger, prefix="export/")
    assert float(metrics["export/nonzero_params_ratio"]) == pytest.approx(0.5, abs=0.05)
    assert "export/onnx_bytes_ratio" not in metrics


def test_wandb_gets_the_figures_the_artifact_and_the_table(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="lightning-compress-tests", save_dir=str(tmp_path), offline=True)
    fit([CompressionExport(tmp_path / "out", plots=False)], max_epochs=1, logger=logger)
    summary = dict(logger.experiment.summary)
    assert summary["export/params_ratio"] == pytest.approx(1.0) and "export/layers" in summary
    assert list(tmp_path.rglob("run-*.wandb"))
    logger.experiment.finish()


@pytest.mark.slow
def test_ddp_exports_on_rank_zero_only(ddp_run):
    rank0, rank1 = ddp_run  # pruning + QAT + KD + low-rank + export, 2 processes
    assert rank0["exported"] == ["checkpoint", "onnx", "onnx_int8"] and rank1["exported"] == []


class FunctionalActivation(TinyModule):
    """A user module that keeps a plain function on its instance: ``self.act = F.relu``."""

    def __init__(self) -> None:
        super().__init__(bn=True)
        self.act = F.relu

    def forward(self, x, *, scale=1.0):
        return self.act(self.net(x, scale=scale))


def test_a_module_with_a_function_attribute_exports_with_distillation(tmp_path):
    # Regression: the export's copy used to delete every callable instance attribute (to drop the
    # distillation wrapper), so `self.act` was gone and the copy failed with AttributeError.
    out = tmp_path / "exported"
    teacher = TinyModule(bn=True)
    callbacks = [
        KnowledgeDistillation(teacher),
        MagnitudePruning(0.5, pattern="channel", end_epoch=1),
        QuantizationAwareTraining(start_epoch=1),
        CompressionExport(out, plots=False),
    ]
    _, module = fit(callbacks, module=FunctionalActivation(), max_epochs=3)
    report = json.loads((out / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values())
    assert sorted(report["files"]) == ["checkpoint", "onnx", "onnx_int8"]
    assert module.act is F.relu and "training_step" not in vars(module)


def test_one_dependency_trace_and_one_copy_per_format_written(tmp_path, monkeypatch):
    import copy as copy_module

    from lightning_compress.core import graph, surgery
    from lightning_compress.deploy import shrink

    traces, copies = [], []
    real_trace, real_deepcopy = graph.dependency_graph, copy_module.deepcopy
    monkeypatch.setattr(shrink, "dependency_graph", lambda *a: traces.append(1) or real_trace(*a))

    def counting(obj, *args, **kwargs):
        if isinstance(obj, TinyModule):  # copies of the whole model (not of its tensors)
            copies.append(type(obj).__name__)
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(surgery.copy, "deepcopy", counting)
    monkeypatch.setattr(bundle.copy, "deepcopy", counting)
    callbacks = [
        MagnitudePruning(final_sparsity=0.5, pattern="channel", end_epoch=1),
        QuantizationAwareTraining(start_epoch=1),
        CompressionExport(tmp_path / "out", plots=False),
    ]
    fit(callbacks, module=TinyModule(bn=True), max_epochs=3)
    assert len(traces) == 1
    # the `before` copy at fit start, the first epoch's (the default baseline, no teacher here), then the fp32
    # file's copy and the int8 file's copy
    assert copies == ["TinyModule"] * 4


class WithFeatures(TinyModule):
    """A module whose forward returns ``(logits, features)``."""

    def forward(self, x, *, scale=1.0):
        logits = self.net(x, scale=scale)
        return logits, logits.detach().relu()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x)[0], y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x)[0].argmax(1) == y).float().mean())


class TokenModel(pl.LightningModule):
    """Token ids in (an ``nn.Embedding``), logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, tokens):
        return self.fc2(F.relu(self.fc1(self.embed(tokens).mean(1))))

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return F.cross_entropy(self(tokens), y)

    def validation_step(self, batch, batch_idx):
        tokens, y = batch
        self.log("val/acc", (self(tokens).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-2)


def test_a_forward_returning_logits_and_features_exports_its_logits(tmp_path):
    # Regression: the export failed with "'tuple' object has no attribute 'abs'".
    out = tmp_path / "exported"
    callbacks = [MagnitudePruning(0.5, end_epoch=1), QuantizationAwareTraining(start_epoch=1), CompressionExport(out)]
    fit(callbacks, module=WithFeatures(bn=True), max_epochs=2)
    report = json.loads((out / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values())
    session = ort_session(out / "model.int8.onnx")
    assert [o.name for o in session.get_outputs()] == ["logits"]


def test_token_ids_are_exported_as_integers(tmp_path):
    # Regression: the integer input was cast to float on its way to ONNX Runtime.
    out = tmp_path / "exported"
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 32, (64, 6), generator=g), torch.randint(0, 4, (64,), generator=g))
    export = CompressionExport(out, plots=False)
    t = trainer(callbacks=[MagnitudePruning(0.5, end_epoch=1), export])
    t.fit(TokenModel(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    assert all(check["passed"] for check in export.report["verification"].values())
    assert ort_session(out / "model.onnx").get_inputs()[0].type == "tensor(int64)"
    assert export.report["after"]["ort_accuracy"] >= 0.0


# -- the accuracy baseline (#16: the report compared with the untrained model, an accuracy ratio of 10) -----------
def test_by_default_a_model_trained_from_scratch_is_compared_with_its_first_epoch_not_random_weights(tmp_path):
    export = CompressionExport(tmp_path / "out", plots=False)
    module = TinyModule(optimizer="adam", lr=0.01)  # learns in its first epoch (SGD at 0.05 is at chance there)
    fit([MagnitudePruning(final_sparsity=0.5, start_epoch=1, end_epoch=2), export], module=module, max_epochs=3)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    baseline = report["baseline"]
    assert set(baseline["candidates"]) == {"start", "first_epoch"}
    untrained = baseline["candidates"]["start"]  # 4 classes: about chance
    assert baseline["source"] == "first_epoch" and baseline["ort_accuracy"] > untrained
    assert baseline["ort_accuracy"] == max(baseline["candidates"].values())
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| ort_accuracy |" not in text  # no ratio of accuracies against the model as fit started
    assert "against the model after its first epoch" in text and "points |" in text


def test_the_teacher_is_the_default_baseline_of_a_distilled_run(tmp_path):
    pl.seed_everything(1, verbose=False)
    teacher = TinyModule()
    fit([], module=teacher, max_epochs=3)
    export = CompressionExport(tmp_path / "out", plots=False)
    fit([KnowledgeDistillation(teacher.net), export], max_epochs=1)
    baseline = export.report["baseline"]
    assert baseline["source"] == "teacher" and list(baseline["candidates"]) == ["teacher"]
    _, val_loader = loaders(seed=0)
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += int((teacher.eval()(x).argmax(1) == y).sum())
            total += len(y)
    assert baseline["ort_accuracy"] == pytest.approx(correct / total)  # the teacher's own accuracy, in ORT


def test_a_checkpoint_a_module_or_start_as_the_baseline(tmp_path):
    dense = TinyModule()
    fit([], module=dense, max_epochs=3)
    torch.save({"state_dict": dense.state_dict()}, tmp_path / "dense.ckpt")
    reports = {}
    for name, baseline in [("ckpt", tmp_path / "dense.ckpt"), ("module", dense), ("start", "start"), ("none", None)]:
        export = CompressionExport(tmp_path / name, plots=False, baseline=baseline)
        fit([MagnitudePruning(final_sparsity=0.5, end_epoch=1), export], max_epochs=2)
        reports[name] = export.report
    assert reports["ckpt"]["baseline"]["source"] == "dense.ckpt" and reports["module"]["baseline"]["source"] == "given"
    assert reports["ckpt"]["baseline"]["ort_accuracy"] == reports["module"]["baseline"]["ort_accuracy"]
    assert reports["start"]["baseline"]["source"] == "start"
    assert reports["start"]["baseline"]["ort_accuracy"] == reports["start"]["before"]["ort_accuracy"]
    assert reports["none"]["baseline"] is None and "ort_accuracy" not in reports["none"]["before"]


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ("teacher", r"baseline='teacher'\) needs a KnowledgeDistillation callback"),
        ("first_epoc", r"`baseline` must be one of 'auto', .* got 'first_epoc'. HINT: did you mean 'first_epoch'"),
        ("missing.ckpt", r"`baseline` must be .*a checkpoint file.* got 'missing.ckpt'. HINT: no such file"),
    ],
)
def test_a_baseline_that_cannot_be_had_is_refused_before_training(tmp_path, baseline, message):
    with pytest.raises(CompressionConfigError, match=message):
        fit([CompressionExport(tmp_path / "out", baseline=baseline)], max_epochs=1)
    assert not (tmp_path / "out").exists()


def test_the_artifact_name_is_checked_and_stable():
    from lightning_compress.callbacks.export import _artifact_name
    from lightning_compress.vision.module import ClassificationModule

    with pytest.raises(CompressionConfigError, match="`artifact_name` must be a W&B artifact name"):
        CompressionExport("out", artifact_name="my model/v1")
    assert _artifact_name(TinyModule()) == "compressed-TinyModule"
    assert _artifact_name(ClassificationModule("cnn_tiny", 10, 1)) == "compressed-ClassificationModule-cnn_tiny"
