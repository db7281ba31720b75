"""``BudgetPlanner``: a plan made during the fit configures the compression callbacks (#17)."""

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import (
    BudgetPlanner,
    CompressionConfigError,
    CompressionExport,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
    restore,
)
from lightning_compress.core.quantization import quantized_layers, weight_quantizer
from tests.helpers import TinyModule, fit


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "latncy=0.5"}, r"`--target` must be METRIC=VALUE .*did you mean 'latency'"),
        ({"epoch": -1}, "`epoch` must be a whole epoch number >= 0, got -1"),
        ({"bits": [3]}, "`bits` must be a list of weight widths from 4 and 8"),
        ({"runs": 0}, "`runs` must be a positive integer, got 0"),
    ],
)
def test_invalid_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        BudgetPlanner(**kwargs)


def test_setup_refuses_what_it_cannot_plan_for():
    with pytest.raises(CompressionConfigError, match="BudgetPlanner has nothing to plan for: add one or more of"):
        fit([BudgetPlanner("params=0.5")], max_epochs=1)
    with pytest.raises(CompressionConfigError, match=r"`MagnitudePruning.start_epoch` must be >= BudgetPlanner's"):
        fit([BudgetPlanner("params=0.5", epoch=1), MagnitudePruning(0.5)], max_epochs=1)
    with pytest.raises(CompressionConfigError, match=r"`MagnitudePruning.pattern` must be 'channel' or 'unstructured'"):
        fit([BudgetPlanner("params=0.5", epoch=0), MagnitudePruning(pattern="2:4")], max_epochs=1)


def callbacks(tmp_path, target="bytes=0.6"):
    return [
        BudgetPlanner(target, epoch=1, runs=2, cache=str(tmp_path / "latency.json")),
        MagnitudePruning(pattern="channel", start_epoch=1, end_epoch=2),
        LowRankFactorization(epoch=1),
        QuantizationAwareTraining(start_epoch=2),
    ]


@pytest.mark.parametrize("target", ["bytes=0.6", "params=0.6"])
def test_the_plan_configures_every_callback_and_the_export_verifies(target, tmp_path):
    made = callbacks(tmp_path, target)
    planner, pruning, low_rank, qat = made
    export = CompressionExport(tmp_path / "out", plots=False, val_batches=1, baseline=None)
    _, module = fit([*made, export], module=TinyModule(bn=True), max_epochs=3)
    plan = planner.plan
    metric, ratio = target.split("=")
    assert plan is not None and plan["predicted"][metric] <= float(ratio) * plan["dense"][metric]
    if metric == "bytes":  # measured on the file: within the calibration's tolerance of the target
        assert plan["measured"]["bytes"] <= float(ratio) * 1.05 * plan["dense"]["bytes"]
    settings = plan["settings"]
    assert pruning.layer_sparsity == settings.get("pruning", {}).get("layer_sparsity", {})
    pruned = {name for name, m in module.named_modules() if hasattr(m, "weight_mask") and not m.weight_mask.all()}
    assert pruned == set(pruning.layer_sparsity)  # exactly the planned layers, none where the plan prunes nothing
    assert set(low_rank.factorized) == set(settings.get("low_rank", {}).get("ranks", {}))
    planned_int8 = set(settings.get("quantization", {}).get("include", []))
    enabled = {n for n, m in quantized_layers(module).items() if bool(weight_quantizer(m).enabled)}
    parents = {n.rsplit(".", 1)[0] if n.rsplit(".", 1)[0] in low_rank.factorized else n for n in enabled}
    assert parents == planned_int8  # a factorised layer's factors count as the layer
    assert set(qat.float_layers) == {n for n in quantized_layers(module) if n not in enabled}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert ("onnx_int8" in report["files"]) == bool(planned_int8)  # no int8 file where the plan keeps all float
    assert all(check["passed"] for check in report["verification"].values()), report["verification"]
    if metric == "bytes":
        assert planned_int8 and len(enabled) < len(quantized_layers(module))  # mixed: some int8, some float
    else:
        assert (pruned or low_rank.factorized) and not planned_int8  # int8 saves no parameters
    fresh = restore(TinyModule(bn=True), tmp_path / "out" / "model.ckpt").eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), module.eval()(x), atol=1e-6)


def test_a_resumed_fit_takes_the_plan_from_the_checkpoint_instead_of_planning_again(tmp_path, monkeypatch):
    import lightning_compress.callbacks.budget as budget

    checkpoints = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = callbacks(tmp_path)
    fit([*first, checkpoints], module=TinyModule(bn=True), max_epochs=2, enable_checkpointing=True)
    monkeypatch.setattr(budget, "plan_model", lambda *a, **k: pytest.fail("planned again"))
    again = callbacks(tmp_path)
    path = sorted((tmp_path / "ckpt").glob("epoch=1*.ckpt"))[0]
    fit(again, module=TinyModule(bn=True), max_epochs=3, ckpt_path=str(path))
    assert again[0].plan == first[0].plan
    assert again[1].layer_sparsity == first[1].layer_sparsity and again[3].float_layers == first[3].float_layers


@pytest.mark.slow
def test_ddp_ranks_get_rank_zeros_plan_and_train_in_sync(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "ddp_budget.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["plan"] == rank1["plan"] and rank0["plan"]["options"]  # planned once, on rank 0, broadcast
    assert rank0["layer_sparsity"] == rank1["layer_sparsity"] and rank0["int8"] == rank1["int8"]
    assert rank0["int8"]  # the plan quantised some layers
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key
