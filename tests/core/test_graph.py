import gc
import weakref

import pytest
import torch
from torch import nn

from lightning_compress.core import graph
from lightning_compress.core import quantization as q
from lightning_compress.core.graph import coupled_layers, find_bn_pairs
from lightning_compress.core.layers import select_layers
from lightning_compress.core.surgery import swap_modules
from tests.helpers import ResidualNet, TinyNet


def test_batchnorm_pairs_are_found_by_matching_tensors():
    net, x = TinyNet(bn=True), torch.randn(2, 1, 8, 8)
    layers = select_layers(net)
    assert find_bn_pairs(net, layers, x) == {"conv1": "bn1", "conv2": "bn2"}


def count_forwards(model):
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_one_walk_per_structure_shared_by_every_question():
    net, x = TinyNet(bn=True), torch.randn(2, 1, 8, 8)
    calls = count_forwards(net)
    first = graph.analyze(net, x)
    assert find_bn_pairs(net, select_layers(net), x) == {"conv1": "bn1", "conv2": "bn2"}
    q.attach(net, q.QuantConfig())  # quantisers and parametrizations are not structure
    assert graph.analyze(net, x) is first and len(calls) == 1


def test_replacing_a_module_rebuilds_the_analysis():
    net, x = TinyNet(bn=True), torch.randn(2, 1, 8, 8)
    first = graph.analyze(net, x)
    swap_modules(net, {"bn2": nn.Identity()})
    second = graph.analyze(net, x)
    assert second is not first and second.bn_pairs == {"conv1": "bn1"}
    graph.invalidate(net)
    assert graph.analyze(net, x) is not second


def test_reaches_follows_range_preserving_modules_only():
    chain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    reaches = graph.analyze(chain, torch.randn(2, 4)).reaches
    assert reaches["0"] == "3" and reaches["3"] == "4" and reaches["4"] == "5"


class _Tail(nn.Module):
    """conv -> BN -> ReLU -> MaxPool, then code in ``forward``: the pooling, and (``branch``) a second use of the
    block's output by a module too; ``twice`` calls the ReLU module a second time, elsewhere."""

    def __init__(self, branch: bool = False, twice: bool = False) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(4, 2)
        self.side = nn.Identity()
        self.branch, self.twice = branch, twice

    def forward(self, x):
        y = self.block(x)
        out = self.head(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))
        if self.branch:
            out = out + self.side(y).mean()
        if self.twice:
            out = self.block[2](out)
        return out


def test_tails_end_where_only_code_outside_the_modules_reads_the_path():
    x = torch.randn(2, 1, 10, 10)
    assert graph.analyze(_Tail(), x).tails == {"block.1": "block.3", "block.2": "block.3"}  # the conv feeds the BN
    assert graph.analyze(_Tail(branch=True), x).tails == {}  # a module reads the block's output too
    assert graph.analyze(_Tail(twice=True), x).tails == {}  # the ReLU module runs twice: its output hook would too
    from lightning_compress.vision.models import cnn_small, cnn_wide

    assert graph.analyze(cnn_wide(), torch.randn(2, 1, 28, 28)).tails == {
        "features.9": "features.11", "features.10": "features.11"
    }  # its forward average-pools the last block's output; cnn_small's reaches the classifier instead
    assert graph.analyze(cnn_small(), torch.randn(2, 1, 28, 28)).tails == {}


def test_the_analysis_keeps_no_tensor_and_no_model_alive():
    net, x = TinyNet(bn=True), torch.randn(2, 1, 8, 8)
    result = graph.analyze(net, x)
    assert all(not isinstance(v, torch.Tensor) for v in vars(result).values())
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


