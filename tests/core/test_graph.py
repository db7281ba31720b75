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
from tests.helpers import TinyNet


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
