import gc
import weakref

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_compress import CompressionConfigError, MagnitudePruning
from lightning_compress.core.layers import select_layers
from lightning_compress.core.pruning import masked_modules, sparsity
from lightning_compress.core.schedules import SparsitySchedule
from tests.helpers import TinyModule, TinyNet, fit, loaders, logged_metrics, trainer

STEPS_PER_EPOCH = 8  # helpers.loaders(): 128 samples, batch 16


class StepProbe(pl.Callback):
    """After every optimizer step: are the masked weights zero? What target, what sparsity?"""

    def __init__(self, pruning: MagnitudePruning) -> None:
        self.pruning = pruning
        self.violations = 0
        self.trace: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for module in self.pruning.modules.values():
            self.violations += int((module.weight[~module.weight_mask] != 0).sum())
        step = trainer.global_step - 1  # the step this batch trained
        self.trace.append((step, self.pruning.current_target, sparsity(self.pruning.modules)))


# -- construction: one test per message -----------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_sparsity": 1.0}, r"`final_sparsity` must be in \[0, 1\), got 1.0"),
        ({"final_sparsity": "0.9"}, r"`final_sparsity` must be in \[0, 1\), got '0.9'"),
        ({"final_sparsity": 0.9, "pattern": "2:4"}, r"`final_sparsity` must be 0.5 for pattern '2:4' \(1 - N/M\)"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, r"`initial_sparsity` must be in \[0, final_sparsity=0.5\]"),
        ({"start_epoch": -1}, "`start_epoch` must be a number >= 0, got -1"),
        ({"start_epoch": 2, "end_epoch": 1}, r"`end_epoch` must be a number >= start_epoch \(2\) or None, got 1"),
        ({"update_frequency": 0}, "`update_frequency` must be a positive number of optimizer steps or None, got 0"),
        ({"update_frequency": 2.5}, "`update_frequency` must be a positive number of optimizer steps or None, got 2.5"),
        ({"schedule": "cubik"}, "`schedule` must be one of 'cubic', 'linear', 'constant', got 'cubik'. HINT: did you"),
        ({"scope": "globl"}, "`scope` must be one of 'global', 'layer', 'lamp', got 'globl'. HINT: did you mean 'glob"),
        ({"scope": "lamp", "pattern": "channel"}, "`scope` must be 'global' or 'layer' with pattern 'channel'"),
        ({"pattern": "chanel"}, "`pattern` must be 'unstructured', 'channel' or 'N:M'.*HINT: did you mean 'channel'"),
        ({"norm": "l0"}, "`norm` must be one of 'l1', 'l2', got 'l0'"),
        ({"include": 3}, r"`include` must be a module-name pattern or a list of them .* got 3"),
        ({"exclude": ["a", 1]}, r"`exclude` must be a module-name pattern or a list of them .* got \['a', 1\]"),
        ({"fold_on_fit_end": "yes"}, "`fold_on_fit_end` must be True or False, got 'yes'"),
        ({"layer_sparsity": ["net.fc1"]}, "`layer_sparsity` must be a mapping of module names or patterns"),
        ({"layer_sparsity": {"net.fc1": 1.0}}, r"`layer_sparsity\['net.fc1'\]` must be a sparsity in \[0, 1\)"),
        ({"layer_sparsity": {"net.fc1": 0.5}, "pattern": "2:4"}, "`layer_sparsity` must be None with pattern '2:4'"),
        ({"layer_sparsity": {"net.fc1": 0.5}, "final_sparsity": 0.0}, "`final_sparsity` must be > 0 with layer_sp"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        MagnitudePruning(**kwargs)


def test_defaults():
    assert MagnitudePruning().final_sparsity == 0.9
    assert MagnitudePruning(pattern="1:4").final_sparsity == 0.75


# -- fit-time preconditions ---------------------------------------------------------------------
def test_nothing_selected_fails_before_training():
    with pytest.raises(CompressionConfigError, match=r"selected no layer of TinyModule .* HINT: prunable layers"):
        fit([MagnitudePruning(exclude="*")])


def test_include_typo_names_the_nearest_layer():
    with pytest.raises(CompressionConfigError, match=r"HINT: did you mean 'net.fc1'"):
        fit([MagnitudePruning(include=["net.fc11"])])


def test_nm_explicitly_included_incompatible_layer_is_an_error():
    with pytest.raises(CompressionConfigError, match=r"module 'net.conv1' cannot take pattern '2:4'"):
        fit([MagnitudePruning(pattern="2:4", include=["net.*"])])


def test_nm_by_default_leaves_incompatible_layers_out():
    _, module = fit([MagnitudePruning(pattern="2:4", end_epoch=1)], max_epochs=2)
    assert set(masked_modules(module)) == {"net.conv2", "net.fc1", "net.fc2"}  # conv1 has 1 input channel


# -- training -------------------------------------------------------------------------------------
def test_reaches_the_target_exactly_and_weights_stay_zero_after_every_step():
    pruning = MagnitudePruning(final_sparsity=0.8, end_epoch=2, update_frequency=3)
    probe = StepProbe(pruning)
    _, module = fit([pruning, probe], max_epochs=3)
    layers = select_layers(module)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.8 * total)
    assert probe.violations == 0
    schedule = SparsitySchedule(0.0, 0.8, 0, 2 * STEPS_PER_EPOCH, 3)
    for step, target, measured in probe.trace:
        last_update = max(t for t in range(step + 1) if schedule.is_update_step(t))
        assert target == pytest.approx(schedule.target(last_update))
        assert measured == pytest.approx(target, abs=2 / total)


