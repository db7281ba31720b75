import copy
import csv
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_compress import (
    ClassificationModule,
    CompressionConfigError,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
    export_onnx,
)
from lightning_compress.core.distillation import response_kd_loss
from lightning_compress.core.layers import select_layers
from lightning_compress.core.low_rank import LowRank
from lightning_compress.core.pruning import sparsity
from lightning_compress.core.quantization import quantized_layers
from tests.helpers import TinyModule, TinyNet, fit, loaders, logged_metrics, synthetic, weights


@pytest.fixture(scope="module")
def trained_teacher() -> pl.LightningModule:
    _, teacher = fit([], max_epochs=3, seed=7)
    return teacher


@pytest.fixture
def teacher(trained_teacher) -> pl.LightningModule:
    return copy.deepcopy(trained_teacher)


class LossProbe(pl.Callback):
    """Recompute the documented mixed loss on the first batch from a copy of the student taken before it."""

    def __init__(self, kd: KnowledgeDistillation) -> None:
        self.kd = kd
        self.expected: float | None = None
        self.got: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            x, y = batch
            with torch.no_grad():
                logits = pl_module(x)
                kd = response_kd_loss(logits, self.kd.teacher(x), self.kd.temperature)
                self.expected = float((1 - self.kd.alpha) * F.cross_entropy(logits, y) + self.kd.alpha * kd)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.got = float(outputs["loss"])


# -- construction: one test per message -----------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, "`temperature` must be a number > 0, got 0"),
        ({"alpha": 1.5}, r"`alpha` must be a number in \[0, 1\], got 1.5"),
        ({"alpha": "0.5"}, r"`alpha` must be a number in \[0, 1\], got '0.5'"),
        ({"features": ["net.conv1"]}, "`features` must be a mapping of student layer names to teacher layer names"),
        ({"feature_loss": "mae"}, "`feature_loss` must be one of 'mse', 'cosine', 'rkd', 'attention', got 'mae'"),
        ({"feature_loss": "cosin"}, "got 'cosin'. HINT: did you mean 'cosine'"),
        ({"feature_weight": -1}, "`feature_weight` must be a number >= 0, got -1"),
        ({"input_fn": 3}, "`input_fn` must be a callable or None, got 3"),
        ({"logits_fn": "logits"}, "`logits_fn` must be a callable or None, got 'logits'"),
        ({"logits_module": 1}, "`logits_module` must be a submodule name or None, got 1"),
        ({"save_teacher": 1}, "`save_teacher` must be True or False, got 1"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        KnowledgeDistillation(TinyNet(), **kwargs)


def test_teacher_of_the_wrong_type_and_missing_file():
    with pytest.raises(CompressionConfigError, match=r"`teacher` must be an nn.Module, a LightningModule or the path"):
        KnowledgeDistillation(teacher=42)  # type: ignore[arg-type]
    with pytest.raises(CompressionConfigError, match="no such file"):
        KnowledgeDistillation(teacher="missing/teacher.ckpt")
    with pytest.raises(CompressionConfigError, match=r"`teacher_class` must be an nn.Module or LightningModule class"):
        KnowledgeDistillation(teacher=__file__, teacher_class=dict)  # type: ignore[arg-type]


# -- the loss -----------------------------------------------------------------------------------------
def test_the_step_returns_the_documented_mix(teacher):
    kd = KnowledgeDistillation(teacher, temperature=3.0, alpha=0.7)
    probe = LossProbe(kd)
    fit([kd, probe], max_epochs=1, seed=1)
    assert probe.got == pytest.approx(probe.expected, rel=1e-5)


def test_alpha_zero_trains_exactly_like_no_callback(teacher):
    _, alone = fit([], max_epochs=2, seed=1)
    _, taught = fit([KnowledgeDistillation(teacher, alpha=0.0)], max_epochs=2, seed=1)
    for name, weight in weights(alone).items():
        assert torch.allclose(weight, weights(taught)[name], atol=1e-6), name


def test_kd_moves_the_student_toward_the_teacher(teacher):
    x = synthetic(64, seed=5).tensors[0]

    def disagreement(module: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(response_kd_loss(module(x), teacher(x)))

    _, alone = fit([], module=TinyModule(lr=0.01), max_epochs=3, seed=1)
    kd = KnowledgeDistillation(copy.deepcopy(teacher), alpha=1.0)
    _, taught = fit([kd], module=TinyModule(lr=0.01), max_epochs=3, seed=1)
    assert disagreement(taught) < 0.7 * disagreement(alone)  # 11.2 vs 20.2 when written


def test_teacher_frozen_not_in_optimizer_model_or_checkpoint(teacher, tmp_path):
    before = copy.deepcopy(teacher.state_dict())
    kd = KnowledgeDistillation(teacher)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t, student = fit([kd, checkpoint], max_epochs=1, seed=1, enable_checkpointing=True)
    assert not kd.teacher.training and not any(p.requires_grad for p in kd.teacher.parameters())
    for key, value in before.items():
        assert torch.equal(value, kd.teacher.state_dict()[key]), key
    in_optimizer = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in kd.teacher.parameters()}
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(student.state_dict())
    assert "teacher" not in saved["callbacks"][kd.state_key]
    assert "training_step" not in student.__dict__  # the module's own step is back


def test_save_teacher_keeps_its_weights_in_the_callback_state(teacher):
    kd = KnowledgeDistillation(teacher, save_teacher=True)
    fit([kd], max_epochs=1, seed=1)
    state = kd.state_dict()
    other = KnowledgeDistillation(TinyModule(), save_teacher=True)
    other.load_state_dict(state)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, other.teacher.state_dict()[key]), key


