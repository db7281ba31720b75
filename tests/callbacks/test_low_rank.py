import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import (
    CompressionConfigError,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
    export_onnx,
    restore,
)
from lightning_compress.core.low_rank import LowRank
from lightning_compress.core.pruning import masked_modules
from lightning_compress.core.quantization import quantized_layers
from tests.helpers import TinyModule, fit, loaders, logged_metrics, synthetic, trainer

ROOT = Path(__file__).resolve().parents[2]


class ScheduledModule(TinyModule):
    """TinyModule with a step LR schedule (per epoch) and Adam or SGD."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class OptimizerProbe(pl.Callback):
    """At the start of epoch 1 (around the factorisation): the optimizer state of an untouched layer."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            state = trainer.optimizers[0].state[pl_module.net.fc2.weight]
            self.seen = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}


# -- construction and set-up: one test per message ---------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epoch": -1}, "`epoch` must be a whole epoch number >= 0, got -1"),
        ({"epoch": 1.5}, "`epoch` must be a whole epoch number >= 0, got 1.5"),
        ({"rank": 0}, "`rank` must be an integer >= 1, got 0"),
        ({"ratio": 1.2}, r"`ratio` must be a number in \(0, 1\), got 1.2"),
        ({"energy": 0.0}, r"`energy` must be a number in \(0, 1\], got 0.0"),
        ({"rank": 2, "energy": 0.9}, "`rank/ratio/energy` must be exactly one of them set"),
        ({"conv_method": "tucker"}, "`conv_method` must be one of 'svd', 'tucker2', got 'tucker'"),
        ({"include": 5}, "`include` must be a module-name pattern or a list of them"),
        ({"ranks": {"net.fc1": 2.5}}, r"`ranks\['net.fc1'\]` must be an integer >= 1, got 2.5"),
        ({"ranks": [2]}, "`ranks` must be a mapping of module names or patterns"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        LowRankFactorization(**kwargs)


def test_impossible_settings_fail_before_training():
    with pytest.raises(CompressionConfigError, match=r"`rank` must be below the smallest dimension of a selected"):
        fit([LowRankFactorization(rank=16, include=["net.fc*"])], max_epochs=1)  # fc1: 16, fc2: 4
    with pytest.raises(CompressionConfigError, match="selected no Linear/Conv2d layer of TinyModule"):
        fit([LowRankFactorization(exclude=["*"])], max_epochs=1)
    with pytest.raises(CompressionConfigError, match=r"`ranks\['net.fc2'\]` must be < 4 for 'net.fc2'"):
        fit([LowRankFactorization(epoch=1, ranks={"net.fc2": 4})], max_epochs=2)  # at setup, not at epoch 1
    with pytest.raises(CompressionConfigError, match=r"`ranks\['net.fc3'\]` .*did you mean 'net.fc"):
        fit([LowRankFactorization(epoch=1, ranks={"net.fc3": 2})], max_epochs=2)


def test_per_layer_ranks_factorise_the_named_layers_at_their_ranks(tmp_path):
    from lightning_compress import CompressionExport

    low_rank = LowRankFactorization(epoch=1, ranks={"net.fc2": 2, "net.fc1": 4})
    export = CompressionExport(tmp_path, plots=False, val_batches=1, baseline=None)
    _, module = fit([low_rank, export], max_epochs=2)
    assert low_rank.factorized["net.fc2"]["ranks"] == [2] and low_rank.factorized["net.fc1"]["ranks"] == [4]
    assert [tuple(m.weight.shape) for m in module.net.fc2] == [(2, 16), (4, 2)]
    fresh = restore(TinyModule(), tmp_path / "model.ckpt")
    assert [tuple(m.weight.shape) for m in fresh.net.fc1] == [(4, 128), (16, 4)]


# -- the factorisation mid-fit --------------------------------------------------------------------------
def test_factorises_at_epoch_n_and_the_optimizer_follows():
    before, after = OptimizerProbe(), OptimizerProbe()
    lowrank = LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1", "net.conv2"])
    module = ScheduledModule(optimizer="adam", lr=0.01)
    t, module = fit([before, lowrank, after], module=module, max_epochs=3)
    assert isinstance(module.net.fc1, LowRank) and isinstance(module.net.conv2, LowRank)
    assert set(lowrank.factorized) == {"net.fc1", "net.conv2"}
    optimizer = t.optimizers[0]
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in module.parameters()]
    assert set(optimizer.state) == set(module.parameters())  # old parameters' state dropped, new ones stepped
    for key, value in before.seen.items():  # untouched layers kept their Adam moments across the swap
        assert torch.equal(value, after.seen[key]), key
    scheduler = t.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 3 and optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**3)