def test_gradient_accumulation_and_adam_keep_zeros():
    pruning = MagnitudePruning(final_sparsity=0.7, end_epoch=1)
    probe = StepProbe(pruning)
    fit([pruning, probe], module=TinyModule(lr=0.01, optimizer="adam"), max_epochs=2, accumulate_grad_batches=2)
    assert probe.violations == 0
    assert probe.trace[-1][2] == pytest.approx(0.7, abs=1e-3)


def test_no_forward_hooks_and_keyword_forward_still_works():
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    _, module = fit([pruning], max_epochs=1)
    for layer in select_layers(module).values():
        assert not layer._forward_pre_hooks and not layer._forward_hooks
        assert type(layer).forward is layer.forward.__func__
    assert module(torch.zeros(1, 1, 8, 8), scale=2.0).shape == (1, 4)


def test_fractional_start_and_constant_schedule_is_one_shot():
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=0.5, end_epoch=0.5, schedule="constant")
    probe = StepProbe(pruning)
    fit([pruning, probe], max_epochs=1)
    targets = {step: target for step, target, _ in probe.trace}
    assert targets[STEPS_PER_EPOCH // 2 - 1] == 0.0 and targets[STEPS_PER_EPOCH // 2] == pytest.approx(0.6)


def test_layer_scope_and_linear_schedule():
    pruning = MagnitudePruning(final_sparsity=0.5, scope="layer", schedule="linear", end_epoch=1)
    _, module = fit([pruning], max_epochs=1)
    for layer in select_layers(module).values():
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_lamp_scope_reaches_the_target_with_qat_and_the_export_verifies(tmp_path):
    import json

    from lightning_compress import CompressionExport, QuantizationAwareTraining

    pruning = MagnitudePruning(final_sparsity=0.9, scope="lamp", end_epoch=1)
    export = CompressionExport(tmp_path, plots=False, val_batches=1, baseline=None)
    _, module = fit([pruning, QuantizationAwareTraining(start_epoch=1), export], max_epochs=2)
    layers = masked_modules(module)
    assert set(layers) == set(select_layers(module)) and sparsity(layers) == pytest.approx(0.9, abs=1e-3)
    assert all(float(m.weight_mask.float().mean()) >= 0.05 for m in layers.values())  # the floor holds
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values())


def test_channel_pattern_zeros_whole_filters_and_spares_the_classifier():
    pruning = MagnitudePruning(final_sparsity=0.5, pattern="channel", scope="layer", end_epoch=1)
    _, module = fit([pruning], max_epochs=2)
    conv = module.net.conv2
    zero_filters = (conv.weight.flatten(1) == 0).all(1)
    assert int(zero_filters.sum()) == 4
    assert (conv.bias[zero_filters] == 0).all()
    assert not hasattr(module.net.fc2, "weight_mask") and int((module.net.fc2.weight == 0).sum()) == 0


