import pytest
import torch

from lightning_compress.core import quantization as q
from lightning_compress.core.layers import select_layers, weight_of
from lightning_compress.core.pruning import prune
from tests.helpers import quantised


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


def test_ema_observer_moves_part_of_the_way_with_a_warm_up():
    observer = q.ActivationFakeQuant(observer="ema", ema_decay=0.9).train()
    observer.enabled.fill_(True)
    observer(torch.tensor([0.0, 1.0]))  # the first batch sets the range
    observer(torch.tensor([0.0, 11.0]))  # the second: decay min(0.9, 2/11), 1 + (9/11) * 10
    assert float(observer.max_val) == pytest.approx(1 + 9 / 11 * 10)
    assert int(observer.updates) == 2
    observer.updates.fill_(100)  # warmed up: (1 + 100) / (10 + 100) > 0.9, the decay itself
    before = float(observer.max_val)
    observer(torch.tensor([0.0, 0.0]))
    assert float(observer.max_val) == pytest.approx(0.9 * before)


def test_an_observer_from_a_checkpoint_without_an_update_count_loads_warmed_up():
    observer = q.ActivationFakeQuant()
    old = {k: v for k, v in q.ActivationFakeQuant().state_dict().items() if k != "updates"}
    assert observer.load_state_dict(old) is not None and int(observer.updates) == q.fake_quant.WARMED_UP


def test_eval_does_not_observe():
    net, x = quantised()
    before = q.observer_ranges(net)
    net.eval()
    net(x * 100)
    assert q.observer_ranges(net) == before


def test_evaluation_counts_values_outside_the_observed_range_only_while_watched():
    net, x = quantised()
    net.eval()
    q.watch_saturation(net)
    net(x)  # the ranges were observed on this batch: nothing clips
    assert set(q.saturation(net).values()) == {0.0}
    net(x * 100)  # two batches: the second far beyond the ranges
    shares = q.saturation(net)
    assert shares["conv1.input_quant"] > 0.4 and all(0.0 <= share <= 0.5 for share in shares.values())
    q.watch_saturation(net, False)
    net(x * 100)
    assert q.saturation(net) == shares  # not counted any more
    net.train()
    q.watch_saturation(net)
    net(x * 100)  # training mode observes: it does not count
    assert set(q.saturation(net).values()) <= {0.0} and "conv1.input_quant.clipped" not in net.state_dict()
