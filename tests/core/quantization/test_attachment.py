import copy

import pytest
import torch
from torch import nn

from lightning_compress.core import quantization as q
from lightning_compress.core.graph import find_bn_pairs
from lightning_compress.core.layers import weight_of
from lightning_compress.core.quantization import attachment, share_ranges
from lightning_compress.errors import CompressionConfigError
from tests.helpers import TinyNet, quantised


def test_attached_but_disabled_changes_nothing_and_keeps_forward():
    torch.manual_seed(0)
    net, x = TinyNet(), torch.randn(4, 1, 8, 8)
    before = net(x, scale=2.0)
    q.attach(net)
    assert torch.equal(net(x, scale=2.0), before)
    assert type(net).forward is TinyNet.forward  # the model's own forward, keyword arguments and all
    assert "conv1.parametrizations.weight.original" in net.state_dict()












def test_folded_weight_is_quantised_and_output_quantised_after_the_batchnorm():
    net, _x = quantised(bn=True)
    assert q.weight_quantizer(net.conv2).bn is net.bn2
    factor = q.bn_fold_factor(net.bn2).detach()
    folded = net.conv2.weight.detach() * factor[:, None, None, None]
    scale = q.weight_scale(weight_of(net.conv2) * factor[:, None, None, None], 8, True)
    ints = folded / scale[:, None, None, None]
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert attachment._OUTPUT_QUANT_REF in net.bn2.__dict__ and attachment._OUTPUT_QUANT_REF not in net.conv2.__dict__








def test_strip_gives_a_plain_model_and_leaves_copies_alone():
    net, x = quantised(bn=True)
    twin = copy.deepcopy(net)
    q.strip(net)
    assert q.quantized_layers(net) == {}
    TinyNet(bn=True).load_state_dict(net.state_dict())  # strict: original keys
    assert twin(x).shape == (16, 4) and q.quantized_layers(twin)  # the copy still works


def test_nothing_to_quantise():
    with pytest.raises(CompressionConfigError, match="nothing to quantise in Sequential"):
        q.attach(nn.Sequential(nn.ReLU()))


def test_output_ranges_are_shared_only_through_relu_and_maxpool():
    from lightning_compress.vision.models import build_model

    x = torch.randn(2, 1, 28, 28)
    for name, expected in (
        ("cnn_small", ["features.0", "features.4", "features.8", "classifier.1"]),
        ("resnet18", ["conv1"] + [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]),
    ):
        model = build_model(name)
        layers = q.attach(model)
        q.link_batchnorms(model, find_bn_pairs(model, layers, x))
        # resnet's conv2 -> bn2 is followed by an unseen in-place `out += identity`: not shared
        assert share_ranges(model, x) == expected, name


def test_functional_ops_keep_their_output_quantiser():
    net = TinyNet(bn=True)  # F.relu / F.max_pool2d: invisible to module hooks, so nothing is shared
    q.attach(net)
    assert share_ranges(net, torch.randn(2, 1, 8, 8)) == []


def test_an_identity_module_between_layers_ends_the_search():
    net = TinyNet(bn=False)  # bn1 / bn2 are nn.Identity: the same tensor comes back (this looped forever)
    q.attach(net)
    assert share_ranges(net, torch.randn(2, 1, 8, 8)) == []
    chain = nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.ReLU(), nn.Linear(4, 2))
    q.attach(chain)
    assert share_ranges(chain, torch.randn(2, 4)) == ["0"]


def test_freeze_bn_puts_folded_batchnorms_in_eval_mode():
    net, _ = quantised(bn=True)
    q.freeze_bn(net)
    assert not net.bn1.training and not net.bn2.training and net.conv1.training


def test_set_weight_bits_gives_layers_their_own_width():
    net = TinyNet()
    q.attach(net, q.QuantConfig(weight_bits=8))
    q.enable(net)
    q.set_weight_bits(net, {"fc1": 2, "conv2": 5, "gone": 4})  # a layer not quantised (any more) is skipped
    assert q.weight_bits(net) == {"conv1": 8, "conv2": 5, "fc1": 2, "fc2": 8}
    levels = {len(torch.unique(row)) for row in net.fc1.weight.detach()}
    assert max(levels) <= 3  # 2 bits, symmetric: -1, 0, 1 steps
    with pytest.raises(CompressionConfigError, match=r"`layer_bits\['fc2'\]` must be an integer from 2 to 8, got 9"):
        q.set_weight_bits(net, {"fc2": 9})