def test_nm_pattern_holds_after_training():
    pruning = MagnitudePruning(pattern="2:4", end_epoch=1)
    _, module = fit([pruning], max_epochs=2)
    groups = module.net.conv2.weight.permute(0, 2, 3, 1).reshape(-1, 4)
    assert ((groups != 0).sum(1) <= 2).all()
    assert module.net.conv1.weight.count_nonzero() == module.net.conv1.weight.numel()


def test_logs_figures_counted_from_the_tensors(tmp_path):
    pruning = MagnitudePruning(final_sparsity=0.75, end_epoch=1)
    logger = CSVLogger(tmp_path, name="run")
    _, module = fit([pruning], max_epochs=2, logger=logger, log_every_n_steps=1)
    metrics = {k: float(v) for k, v in logged_metrics(logger, "pruning/").items()}
    layers = select_layers(module)
    assert metrics["pruning/sparsity"] == pytest.approx(sparsity(layers), abs=1e-6)
    assert metrics["pruning/target"] == pytest.approx(0.75)
    assert metrics["pruning/nonzero_params"] == sum(int(p.count_nonzero()) for p in module.parameters())
    assert metrics["pruning/layer/net.fc1"] == pytest.approx(float((module.net.fc1.weight == 0).float().mean()))


# -- checkpoints ------------------------------------------------------------------------------------
def test_resume_mid_ramp_ends_with_the_masks_of_an_uninterrupted_run(tmp_path):
    def run(ckpt_path=None, max_epochs=4, subdir="a"):
        pruning = MagnitudePruning(final_sparsity=0.85, end_epoch=3, update_frequency=2)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / subdir, save_top_k=-1, every_n_epochs=1)
        _, module = fit([pruning, checkpoint], max_epochs=max_epochs, ckpt_path=ckpt_path, enable_checkpointing=True)
        return module, pruning

    full, _ = run()
    mid = tmp_path / "a" / "epoch=1-step=16.ckpt"  # after 2 of the 3 ramp epochs
    assert "net.fc1.weight_mask" in torch.load(mid, weights_only=True)["state_dict"]
    resumed, pruning = run(ckpt_path=mid, subdir="b")
    assert pruning.current_target == pytest.approx(0.85)
    for name, layer in masked_modules(full).items():
        assert torch.equal(layer.weight_mask, masked_modules(resumed)[name].weight_mask), name
        assert torch.equal(layer.weight, masked_modules(resumed)[name].weight), name


def test_test_from_a_pruned_checkpoint_into_a_fresh_module(tmp_path):
    pruning = MagnitudePruning(final_sparsity=0.6, end_epoch=1, fold_on_fit_end=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    t, module = fit([pruning, checkpoint], max_epochs=2, enable_checkpointing=True)
    assert masked_modules(module) == {}  # folded
    assert t.test(module, loaders()[1], ckpt_path="best", verbose=False)[0]["val/acc"] >= 0
    fresh = trainer(callbacks=[MagnitudePruning(final_sparsity=0.6)])
    result = fresh.test(TinyModule(), loaders()[1], ckpt_path=checkpoint.best_model_path, verbose=False)
    assert result[0]["val/acc"] == pytest.approx(float(checkpoint.best_model_score), abs=1e-6)


def test_fold_on_fit_end_gives_a_plain_state_dict():
    _, module = fit([MagnitudePruning(final_sparsity=0.7, end_epoch=1, fold_on_fit_end=True)], max_epochs=1)
    fresh = TinyNet()
    fresh.load_state_dict(module.net.state_dict())  # strict
    assert sparsity(select_layers(fresh)) == pytest.approx(0.7, abs=1e-3)


def test_validate_after_folding_adds_no_masks_back():
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=1, fold_on_fit_end=True)
    t, module = fit([pruning], max_epochs=1)
    t.validate(module, loaders()[1], verbose=False)
    assert masked_modules(module) == {}
    TinyNet().load_state_dict(module.net.state_dict())


def test_end_epoch_past_the_end_warns():
    with pytest.warns(UserWarning, match=r"end_epoch=5.0 is past the end of training \(8 optimizer steps\)"):
        fit([MagnitudePruning(final_sparsity=0.5, end_epoch=5)], max_epochs=1)


def test_endless_training_needs_an_end_epoch():
    with pytest.raises(CompressionConfigError, match="`end_epoch` must be set when the Trainer has neither"):
        fit([MagnitudePruning(final_sparsity=0.5)], max_epochs=-1, max_steps=-1)