def test_teacher_follows_the_student_dtype(teacher):
    kd = KnowledgeDistillation(teacher)
    fit([kd], max_epochs=1, seed=1, precision="64-true")
    assert next(kd.teacher.parameters()).dtype == torch.float64


def test_logs_kd_figures(teacher, tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    kd = KnowledgeDistillation(teacher, alpha=0.5, features={"net.fc1": "net.fc1"})
    fit([kd], max_epochs=2, seed=1, logger=logger)
    metrics = {k: float(v) for k, v in logged_metrics(logger, prefix="kd/").items()}
    assert set(metrics) == {"kd/loss", "kd/task_loss", "kd/response_loss", "kd/feature_loss"}
    expected = 0.5 * metrics["kd/task_loss"] + 0.5 * metrics["kd/response_loss"] + metrics["kd/feature_loss"]
    assert metrics["kd/loss"] == pytest.approx(expected, rel=1e-4)  # epoch means of a linear mix


# -- feature KD ---------------------------------------------------------------------------------------
def test_feature_adapters_train_with_the_optimizer_and_stay_out_of_the_model(teacher, tmp_path):
    pairs = {"net.fc1": "net.fc2", "net.conv2": "net.conv2"}
    kd = KnowledgeDistillation(teacher, features=pairs, feature_loss="cosine")
    t, student = fit([kd], max_epochs=2, seed=1)
    adapter = kd.adapters["net.fc1"]
    assert isinstance(adapter, torch.nn.Linear) and (adapter.in_features, adapter.out_features) == (16, 4)
    assert isinstance(kd.adapters["net.conv2"], torch.nn.Identity)  # same shapes: no parameters
    groups = t.optimizers[0].param_groups
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == {id(p) for p in adapter.parameters()}
    assert groups[1]["lr"] == groups[0]["lr"] and groups[1]["momentum"] == groups[0]["momentum"]
    assert t.optimizers[0].state[adapter.weight]  # it took optimizer steps
    assert not any("adapter" in key for key in student.state_dict())
    path = export_onnx(student.net, synthetic(4).tensors[0], tmp_path / "student.onnx")
    assert path.exists()


def test_conv_adapters_bridge_channels_and_resolution():
    wide = ClassificationModule("cnn_wide", num_classes=4)
    pairs = {"model.features.3": "model.features.2", "model.features": "model.features"}  # 8@4x4->64@8x8, 16->256
    kd = KnowledgeDistillation(wide, features=pairs)
    fit([kd], module=ClassificationModule("cnn_tiny", num_classes=4), max_epochs=1, limit_train_batches=2)
    resize = kd.adapters["model.features.3"]
    assert isinstance(resize, torch.nn.Sequential) and isinstance(resize[1], torch.nn.Upsample)
    assert (resize[0].in_channels, resize[0].out_channels) == (8, 64)
    conv = kd.adapters["model.features"]
    assert isinstance(conv, torch.nn.Conv2d) and (conv.in_channels, conv.out_channels) == (16, 256)


def test_missing_layers_name_the_nearest(teacher):
    with pytest.raises(CompressionConfigError, match=r"student layer 'net.conv3' does not exist.*'net.conv1'"):
        fit([KnowledgeDistillation(teacher, features={"net.conv3": "net.conv2"})], max_epochs=1)
    with pytest.raises(CompressionConfigError, match=r"teacher layer 'net.fc' does not exist.*nearest names"):
        fit([KnowledgeDistillation(teacher, features={"net.conv1": "net.fc"})], max_epochs=1)


def test_features_that_cannot_be_bridged(teacher):
    kd = KnowledgeDistillation(teacher, features={"net.fc1": "net.conv1"})
    with pytest.raises(CompressionConfigError, match=r"feature pair 'net.fc1' -> 'net.conv1': cannot bridge"):
        fit([kd], max_epochs=1)


def test_resume_restores_adapters_and_optimizer_state(teacher, tmp_path):
    def run(ckpt_path=None, subdir="a"):
        kd = KnowledgeDistillation(copy.deepcopy(teacher), features={"net.fc1": "net.fc2"})
        checkpoint = ModelCheckpoint(dirpath=tmp_path / subdir, save_top_k=-1, every_n_epochs=1)
        module = TinyModule(optimizer="adam", lr=0.01)
        fit([kd, checkpoint], module=module, max_epochs=3, seed=1, ckpt_path=ckpt_path, enable_checkpointing=True)
        return module, kd

    full, full_kd = run()
    mid = tmp_path / "a" / "epoch=0-step=8.ckpt"
    saved = torch.load(mid, weights_only=True)["callbacks"][full_kd.state_key]
    assert saved["adapters"]["net.fc1"]["teacher_shape"] == [16, 4]
    resumed, resumed_kd = run(ckpt_path=mid, subdir="b")
    for name, weight in weights(full).items():
        assert torch.equal(weight, weights(resumed)[name]), name
    for key, value in full_kd.adapters["net.fc1"].state_dict().items():
        assert torch.equal(value, resumed_kd.adapters["net.fc1"].state_dict()[key]), key


# -- finding inputs and logits ----------------------------------------------------------------------
class DictModule(TinyModule):
    """Dict batches, a dict output, and a step that calls the inner network directly."""

    def __init__(self, direct: bool = False) -> None:
        super().__init__()
        self.direct = direct

    def forward(self, x, *, scale=1.0):
        return {"logits": self.net(x, scale=scale), "extra": x.mean()}

    def training_step(self, batch: Any, batch_idx: int):
        logits = self.net(batch["image"]) if self.direct else self(batch["image"])["logits"]
        return {"loss": F.cross_entropy(logits, batch["label"]), "seen": batch_idx}


def dict_loader() -> DataLoader:
    data = synthetic()
    rows = [{"image": x, "label": y} for x, y in zip(*data.tensors, strict=True)]
    return DataLoader(rows, batch_size=16)  # type: ignore[arg-type]


def test_input_fn_logits_fn_and_logits_module(teacher):
    def image(batch):
        return batch["image"]

    def run(module, input_fn=image, **kwargs):
        kd = KnowledgeDistillation(teacher, input_fn=input_fn, **kwargs)
        pl.seed_everything(0, verbose=False)
        t = pl.Trainer(callbacks=[kd], max_epochs=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        t.fit(module, dict_loader())
        return t

    assert run(DictModule()).callback_metrics["kd/response_loss"] > 0  # the "logits" key, by default
    assert run(DictModule(), logits_fn=lambda out: out["logits"]).callback_metrics["kd/response_loss"] > 0
    with pytest.raises(CompressionConfigError, match=r"did not see the student's logits.*HINT.*logits_module"):
        run(DictModule(direct=True))
    assert run(DictModule(direct=True), logits_module="net").callback_metrics["kd/response_loss"] > 0
    with pytest.raises(CompressionConfigError, match="cannot find the model input in a batch of type dict"):
        run(DictModule(), input_fn=None)  # the default rule wants an "input" key


# -- errors found at setup or on the first step --------------------------------------------------------
def test_logits_of_different_shapes(teacher):
    wide = ClassificationModule(TinyNet(classes=10), num_classes=10)
    with pytest.raises(CompressionConfigError, match=r"same shape, got student \(16, 4\) and teacher \(16, 10\)"):
        fit([KnowledgeDistillation(wide)], max_epochs=1)


def test_manual_optimisation_is_refused(teacher):
    class Manual(TinyModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(CompressionConfigError, match=r"needs automatic optimization.*Manual sets"):
        fit([KnowledgeDistillation(teacher)], module=Manual(), max_epochs=1)


def test_one_distillation_callback_per_trainer(teacher):
    with pytest.raises(CompressionConfigError, match=r"only one KnowledgeDistillation callback.*HINT: for several"):
        fit([KnowledgeDistillation(teacher), KnowledgeDistillation(teacher, state_key_suffix="2")], max_epochs=1)


def test_the_student_itself_cannot_be_the_teacher():
    student = TinyModule()
    with pytest.raises(CompressionConfigError, match="shares parameters with the student"):
        fit([KnowledgeDistillation(student)], module=student, max_epochs=1)


def test_a_failed_fit_gives_the_step_back(teacher):
    kd = KnowledgeDistillation(teacher, features={"net.fc1": "net.conv1"})
    module = TinyModule()
    with pytest.raises(CompressionConfigError):
        fit([kd], module=module, max_epochs=1)
    assert "training_step" not in module.__dict__


# -- teachers from checkpoints ----------------------------------------------------------------------
def test_teacher_checkpoints(tmp_path):
    named = ClassificationModule("cnn_tiny", num_classes=4)
    for name, module in (("named", named), ("tiny", TinyModule())):
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(module, loaders()[0])
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
    torch.save(TinyNet().state_dict(), tmp_path / "net.pt")
    (tmp_path / "broken.ckpt").write_bytes(b"not a checkpoint")

    loaded = KnowledgeDistillation(tmp_path / "named.ckpt").teacher
    assert isinstance(loaded, ClassificationModule) and not loaded.training
    for key, value in named.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert isinstance(KnowledgeDistillation(str(tmp_path / "tiny.ckpt"), teacher_class=TinyModule).teacher, TinyModule)
    assert isinstance(KnowledgeDistillation(tmp_path / "net.pt", teacher_class=TinyNet).teacher, TinyNet)
    with pytest.raises(CompressionConfigError, match=r"not written by lightning_compress.*HINT: pass `teacher_class`"):
        KnowledgeDistillation(tmp_path / "tiny.ckpt")
    with pytest.raises(CompressionConfigError, match=r"cannot read the teacher checkpoint '.*broken.ckpt': "):
        KnowledgeDistillation(tmp_path / "broken.ckpt")
    with pytest.raises(CompressionConfigError, match=r"checkpoint '.*net.pt': RuntimeError(.|\n)*Unexpected key"):
        KnowledgeDistillation(tmp_path / "net.pt", teacher_class=torch.nn.Sequential)
    with pytest.raises(CompressionConfigError, match=r"teacher checkpoint '.*net.pt': TypeError: Linear.__init__"):
        KnowledgeDistillation(tmp_path / "net.pt", teacher_class=torch.nn.Linear)


# -- composition and lightweight students -------------------------------------------------------------
@pytest.mark.parametrize("order", ["kd_first", "kd_last"])
def test_a_pruned_quantised_student_learns_from_a_dense_teacher(teacher, order, tmp_path):
    kd = KnowledgeDistillation(teacher, features={"net.fc1": "net.fc1"})
    others = [MagnitudePruning(final_sparsity=0.75, end_epoch=1), QuantizationAwareTraining(start_epoch=1)]
    callbacks = [kd, *others] if order == "kd_first" else [*others, kd]
    t, student = fit(callbacks, module=TinyModule(bn=True), max_epochs=3, seed=1)
    assert sparsity(select_layers(student)) == pytest.approx(0.75, abs=1e-3)
    assert len(quantized_layers(student)) == 4 and not quantized_layers(kd.teacher)
    assert all(float((layer.weight == 0).float().mean()) < 0.2 for layer in select_layers(kd.teacher).values())
    assert t.callback_metrics["kd/loss"].isfinite()
    assert export_onnx(student.net, synthetic(4).tensors[0], tmp_path / "s.int8.onnx", int8=True).exists()


@pytest.mark.parametrize(
    ("teacher_name", "student"),
    [("cnn_wide", "cnn_tiny"), ("resnet18", "mobilenet_v3_small"), ("resnet18", "shufflenet_v2_x0_5")],
)
def test_lightweight_students_learn_from_a_large_teacher(teacher_name, student):
    wide = ClassificationModule(teacher_name, num_classes=4)
    kd = KnowledgeDistillation(wide)
    module = ClassificationModule(student, num_classes=4)
    t, _ = fit([kd], module=module, max_epochs=1, limit_train_batches=3)
    assert t.callback_metrics["kd/response_loss"].isfinite()
    assert sum(p.numel() for p in module.parameters()) < sum(p.numel() for p in wide.parameters())


@pytest.mark.slow
def test_ddp_ranks_agree_and_the_teacher_stays_out_of_the_gradient_sync(ddp_run):
    rank0, rank1 = ddp_run
    for rank in (rank0, rank1):
        assert rank["ddp_params"] == rank["student_params"] and not rank["teacher_in_ddp"]
        assert rank["kd_loss"] > 0
    for key, value in rank0["adapter"].items():  # adapter gradients averaged across ranks
        assert torch.equal(value, rank1["adapter"][key]), key
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key


# -- teacher="self": distillation from the model as it was before compression --------------------------
class Snapshot(pl.Callback):
    """The model's Conv/Linear weights at the end of every training epoch."""

    def __init__(self) -> None:
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = weights(pl_module)


def self_compression() -> list[pl.Callback]:
    """Every technique that changes the model, from epoch 1 (8 steps an epoch)."""
    return [
        LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1"]),
        MagnitudePruning(final_sparsity=0.6, start_epoch=1, end_epoch=2),
        QuantizationAwareTraining(start_epoch=1),
    ]


@pytest.mark.parametrize("kd_first", [True, False])
def test_the_self_teacher_is_the_model_just_before_compression_starts(kd_first, tmp_path):
    kd, snapshot = KnowledgeDistillation("self", alpha=0.5), Snapshot()
    others = self_compression()
    logger = CSVLogger(tmp_path, name="run")
    fit([kd, *others, snapshot] if kd_first else [*others, kd, snapshot], module=TinyModule(bn=True), max_epochs=3,
        seed=1, logger=logger)  # fmt: skip
    assert kd.copied_at == 8  # the first step of epoch 1, before any of the three changed the model
    teacher = kd.teacher
    assert teacher is not None and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not quantized_layers(teacher) and not any(isinstance(m, LowRank) for m in teacher.modules())
    assert not any("parametrizations" in key for key in teacher.state_dict())  # dense and float: nothing attached
    for name, weight in snapshot.weights[0].items():  # the model as epoch 0 left it
        assert torch.equal(weights(teacher)[name], weight), name
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    epochs = {int(row["epoch"]) for row in rows if row.get("kd/loss")}
    assert epochs == {1, 2}  # the task loss alone until compression started


def test_the_self_teacher_is_never_exported_or_checkpointed_unless_asked(tmp_path):
    kd = KnowledgeDistillation("self")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _, student = fit([kd, MagnitudePruning(0.5, start_epoch=1), checkpoint], max_epochs=2, seed=1,
                     enable_checkpointing=True)  # fmt: skip
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert set(saved["state_dict"]) == set(student.state_dict())
    assert saved["callbacks"][kd.state_key]["self_copied_at"] == 8 and "teacher" not in saved["callbacks"][kd.state_key]
    in_optimizer = {id(p) for p in student.trainer.optimizers[0].param_groups[0]["params"]}
    assert not in_optimizer & {id(p) for p in kd.teacher.parameters()}


def test_a_self_teacher_taken_before_any_training_step_warns():
    with pytest.warns(UserWarning, match=r"copied the model before its first training step.*pretrained"):
        fit([KnowledgeDistillation("self"), MagnitudePruning(0.5)], max_epochs=1)
    kd = KnowledgeDistillation("self")  # nothing compresses: the model as the fit starts
    with pytest.warns(UserWarning, match="before its first training step"):
        fit([kd], max_epochs=1)
    assert kd.copied_at == 0


def test_self_teacher_arguments_and_names_are_checked():
    with pytest.raises(CompressionConfigError, match="`teacher_class` must be None with teacher='self'"):
        KnowledgeDistillation("self", teacher_class=TinyNet)
    kd = KnowledgeDistillation("self", features={"net.fc1": "net.fc3"})
    with pytest.raises(CompressionConfigError, match=r"teacher layer 'net.fc3' does not exist.*nearest names"):
        fit([kd, MagnitudePruning(0.5, start_epoch=1)], max_epochs=1)


def test_a_resumed_fit_gets_the_self_teacher_back_or_says_why_it_cannot(tmp_path):
    def run(ckpt_path=None, subdir="a", save_teacher=True):
        kd = KnowledgeDistillation("self", alpha=0.5, save_teacher=save_teacher)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / subdir, save_top_k=-1, every_n_epochs=1)
        module = TinyModule(optimizer="adam", lr=0.01)
        pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=1, end_epoch=2)
        fit([kd, pruning, checkpoint], module=module, max_epochs=3, seed=1, ckpt_path=ckpt_path,
            enable_checkpointing=True)  # fmt: skip
        return module, kd

    full, full_kd = run()
    for mid, subdir in ((tmp_path / "a" / "epoch=0-step=8.ckpt", "b"), (tmp_path / "a" / "epoch=1-step=16.ckpt", "c")):
        resumed, resumed_kd = run(ckpt_path=mid, subdir=subdir)  # before the copy was taken, and after
        assert resumed_kd.copied_at == 8
        for name, weight in weights(full_kd.teacher).items():
            assert torch.equal(weight, weights(resumed_kd.teacher)[name]), (subdir, name)
        for name, weight in weights(full).items():
            assert torch.equal(weight, weights(resumed)[name]), (subdir, name)
    run(subdir="d", save_teacher=False)
    with pytest.raises(CompressionConfigError, match=r"took its copy of the model at step 8.*HINT:.*save_teacher=True"):
        run(ckpt_path=tmp_path / "d" / "epoch=1-step=16.ckpt", subdir="e", save_teacher=False)


@pytest.mark.parametrize(
    ("kind", "pairs"), [("attention", {"net.conv2": "net.conv1"}), ("rkd", {"net.fc1": "net.conv2"})]
)
def test_relational_and_attention_losses_need_no_adapter(kind, pairs, tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    kd = KnowledgeDistillation("self", features=pairs, feature_loss=kind, feature_weight=10.0)
    fit([kd, MagnitudePruning(0.5, start_epoch=1)], module=TinyModule(bn=True), max_epochs=2, seed=1, logger=logger)
    assert not kd.adapters  # widths differ, nothing to learn
    metrics = {k: float(v) for k, v in logged_metrics(logger, prefix="kd/").items()}
    assert metrics["kd/feature_loss"] > 0
    assert metrics["kd/loss"] == pytest.approx(
        0.1 * metrics["kd/task_loss"] + 0.9 * metrics["kd/response_loss"] + 10.0 * metrics["kd/feature_loss"], rel=1e-4
    )


def test_a_self_taught_attention_model_resumes_whatever_the_callback_order(tmp_path):
    # QAT swaps nn.MultiheadAttention for ProjectedAttention at setup (other state-dict keys): KD listed before
    # it took its dense skeleton before the swap, and the saved copy (taken after it) did not load into it.
    from torch.utils.data import DataLoader

    from tests.helpers import Attending, sequences

    def run(ckpt_path=None, subdir="a"):
        pl.seed_everything(0, verbose=False)
        kd = KnowledgeDistillation("self", alpha=0.5, save_teacher=True)
        callbacks = [kd, MagnitudePruning(0.5, start_epoch=1), QuantizationAwareTraining(start_epoch=1),
                     ModelCheckpoint(dirpath=tmp_path / subdir, save_top_k=-1, every_n_epochs=1)]  # fmt: skip
        module = Attending()
        t = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                       enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks)  # fmt: skip
        loader = DataLoader(sequences(), batch_size=16)
        t.fit(module, loader, ckpt_path=ckpt_path)
        return kd

    full = run()
    resumed = run(ckpt_path=tmp_path / "a" / "epoch=1-step=6.ckpt", subdir="b")
    assert full.copied_at == resumed.copied_at == 3
