import copy

import pytest
import torch
from torch import nn

from lightning_compress import quantization as q
from lightning_compress.dataflow import find_bn_pairs, share_ranges
from lightning_compress.errors import CompressionConfigError
from lightning_compress.pruning import prune, select_layers, weight_of
from tests.helpers import TinyNet


def quantised(bn: bool = False, config: q.QuantConfig | None = None, batches: int = 3) -> tuple[TinyNet, torch.Tensor]:
    """A TinyNet with QAT attached (BatchNorms folded), enabled and observed on a few batches."""
    torch.manual_seed(0)
    net, x = TinyNet(bn=bn), torch.randn(16, 1, 8, 8)
    layers = q.attach(net, config or q.QuantConfig())
    q.link_batchnorms(net, find_bn_pairs(net, layers, x[:2]))
    q.enable(net)
    net.train()
    for _ in range(batches):
        net(x)
    return net, x


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_bits": 1}, "`weight_bits` must be an integer from 2 to 8, got 1"),
        ({"weight_bits": 8.0}, "`weight_bits` must be an integer from 2 to 8, got 8.0"),
        ({"activation_bits": 4}, r"`activation_bits` must be 8 \(activations are uint8 in the exported model\), got 4"),
        ({"observer": "minmx"}, "`observer` must be one of 'minmax', 'ema', got 'minmx'. HINT: did you mean 'minmax'"),
        ({"ema_decay": 1.0}, r"`ema_decay` must be a float in \(0, 1\), got 1.0"),
        ({"per_channel": 1}, "`per_channel` must be True or False, got 1"),
        ({"fold_bn": "no"}, "`fold_bn` must be True or False, got 'no'"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        q.QuantConfig(**kwargs)


def test_config_round_trips_through_a_dict():
    config = q.QuantConfig(weight_bits=4, observer="minmax")
    assert q.QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(CompressionConfigError, match=r"`quantization key` must be one of .* got 'bits'"):
        q.QuantConfig.from_dict({"bits": 4})


def test_attached_but_disabled_changes_nothing_and_keeps_forward():
    torch.manual_seed(0)
    net, x = TinyNet(), torch.randn(4, 1, 8, 8)
    before = net(x, scale=2.0)
    q.attach(net)
    assert torch.equal(net(x, scale=2.0), before)
    assert type(net).forward is TinyNet.forward  # the model's own forward, keyword arguments and all
    assert "conv1.parametrizations.weight.original" in net.state_dict()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weights_are_symmetric_per_channel_on_the_grid(bits):
    net, _ = quantised(config=q.QuantConfig(weight_bits=bits))
    w = net.fc1.weight.detach()
    scale = q.weight_scale(weight_of(net.fc1), bits, per_channel=True)
    ints = w / scale[:, None]
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert int(ints.round().abs().max()) == q.weight_qmax(bits)
    assert all(row.unique().numel() <= 2 * q.weight_qmax(bits) + 1 for row in ints.round())


def test_per_tensor_weights_share_one_scale():
    net, _ = quantised(config=q.QuantConfig(per_channel=False))
    w = net.fc1.weight.detach()
    scale = weight_of(net.fc1).abs().max() / 127
    assert torch.allclose(w / scale, (w / scale).round(), atol=1e-3)


def test_straight_through_gradients_reach_the_stored_weights():
    net, x = quantised()
    net(x).sum().backward()
    assert weight_of(net.conv1).grad is not None and weight_of(net.conv1).grad.abs().sum() > 0


def test_zeros_stay_exactly_zero():
    net, _x = quantised()
    prune(net, 0.7)
    for layer in select_layers(net).values():
        stored_zeros = weight_of(layer) == 0
        assert (layer.weight[stored_zeros] == 0).all()


def test_batchnorm_pairs_are_found_by_matching_tensors():
    net, x = TinyNet(bn=True), torch.randn(2, 1, 8, 8)
    layers = select_layers(net)
    assert find_bn_pairs(net, layers, x) == {"conv1": "bn1", "conv2": "bn2"}


def test_folded_weight_is_quantised_and_output_quantised_after_the_batchnorm():
    net, _x = quantised(bn=True)
    assert q.weight_quantizer(net.conv2).bn is net.bn2
    factor = q.bn_fold_factor(net.bn2).detach()
    folded = net.conv2.weight.detach() * factor[:, None, None, None]
    scale = q.weight_scale(weight_of(net.conv2) * factor[:, None, None, None], 8, True)
    ints = folded / scale[:, None, None, None]
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert q._OUTPUT_QUANT_REF in net.bn2.__dict__ and q._OUTPUT_QUANT_REF not in net.conv2.__dict__


def test_observers_include_zero_and_freeze():
    net, x = quantised(config=q.QuantConfig(observer="minmax"))
    observer = net.conv2.input_quant  # after a ReLU: non-negative
    _scale, zero_point = observer.qparams()
    assert zero_point == 0 and float(observer.min_val) >= 0
    q.freeze_observers(net)
    before = q.observer_ranges(net)
    net(x * 10)
    assert q.observer_ranges(net) == before
    q.freeze_observers(net, False)
    net(x * 10)
    assert q.observer_ranges(net)["conv1.input_quant"][1] > before["conv1.input_quant"][1]


def test_ema_observer_moves_part_of_the_way():
    observer = q.ActivationFakeQuant(observer="ema", ema_decay=0.9).train()
    observer.enabled.fill_(True)
    observer(torch.tensor([0.0, 1.0]))
    observer(torch.tensor([0.0, 11.0]))
    assert float(observer.max_val) == pytest.approx(2.0)


def test_eval_does_not_observe():
    net, x = quantised()
    before = q.observer_ranges(net)
    net.eval()
    net(x * 100)
    assert q.observer_ranges(net) == before


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
    from lightning_compress.models import build_model

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