def test_kept_masks_by_default_and_callback_state():
    pruning = MagnitudePruning(final_sparsity=0.7, end_epoch=1)
    _, module = fit([pruning], max_epochs=2)
    assert set(masked_modules(module)) == {"net.conv1", "net.conv2", "net.fc1", "net.fc2"}
    state = pruning.state_dict()
    assert state["current_target"] == pytest.approx(0.7) and state["last_update_step"] == STEPS_PER_EPOCH
    other = MagnitudePruning(final_sparsity=0.7)
    other.load_state_dict({})  # old checkpoints without the keys still load
    assert other.last_update_step == -1


def test_two_instances_have_distinct_state_keys_and_fold_their_own_layers():
    a = MagnitudePruning(final_sparsity=0.5, include=["net.conv*"], fold_on_fit_end=True)
    b = MagnitudePruning(pattern="2:4", include=["net.fc*"])
    assert a.state_key != b.state_key
    _, module = fit([a, b], max_epochs=1)
    assert set(masked_modules(module)) == {"net.fc1", "net.fc2"}


# -- reuse and distributed ----------------------------------------------------------------------------
def test_reusing_the_callback_keeps_no_reference_to_old_models():
    pruning = MagnitudePruning(final_sparsity=0.5, end_epoch=1)
    _, first = fit([pruning], max_epochs=1)
    ref = weakref.ref(first)
    del first
    for seed in range(1, 3):
        _, module = fit([pruning], max_epochs=1, seed=seed)
        assert sparsity(select_layers(module)) == pytest.approx(0.5, abs=1e-3)
    gc.collect()
    assert ref() is None


@pytest.mark.slow
def test_ddp_two_processes_hold_identical_masks_at_every_update(ddp_run):
    rank0, rank1 = ddp_run
    assert len(rank0["history"]) >= 8 and rank0["history"].keys() == rank1["history"].keys()
    for step, masks in rank0["history"].items():
        for name, mask in masks.items():
            assert torch.equal(mask, rank1["history"][step][name]), (step, name)
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
    final = dict(rank0["history"][max(rank0["history"])])
    assert 1 - float(final.pop("net.conv1").float().mean()) == pytest.approx(0.5, abs=0.01)  # its layer_sparsity
    kept = sum(int(m.sum()) for m in final.values())
    assert 1 - kept / sum(m.numel() for m in final.values()) == pytest.approx(0.8, abs=1e-3)
    scores0, scores1 = rank0["taylor"], rank1["taylor"]  # criterion="taylor": the same scores on both ranks
    assert scores0["steps"] == scores1["steps"] > 0 and scores0["sums"].keys() == scores1["sums"].keys() != set()
    for name, total in scores0["sums"].items():
        assert torch.equal(total, scores1["sums"][name]), name


def test_figures_reach_wandb_offline(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="lightning-compress-tests", save_dir=str(tmp_path), offline=True)
    _, module = fit([MagnitudePruning(final_sparsity=0.6, end_epoch=1)], max_epochs=2, logger=logger)
    summary = dict(logger.experiment.summary)
    assert summary["pruning/sparsity"] == pytest.approx(sparsity(select_layers(module)), abs=1e-6)
    assert summary["pruning/target"] == pytest.approx(0.6)
    assert list(tmp_path.rglob("run-*.wandb"))  # the offline run file was written
    logger.experiment.finish()


def test_channel_pattern_masks_the_batchnorm_so_removal_is_exact():
    from lightning_compress.deploy.onnx import float_copy
    from lightning_compress.deploy.shrink import max_abs_diff, remove_zero_channels

    pruning = MagnitudePruning(final_sparsity=0.5, pattern="channel", scope="layer", end_epoch=1)
    _, module = fit([pruning], module=TinyModule(bn=True), max_epochs=2)
    dead = ~module.net.conv1.weight_mask.flatten(1).any(1)
    assert int(dead.sum()) == 4
    assert (module.net.bn1.weight[dead] == 0).all() and (module.net.bn1.bias[dead] == 0).all()
    x = loaders()[1].dataset.tensors[0][:16]
    smaller, info = remove_zero_channels(float_copy(module.net), x)
    assert info["removed_channels"]["conv1"] == 4 and max_abs_diff(float_copy(module.net), smaller, x) < 1e-5