def test_epoch_zero_and_every_conv_method():
    for method in ("svd", "tucker2"):
        lowrank = LowRankFactorization(epoch=0, ratio=0.6, conv_method=method, exclude=["net.fc2"])
        _, module = fit([lowrank], max_epochs=1)
        assert {f["kind"] for f in lowrank.factorized.values()} == {method, "linear"}
        params = sum(p.numel() for p in module.parameters())
        assert params < sum(p.numel() for p in TinyModule().parameters())


def test_a_second_fit_of_a_factorised_model_keeps_its_structure():
    lowrank = LowRankFactorization(epoch=0, rank=4, include=["net.fc1"])
    _, module = fit([lowrank], max_epochs=1)
    factorized = dict(lowrank.factorized)
    fit([lowrank], module=module, max_epochs=1, seed=1)
    assert isinstance(module.net.fc1, LowRank) and isinstance(module.net.fc1[0], torch.nn.Linear)
    assert lowrank.factorized == factorized


def test_logs_lowrank_figures(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    lowrank = LowRankFactorization(epoch=1, rank=4, include=["net.fc1"])
    _, module = fit([lowrank], max_epochs=2, logger=logger)
    metrics = {k: float(v) for k, v in logged_metrics(logger, prefix="lowrank/").items()}
    assert metrics["lowrank/layers"] == 1.0 and metrics["lowrank/rank/net.fc1"] == 4.0
    assert metrics["lowrank/params_before"] == 128 * 16 + 16
    assert metrics["lowrank/params_after"] == 4 * 128 + 16 * 4 + 16
    assert metrics["lowrank/model_params"] == sum(p.numel() for p in module.parameters())


# -- checkpoints and restore ----------------------------------------------------------------------------
def test_resume_before_and_after_the_factorisation_matches_an_uninterrupted_run(tmp_path):
    def run(ckpt_path=None, subdir="a"):
        lowrank = LowRankFactorization(epoch=1, ratio=0.5, conv_method="tucker2", exclude=["net.fc2"])
        checkpoint = ModelCheckpoint(dirpath=tmp_path / subdir, save_top_k=-1, every_n_epochs=1)
        module = ScheduledModule(optimizer="adam", lr=0.01)
        fit([lowrank, checkpoint], module=module, max_epochs=3, ckpt_path=ckpt_path, enable_checkpointing=True)
        return module

    full = run()
    for i, name in enumerate(["epoch=0-step=8.ckpt", "epoch=1-step=16.ckpt"]):  # before and after epoch 1
        resumed = run(ckpt_path=tmp_path / "a" / name, subdir=f"b{i}")
        assert isinstance(resumed.net.conv2, LowRank)
        for key, value in full.state_dict().items():
            assert torch.equal(value, resumed.state_dict()[key]), (name, key)


def test_test_from_a_factorised_checkpoint(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    fit([LowRankFactorization(epoch=0, ratio=0.5), checkpoint], max_epochs=2, enable_checkpointing=True)
    fresh = trainer(callbacks=[LowRankFactorization(epoch=0, ratio=0.5)])
    result = fresh.test(TinyModule(), loaders()[1], ckpt_path=checkpoint.best_model_path, verbose=False)
    assert result[0]["val/acc"] == pytest.approx(float(checkpoint.best_model_score), abs=1e-6)


def test_restore_everything_in_a_fresh_process(tmp_path):
    callbacks = [
        LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1", "net.conv2"]),
        MagnitudePruning(final_sparsity=0.6, end_epoch=2),
        QuantizationAwareTraining(start_epoch=2),
    ]
    t, module = fit(callbacks, module=TinyModule(bn=True), max_epochs=3)
    t.save_checkpoint(tmp_path / "last.ckpt")
    x = synthetic(8).tensors[0]
    with torch.no_grad():
        torch.save(module.eval()(x), tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from lightning_compress import restore\n"
        "from tests.helpers import TinyModule, synthetic\n"
        "model = restore(TinyModule(bn=True), sys.argv[1]).eval()\n"
        "with torch.no_grad():\n"
        "    got = model(synthetic(8).tensors[0])\n"
        "assert torch.equal(got, torch.load(sys.argv[2], weights_only=True))\n"
        "print(type(model.net.fc1).__name__, sorted(n for n, m in model.named_modules() if hasattr(m, 'weight_mask')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "last.ckpt"), str(tmp_path / "expected.pt")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("LowRank ") and "net.fc1.0" in done.stdout and "net.conv2.1" in done.stdout


def test_restore_errors(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"nope")
    with pytest.raises(CompressionConfigError, match=r"cannot read the checkpoint '.*bad.ckpt'"):
        restore(TinyModule(), tmp_path / "bad.ckpt")
    torch.save({"state_dict": {"net.fc9.weight": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(CompressionConfigError, match=r"not fit TinyModule(.|\n)*fc9.weight\"\. HINT: pass a fresh"):
        restore(TinyModule(), tmp_path / "other.ckpt")


# -- composition ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["lowrank_first", "lowrank_last"])
def test_composes_with_pruning_qat_and_distillation(order, tmp_path):
    teacher = TinyModule(bn=True)
    lowrank = LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1", "net.conv2"])
    others = [
        MagnitudePruning(final_sparsity=0.7, end_epoch=2),
        QuantizationAwareTraining(start_epoch=0),
        KnowledgeDistillation(teacher, features={"net.fc1": "net.fc1"}),
    ]
    callbacks = [lowrank, *others] if order == "lowrank_first" else [*others, lowrank]
    t, module = fit(callbacks, module=TinyModule(bn=True), max_epochs=3)
    assert {"net.fc1.0", "net.fc1.1", "net.conv2.0", "net.conv2.1"} <= set(masked_modules(module))
    assert {"net.fc1.0", "net.fc1.1", "net.conv2.0", "net.conv2.1"} <= set(quantized_layers(module))
    zeros = sum(int((m.weight_mask == 0).sum()) for m in masked_modules(module).values())
    total = sum(m.weight_mask.numel() for m in masked_modules(module).values())
    assert zeros / total == pytest.approx(0.7, abs=1e-3)
    assert t.callback_metrics["kd/feature_loss"].isfinite()
    assert export_onnx(module.net, synthetic(4).tensors[0], tmp_path / "m.int8.onnx", int8=True).exists()


@pytest.mark.slow
def test_ddp_ranks_factorise_identically_and_train_in_sync(ddp_run):
    rank0, rank1 = ddp_run
    assert rank0["factorized"] == rank1["factorized"] and set(rank0["factorized"]) == {"net.fc1", "net.conv2"}
    assert rank0["factorized"]["net.fc1"] == [6]  # its own rank
    assert rank0["weight_bits"] == rank1["weight_bits"] and rank0["weight_bits"]["net.fc2"] == 4
    assert "net.fc1.1.parametrizations.weight.original" in rank0["weights"]  # QAT on the new layers
    assert "net.conv2.0.weight_mask" in rank0["weights"]  # and pruning
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key


def test_attention_projections_are_factorised_quantised_exported_and_restored(tmp_path):
    # #14: nn.MultiheadAttention reads `in_proj_weight` (a bare parameter) and `out_proj.weight` directly, so
    # low-rank left its projections alone (replacing `out_proj` crashed mid-fit) and QAT left them in float.
    # LowRankFactorization now swaps in the same function with the projections as called layers.
    import json

    from torch.utils.data import DataLoader

    from lightning_compress import CompressionExport
    from lightning_compress.core.attention import ProjectedAttention
    from tests.helpers import Attending, sequences

    data = sequences()
    module = Attending(width=64)
    callbacks = [LowRankFactorization(epoch=1), QuantizationAwareTraining(start_epoch=1)]
    export = CompressionExport(tmp_path, plots=False, val_batches=1)
    loaders_ = DataLoader(data, batch_size=16), DataLoader(data, batch_size=48)
    trainer(callbacks=[*callbacks, export], max_epochs=2).fit(module, *loaders_)
    assert isinstance(module.attention, ProjectedAttention)
    assert isinstance(module.attention.in_proj, LowRank) and isinstance(module.attention.out_proj, LowRank)
    assert {"attention.in_proj.0", "attention.in_proj.1", "attention.out_proj.0"} <= set(quantized_layers(module))
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values()), report["verification"]
    fresh = restore(Attending(width=64), tmp_path / "model.ckpt").eval()
    x = data.tensors[0][:8]
    assert isinstance(fresh.attention.in_proj, LowRank)
    assert torch.allclose(fresh(x), module.eval()(x), atol=1e-6)


def test_selections_by_name_follow_a_factorised_layer_into_its_factors():
    pruning = MagnitudePruning(0.5, end_epoch=2, include=["net.fc1"])
    qat = QuantizationAwareTraining(start_epoch=1, include=["net.fc1"])
    _, module = fit([LowRankFactorization(epoch=1, include=["net.fc1"]), pruning, qat], max_epochs=3)
    assert set(masked_modules(module)) == {"net.fc1.0", "net.fc1.1"}  # raised mid-fit before: 'net.fc1' matched none
    assert set(quantized_layers(module)) == {"net.fc1.0", "net.fc1.1"} and pruning.include == ["net.fc1.*"]
    factors = [module.net.fc1[0].weight, module.net.fc1[1].weight]  # one global threshold over the two
    assert sum(int((w == 0).sum()) for w in factors) / sum(w.numel() for w in factors) == pytest.approx(0.5, abs=0.01)
