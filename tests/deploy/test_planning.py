"""The budget planner (#17): targets, techniques, plans that meet their target, the sensitivity cache."""

import pytest
import torch
from torch import nn

from lightning_compress.deploy.planning import Target, parse_techniques, plan_model
from lightning_compress.errors import CompressionConfigError


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
    from lightning_compress.deploy.planning import measure_plan

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
    import lightning_compress.deploy.planning as planning

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


class Residual(nn.Module):
    """A stem and a block's last conv meet in one add (one channel mask); the block's first conv is free."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 16, 3, padding=1)
        self.last = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.last(torch.relu(self.inner(h)))
        return self.head(h.mean((2, 3)))


def test_coupled_layers_get_no_channel_fraction_of_their_own():
    from lightning_compress.deploy.planning import analyse

    torch.manual_seed(0)
    net = Residual().eval()
    x = torch.randn(8, 1, 8, 8)
    analysis = analyse(net, [(x, net(x).argmax(1).detach())], ["channel"], batch_size=4, runs=2)
    offered = {name for name in analysis.layers if any(key.startswith("channels") for key in analysis.options[name])}
    assert offered == {"inner"}  # stem + last share one mask; head is the classifier