class ResidualModule(TinyModule):
    """A stem and a block whose output is added to the stem's: their channels are one set."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.block = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x, *, scale=1.0):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.block(h))
        return self.head(h.mean((2, 3))) * scale


def test_channel_pattern_gives_a_residual_add_one_mask():
    pruning = MagnitudePruning(final_sparsity=0.5, pattern="channel", scope="layer", end_epoch=1)
    _, module = fit([pruning], module=ResidualModule(), max_epochs=2)
    stem, block = (m.weight_mask.flatten(1).any(1) for m in (module.stem, module.block))
    assert torch.equal(stem, block) and int(stem.sum()) == 4


def test_frozen_layers_stay_as_frozen_unless_named():
    # Regression (#14): a frozen (pretrained) layer was pruned like the rest.
    module = TinyModule()
    module.net.conv2.requires_grad_(False)
    frozen = module.net.conv2.weight.detach().clone()
    pruning = MagnitudePruning(0.5, end_epoch=1)
    fit([pruning], module=module, max_epochs=2)
    assert torch.equal(module.net.conv2.weight, frozen) and not hasattr(module.net.conv2, "weight_mask")
    named = TinyModule()
    named.net.conv2.requires_grad_(False)
    named_pruning = MagnitudePruning(0.5, end_epoch=1, include=["net.conv2", "net.fc1"], scope="layer")
    fit([named_pruning], module=named, max_epochs=1)
    assert float((named.net.conv2.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


class DenseModule(TinyModule):
    """DenseNet's pattern around a user's module: a layer's channels reach a later BatchNorm through a
    concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.grow = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, *, scale=1.0):
        h = self.stem(x)
        h = torch.relu(self.norm(torch.cat([h, self.grow(h)], 1)))
        return self.head(h.mean((2, 3))) * scale


