"""A QAT training step reads nothing back from the device in the quantisers (on CUDA each such read is a
host-device sync per layer). CPU has no syncs to count, so these count the Python-level reads themselves:
``bool()``, ``float()``, ``int()``, ``.item()`` and ``.tolist()`` of a tensor while the model steps."""

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torchvision

from lightning_compress.core import quantization as q
from lightning_compress.core.graph import find_bn_pairs

READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")


@contextmanager
def counting_reads() -> Iterator[Counter]:
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_the_counter_sees_reads():
    with counting_reads() as counts:
        bool(torch.tensor(True)), float(torch.tensor(1.0)), torch.tensor(2).item()
    assert counts == Counter({"__bool__": 1, "__float__": 1, "item": 1})


def resnet_in_qat(scales: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10), torch.randn(4, 3, 32, 32)
    layers = q.attach(model, q.QuantConfig(scales=scales, weight_bits=4 if scales == "learned" else 8))
    q.link_batchnorms(model, find_bn_pairs(model, layers, x[:2]))
    q.quantize_sums(model, x[:2])
    q.share_ranges(model, x[:2])
    q.enable(model)
    model.train()
    model(x)  # the first step sets the ranges
    if scales == "learned":
        assert q.start_learning(model) > 0
    return model, x


@pytest.mark.parametrize("scales", ["observed", "learned"])
def test_a_training_step_reads_nothing_back_from_the_device(scales):
    model, x = resnet_in_qat(scales)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with counting_reads() as counts:
        for _ in range(2):
            loss = torch.nn.functional.cross_entropy(model(x), torch.arange(4))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert counts == Counter()
    kinds = {q.scale_kinds(layer) for layer in q.quantized_layers(model).values()}
    assert kinds == {scales}  # and the steps above ran the quantisers of that kind


def test_evaluation_with_the_clip_counters_reads_nothing_back_either():
    model, x = resnet_in_qat("observed")
    q.freeze_observers(model)
    q.watch_saturation(model)
    model.eval()
    with counting_reads() as counts, torch.no_grad():
        model(x)
    assert counts == Counter()
    assert q.saturation(model)  # the counters counted (read once, here, for the whole model)


def test_the_python_copies_follow_the_buffers_through_a_checkpoint():
    model, x = resnet_in_qat("observed")
    q.freeze_observers(model)
    state = model.state_dict()
    fresh, _ = resnet_in_qat("observed")
    q.enable(fresh, False)
    fresh.load_state_dict(state)
    for quantizer in fresh.modules():
        if isinstance(quantizer, (q.ActivationFakeQuant, q.WeightFakeQuant)):
            for name in quantizer.FLAGS:
                if name in quantizer._buffers:
                    assert quantizer.flag(name) == bool(getattr(quantizer, name)), name
    assert torch.equal(fresh.eval()(x), model.eval()(x))