def test_couplings_are_traced_once_per_structure(monkeypatch):
    from torchvision.models import resnet18

    model, x = resnet18(num_classes=4).eval(), torch.randn(2, 3, 32, 32)
    traces = []
    real = graph.dependency_graph
    monkeypatch.setattr(graph, "dependency_graph", lambda *a: traces.append(1) or real(*a))
    layers = select_layers(model)
    groups = coupled_layers(model, layers, x)
    assert coupled_layers(model, {n: m for n, m in layers.items() if n != "conv1"}, x)
    assert len(traces) == 1
    assert any({"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(g) for g in groups)


def test_a_trace_that_takes_too_long_is_abandoned():
    import time

    with pytest.raises(TimeoutError, match=r"the trace took more than 0\.2 s"), graph.time_limit(0.2, "the trace"):
        while True:
            time.sleep(0.01)
    with graph.time_limit(5, "a quick one"):  # the timer is cleared on the way out
        time.sleep(0.01)
    time.sleep(0.05)


def test_a_trace_that_swallows_the_timeout_is_stopped_all_the_same():
    # Regression (#14): Torch-Pruning's trace runs the model's forward under a bare `except:` (and runs
    # it again there): a timeout raised during that forward was swallowed, and a MaxViT export hung for
    # more than 5 minutes past the 30 s limit.
    import time

    swallowed = []

    def forward() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.01)

    started = time.monotonic()
    with pytest.raises(TimeoutError), graph.time_limit(0.2, "the trace"):
        try:  # Torch-Pruning's `build_dependency`
            forward()
        except:  # noqa: E722 (what the library does)
            swallowed.append(1)
            forward()
    assert swallowed and time.monotonic() - started < 5


def test_strided_slicing_is_not_traced_so_couplings_fall_back_to_none():
    class Merging(nn.Module):  # Swin's patch merging: strided slices, concatenated
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(32, 4, 1)

        def forward(self, x):
            x = self.conv(x)
            quarters = [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]]
            return self.head(torch.cat(quarters, 1))

    model, x = Merging(), torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="slices tensors"):
        graph.dependency_graph(model, x)
    assert coupled_layers(model, select_layers(model), x) == [] and graph.entangled_layers(model, x) == {}


class Dense(nn.Module):
    """DenseNet's pattern: each layer's channels are concatenated to the input of every later one, which
    normalises them with a BatchNorm first."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grow = nn.Conv2d(8, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(self.norm(torch.cat([h, self.grow(h)], 1)))).mean((2, 3))


def test_links_follow_a_concatenation_to_the_batchnorm_that_normalises_it():
    model, x = Dense().eval(), torch.randn(2, 3, 8, 8)
    links = graph.channel_links(model, x)
    (grow,) = links["grow"]
    assert (grow.target, grow.kind, grow.producers) == ("norm", "norm", ("grow",))
    assert dict(grow.index) == {0: 8, 1: 9, 2: 10, 3: 11}  # after the stem's 8 channels
    assert {link.target: dict(link.index)[0] for link in links["stem"]} == {"norm": 0}


def test_links_and_segments_of_a_grouped_convolution():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3, groups=2), nn.Conv2d(6, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    links = graph.channel_links(model, x)
    grouped = next(link for link in links["0"] if link.kind == "grouped")
    assert (grouped.target, grouped.groups, grouped.channels) == ("2", 2, 8)
    assert graph.channel_segments(links["0"], 8) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert graph.channel_segments(links["2"], 6) == [0, 0, 0, 1, 1, 1]  # its own outputs, in 2 groups
    assert graph.channel_segments(links.get("3", []), 4) is None and graph.is_grouped(model[2])
    assert not graph.is_grouped(nn.Conv2d(8, 8, 3, groups=8))  # depthwise channels go one by one


class NotSums(nn.Module):
    """Additions that are no residual sum of the block: a constant, a broadcast, a ReLU after the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.relu(y + x) + 1.0 + y.mean((2, 3), keepdim=True)


def test_sums_are_the_residual_additions_a_block_computes_itself():
    net, x = ResidualNet(), torch.randn(2, 1, 8, 8)
    found = graph.analyze(net, x)
    assert list(found.sums) == ["blocks.0", "blocks.1"]  # not `blocks`, which only returns blocks.1's sum
    first, second = found.sums["blocks.0"], found.sums["blocks.1"]
    assert {"stem.1", "stem"} <= set(first.operands[0]) and "blocks.0.conv.4" in first.operands[1]
    assert [layer for layer, made in found.inputs.items() if "blocks.0" in made] == ["blocks.1.conv.0"]
    assert "blocks.1.conv.4" in second.operands[0] and "blocks.0" in second.operands[1]  # in place: out += x
    assert not any("blocks.1" in made for made in found.inputs.values())  # it goes to the pool, no layer
    # the stem's output also goes into the sum: it reaches no single module, so no range is shared across it
    assert "stem.1" not in found.reaches and found.reaches["blocks.0.conv.1"] == "blocks.0.conv.3"
    assert graph.analyze(NotSums(), torch.randn(2, 4, 3, 3)).sums == {}
