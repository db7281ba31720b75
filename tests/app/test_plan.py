"""``lightning-compress plan`` and its library form: per-layer settings chosen to a budget (#17)."""

import pytest
import torch
import yaml
from torch import nn

from lightning_compress.app.cli import main
from lightning_compress.app.plan import Target, parse_techniques, plan_model
from lightning_compress.config import load_recipe
from lightning_compress.errors import CompressionConfigError
from tests.app.test_cli import QUICKSTART


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("latncy=0.5", r"`--target` must be METRIC=VALUE with METRIC one of 'latency'.*did you mean 'latency'"),
        ("bytes=0", r"`--target` must be a ratio in \(0, 1\] of the dense model"),
        ("bytes=2ms", r"`--target` must be a ratio"),
    ],
)
def test_targets_are_validated(text, message):
    with pytest.raises(CompressionConfigError, match=message):
        Target.parse(text)


def test_targets_and_techniques_parse():
    assert Target.parse("latency=0.5") == Target("latency", 0.5, False)
    assert Target.parse("latency=2.5ms") == Target("latency", 2.5, True) and Target.parse("bytes=2e5").absolute
    assert Target("params", 0.3).budget(1000) == 300 and Target("params", 300, True).budget(1000) == 300
    assert parse_techniques("channel, int8,int8") == ["channel", "int8"]
    with pytest.raises(CompressionConfigError, match="at most one of 'channel' and 'unstructured'"):
        parse_techniques("channel,unstructured")
    with pytest.raises(CompressionConfigError, match=r"`--techniques` must be .* got 'int3'. HINT: did you mean"):
        parse_techniques("int3")


class Net(nn.Module):
    """Two convolutions and two Linears: one wide layer that matters little, one small one that matters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 16, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))))


def test_a_params_plan_meets_its_target_and_its_prediction_is_what_is_measured():
    from lightning_compress.app.plan import measure_plan

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(32, 1, 8, 8)
    batches = [(x, net(x).argmax(1).detach())]
    plan = plan_model(net, batches, Target("params", 0.5), ["channel", "low_rank", "int8"], batch_size=8, runs=3)
    assert plan.predicted["params"] <= 0.5 * plan.dense["params"]
    measured = measure_plan(net, plan, batches, batch_size=8, runs=3)
    assert measured["params"] == plan.predicted["params"] and measured["macs"] == plan.predicted["macs"]
    assert "fc2" not in plan.options or plan.options["fc2"].structure is None  # the classifier keeps its classes
    assert set(plan.sensitivity.results) == {"conv1", "conv2", "fc1", "fc2"}
    assert "low_rank=0.5" not in plan.sensitivity.results["conv1"]  # fan-in 9: not worth factorising
    with pytest.raises(CompressionConfigError, match=r"the budget .* cannot be met"):
        plan_model(net, batches, Target("params", 0.01), ["int8"], batch_size=8, runs=3)


def test_the_sensitivity_table_is_kept_and_reused_while_weights_and_data_are_the_same(tmp_path, monkeypatch):
    import lightning_compress.app.plan as planning

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(16, 1, 8, 8)
    batches = [(x, net(x).argmax(1).detach())]
    kept = tmp_path / "table.json"
    first = plan_model(net, batches, Target("params", 0.6), ["channel"], 8, runs=2, sensitivity_cache=kept)
    monkeypatch.setattr(planning, "sensitivity", lambda *a, **k: pytest.fail("measured again"))
    again = plan_model(net, batches, Target("params", 0.6), ["channel"], 8, runs=2, sensitivity_cache=kept)
    assert again.sensitivity == first.sensitivity and again.options == first.options
    with torch.no_grad():
        net.fc1.weight.mul_(2)  # other weights: another key, measured again
    with pytest.raises(pytest.fail.Exception, match="measured again"):
        plan_model(net, batches, Target("params", 0.6), ["channel"], 8, runs=2, sensitivity_cache=kept)


def test_plan_writes_a_recipe_that_validates_and_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "planned.yaml"
    code = main(["plan", QUICKSTART, "--target", "params=0.5", "--techniques", "channel,int8", "--out", str(out),
                 "--runs", "3", "--trainer.max_epochs=3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "params dense 12162" in printed
    text = out.read_text()
    assert text.startswith("# Planned by `lightning-compress plan") and "predicted" in text and "measured" in text
    config = yaml.safe_load(text)
    pruning = config["compression"]["pruning"]
    assert pruning["pattern"] == "channel" and set(pruning["layer_sparsity"]) == set(pruning["include"])
    assert out.with_suffix(".sensitivity.png").stat().st_size > 0 and out.with_suffix(".latency.json").is_file()
    assert yaml.safe_load(out.with_suffix(".sensitivity.json").read_text())["samples"] == 128
    callbacks = {type(c).__name__ for c in load_recipe(out).callbacks()}
    assert "MagnitudePruning" in callbacks
    assert main(["fit", str(out), "--trainer.max_epochs=2"]) == 0  # the planned recipe trains
    assert "'pruning/sparsity'" in capsys.readouterr().out
    assert main(["plan", QUICKSTART, "--target", "latency=0.0001ms", "--out", str(tmp_path / "x.yaml"),
                 "--epochs", "0", "--runs", "2"]) == 2  # fmt: skip
    assert "cannot be met" in capsys.readouterr().err