def test_channel_pattern_masks_the_batchnorms_a_concatenation_reaches():
    # Regression (#14): only the BatchNorm right after a layer was masked; DenseNet's later BatchNorms
    # turned a pruned channel's zeros into constants, so removing the channel changed the model.
    from lightning_compress.deploy.onnx import float_copy
    from lightning_compress.deploy.shrink import max_abs_diff, remove_zero_channels

    pruning = MagnitudePruning(final_sparsity=0.5, pattern="channel", scope="layer", end_epoch=1)
    _, module = fit([pruning], module=DenseModule(), max_epochs=2)
    dead = torch.cat([~m.weight_mask.flatten(1).any(1) for m in (module.stem, module.grow)])
    assert int(dead.sum()) == 8 and (module.norm.weight[dead] == 0).all() and (module.norm.bias[dead] == 0).all()
    assert (module.norm.weight[~dead] != 0).all()
    x = loaders()[1].dataset.tensors[0][:16]
    smaller, info = remove_zero_channels(float_copy(module), x)
    assert sum(info["removed_channels"].values()) == 8, info.get("reason")
    assert max_abs_diff(float_copy(module), smaller, x) < 1e-5


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_attention_projections_are_pruned_exported_and_restored(pattern, tmp_path):
    # #14: nn.MultiheadAttention's packed q/k/v projection (`in_proj_weight`, a bare parameter) was never
    # pruned: only its `out_proj` (a Linear) was.
    from torch.utils.data import DataLoader

    from lightning_compress import CompressionExport, restore
    from tests.helpers import Attending, sequences

    data = sequences()
    pruning = MagnitudePruning(0.5, pattern=pattern, end_epoch=1)
    module = Attending()
    export = CompressionExport(tmp_path, plots=False, val_batches=1)
    fit_loaders = DataLoader(data, batch_size=16), DataLoader(data, batch_size=48)
    trainer(callbacks=[pruning, export], max_epochs=2).fit(module, *fit_loaders)
    assert hasattr(module.attention, "weight_mask")  # masks stay on the model after fit
    projection = module.attention.in_proj_weight.detach()
    assert float((projection == 0).float().mean()) == pytest.approx(0.5, abs=0.1)
    if pattern == "2:4":
        assert ((projection.reshape(-1, 4) == 0).sum(1) == 2).all()
    import json

    report = json.loads((tmp_path / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values())
    fresh = restore(Attending(), tmp_path / "model.ckpt").eval()
    x = data.tensors[0][:8]
    assert torch.equal(fresh.attention.in_proj_weight == 0, projection == 0)
    assert torch.allclose(fresh(x), module.eval()(x), atol=1e-6)


class SlicingModule(TinyModule):
    """Swin's patch merging in a user's module: strided slices, concatenated (Torch-Pruning is not traced)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.mix = torch.nn.Conv2d(32, 8, 1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x, *, scale=1.0):
        h = torch.relu(self.conv(x))
        h = torch.cat([h[:, :, 0::2, 0::2], h[:, :, 1::2, 0::2], h[:, :, 0::2, 1::2], h[:, :, 1::2, 1::2]], 1)
        return self.head(torch.relu(self.mix(h)).mean((2, 3))) * scale


def test_an_untraceable_model_is_pruned_layer_by_layer_and_says_why():
    # #14: when the coupling trace failed (or took too long), channel pruning fell back to per-layer
    # masks without a word.
    pruning = MagnitudePruning(final_sparsity=0.5, pattern="channel", scope="layer", end_epoch=1)
    with pytest.warns(UserWarning, match="on its own .* could not trace the model: RuntimeError: the model slices"):
        _, module = fit([pruning], module=SlicingModule(), max_epochs=2)
    assert int((~module.conv.weight_mask.flatten(1).any(1)).sum()) == 4


def test_layer_sparsity_ramps_named_layers_to_their_own_targets():
    pruning = MagnitudePruning(0.5, end_epoch=2, update_frequency=4, layer_sparsity={"net.fc1": 0.9, "net.conv*": 0.2})
    probe = StepProbe(pruning)
    _, module = fit([pruning, probe], max_epochs=3)
    measured = {name: float((m.weight == 0).float().mean()) for name, m in select_layers(module).items()}
    assert measured["net.fc1"] == pytest.approx(0.9, abs=1e-3)
    assert measured["net.conv1"] == pytest.approx(0.2, abs=0.02)
    assert measured["net.conv2"] == pytest.approx(0.2, abs=0.01)
    assert measured["net.fc2"] == pytest.approx(0.5, abs=0.02)  # the rest share final_sparsity
    assert probe.violations == 0


def test_layer_sparsity_half_way_along_the_ramp_is_half_way_for_each_layer():
    pruning = MagnitudePruning(0.8, end_epoch=2, schedule="linear", update_frequency=8, layer_sparsity={"net.fc1": 0.4})
    seen = {}

    class Probe(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            fc1 = float((pl_module.net.fc1.weight == 0).float().mean())
            seen[trainer.current_epoch] = (pruning.current_target, fc1)

    fit([pruning, Probe()], max_epochs=3)
    target, fc1 = seen[1]  # the update at step 8 of 16
    assert 0 < target < 0.8 and fc1 == pytest.approx(0.4 * target / 0.8, abs=1e-3)


def test_layer_sparsity_naming_no_selected_layer_fails_at_setup_with_the_choices():
    with pytest.raises(CompressionConfigError, match=r"`layer_sparsity\['net.fc3'\]` .*did you mean 'net.fc"):
        fit([MagnitudePruning(0.5, layer_sparsity={"net.fc3": 0.5})], max_epochs=1)
    with pytest.raises(CompressionConfigError, match=r"`layer_sparsity\['net.fc2'\]` names \['net.fc2'\], which"):
        fit([MagnitudePruning(0.5, pattern="channel", layer_sparsity={"net.fc2": 0.5})], max_epochs=1)  # the classifier


# -- criteria other than magnitude (#19) -------------------------------------------------------------
class TaylorProbe(pl.Callback):
    """Its own average of (g * w)^2 per weight over the steps before pruning starts (put it before the pruning)."""

    def __init__(self, names: list[str]) -> None:
        self.names, self.sums, self.steps = names, {}, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step >= STEPS_PER_EPOCH:
            return
        for name in self.names:
            w = pl_module.get_submodule(name).weight
            self.sums[name] = self.sums.get(name, 0) + (w.grad.double() * w.detach().double()) ** 2
        self.steps += 1


def test_taylor_masks_keep_the_weights_of_largest_mean_squared_gradient_times_weight():
    names = ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]
    probe = TaylorProbe(names)
    pruning = MagnitudePruning(0.7, start_epoch=1, end_epoch=1, schedule="constant", criterion="taylor")  # step 8 only
    _, module = fit([probe, pruning], max_epochs=2)
    assert probe.steps == STEPS_PER_EPOCH
    scores = torch.cat([(probe.sums[n] / probe.steps).reshape(-1) for n in names])
    masks = torch.cat([module.get_submodule(n).weight_mask.reshape(-1) for n in names])
    kept = int(masks.sum())
    assert kept == round(0.3 * len(scores))
    assert torch.equal(masks, scores >= scores.topk(kept).values.min())  # no layer under its floor here
    magnitude = fit([MagnitudePruning(0.7, start_epoch=1, end_epoch=1, schedule="constant")], max_epochs=2)[1]
    assert not torch.equal(masks, torch.cat([magnitude.get_submodule(n).weight_mask.reshape(-1) for n in names]))


@pytest.mark.parametrize("criterion", ["fpgm", "slimming"])
def test_channel_criteria_prune_whole_channels(criterion):
    pruning = MagnitudePruning(0.5, pattern="channel", end_epoch=1, criterion=criterion)
    _, module = fit([pruning], module=TinyModule(bn=True), max_epochs=2)
    for name in ("net.conv1", "net.conv2"):
        mask = module.get_submodule(name).weight_mask
        assert mask.reshape(mask.shape[0], -1).all(1).sum() < mask.shape[0]  # some whole filters pruned


def test_slimming_pushes_batchnorm_scales_toward_zero_until_the_ramp_ends():
    def gammas(strength):
        pruning = MagnitudePruning(0.25, pattern="channel", end_epoch=2, criterion="slimming",
                                   slimming_strength=strength)  # fmt: skip
        _, module = fit([pruning], module=TinyModule(bn=True), max_epochs=2)
        return float(module.net.bn1.weight.abs().sum() + module.net.bn2.weight.abs().sum())

    assert gammas(0.05) < gammas(0.0) - 0.1  # 16 steps of lr 0.05 x 0.05 on 16 scales: about -0.6 in L1


def test_a_resumed_fit_keeps_the_taylor_scores_of_the_open_window(tmp_path):
    def run(ckpt_path=None, subdir="a"):
        pruning = MagnitudePruning(0.8, end_epoch=3, update_frequency=12, criterion="taylor")  # windows span epochs
        checkpoint = ModelCheckpoint(dirpath=tmp_path / subdir, save_top_k=-1, every_n_epochs=1)
        _, module = fit([pruning, checkpoint], max_epochs=4, ckpt_path=ckpt_path, enable_checkpointing=True)
        return module, pruning

    full, _ = run()
    mid = tmp_path / "a" / "epoch=0-step=8.ckpt"  # 8 steps into the first 12-step window
    saved = torch.load(mid, weights_only=True)["callbacks"]
    assert next(state for state in saved.values() if state.get("kind") == "pruning")["scores"]["steps"] == 8
    resumed, _ = run(ckpt_path=mid, subdir="b")
    for name, layer in select_layers(full).items():
        assert torch.equal(layer.weight_mask, resumed.get_submodule(name).weight_mask), name
        assert torch.equal(layer.weight, resumed.get_submodule(name).weight), name


def test_criterion_arguments_are_checked():
    with pytest.raises(CompressionConfigError, match="`criterion` must be used with pattern 'channel'"):
        MagnitudePruning(criterion="fpgm")
    with pytest.raises(CompressionConfigError, match="`scope` must be 'global' or 'layer' with criterion 'movement'"):
        MagnitudePruning(criterion="movement", scope="lamp")
    with pytest.raises(CompressionConfigError, match="`slimming_strength` must be a number >= 0, got -1"):
        MagnitudePruning(pattern="channel", criterion="slimming", slimming_strength=-1)


def test_scores_of_another_criterion_in_a_checkpoint_are_not_used(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    fit([MagnitudePruning(0.5, end_epoch=2, criterion="movement"), checkpoint], max_epochs=2, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="starts its scores afresh: the checkpoint holds 'movement' scores"):
        fit([MagnitudePruning(0.5, end_epoch=2, criterion="taylor")], max_epochs=3,
            ckpt_path=tmp_path / "epoch=1-step=16.ckpt")  # fmt: skip
