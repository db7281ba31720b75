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
    observer.set_flag("enabled", True)
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


# -- learned step sizes (LSQ, Esser et al. 2020) ------------------------------------------------------------
def test_a_learned_weight_step_follows_the_lsq_formula_on_a_hand_checked_example():
    # 4 bits: integers in [-7, 7]. Weight row [0.3, -0.9, 2.0]: observed step m = 2 / 7. At ratio 0.875 the
    # step is 0.25: w / s = [1.2, -3.6, 8.0] -> rounded [1, -4, 7 (clipped)] -> [0.25, -1.0, 1.75]. LSQ's
    # d q / d s: round(v) - v inside the range ([-0.2, -0.4]), the clipped bound outside (7), times the gradient
    # scale 1 / sqrt(3 elements * 7); the ratio's gradient is that divided by m (d s / d ratio = m, rescaled
    # by 1 / m**2 so that the ratio's step moves s as LSQ's would).
    quant = q.WeightFakeQuant(bits=4, per_channel=True, learned=True, channels=1)
    quant.set_flag("enabled", True)
    weight = torch.tensor([[0.3, -0.9, 2.0]], requires_grad=True)
    quant.start_learning()
    assert quant.ratio.item() == 1.0 and quant.scales(weight).item() == pytest.approx(2.0 / 7)  # starts observed
    with torch.no_grad():
        quant.ratio.fill_(0.875)
    out = quant(weight)
    assert torch.allclose(out, torch.tensor([[0.25, -1.0, 1.75]]))
    out.sum().backward()
    lsq = (-0.2 - 0.4 + 7) / (3 * 7) ** 0.5
    assert quant.ratio.grad.item() == pytest.approx(lsq / (2.0 / 7), rel=1e-5)
    assert torch.equal(weight.grad, torch.tensor([[1.0, 1.0, 0.0]]))  # straight through, zero where clipped
    assert quant.scales(weight).item() == pytest.approx(0.25) and quant.scale_kind == "learned"
    with torch.no_grad():
        quant.ratio.fill_(3.0)  # above 1 would clip nothing and round coarser: kept at the observed step
    quant(weight)
    assert quant.ratio.item() == 1.0 and quant.scales(weight * 10).item() == pytest.approx(20.0 / 7)  # follows max|w|


def test_a_learned_activation_step_starts_from_the_observed_range_and_follows_lsq():
    quant = q.ActivationFakeQuant(learned=True)
    quant.set_flag("enabled", True)
    quant.train()
    x = torch.tensor([[0.0, 1.0, 2.55]])  # observed [0, 2.55]: step 0.01, zero point 0
    quant(x)
    assert quant.scale_kind == "observed" and quant.start_learning()
    assert quant.qparams() == (pytest.approx(0.01), 0) and quant.scale_kind == "learned"
    with torch.no_grad():
        quant.scale.fill_(0.004)  # 0 -> 0; 1.0 -> 250; 2.55 -> 637.5, clipped to 255
    x = x.clone().requires_grad_(True)
    out = quant(x)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, 1.02]]))
    out.sum().backward()
    assert quant.scale.grad.item() == pytest.approx(255 / (3 * 255) ** 0.5, rel=1e-5)  # only the clipped value
    assert torch.equal(x.grad, torch.tensor([[1.0, 1.0, 0.0]]))
    before = (quant.min_val.clone(), quant.max_val.clone())
    quant(torch.full((1, 3), 9.0))  # the observer no longer runs
    assert torch.equal(quant.min_val, before[0]) and torch.equal(quant.max_val, before[1])


def test_an_unobserved_quantiser_does_not_start_learning_and_observed_ones_have_no_step_parameter():
    assert not q.ActivationFakeQuant(learned=True).start_learning()
    assert list(q.ActivationFakeQuant().parameters()) == [] and list(q.WeightFakeQuant(8, True).parameters()) == []


def test_learned_scales_are_model_parameters_from_attach_on_and_start_from_a_calibration():
    net, x = quantised(config=q.QuantConfig(weight_bits=4, scales="learned"))
    scales = q.learned_scales(net)
    layers = q.quantized_layers(net)
    assert len(scales) == 3 * len(layers)  # weight, input and output of every layer
    assert set(scales.values()) <= set(net.parameters())
    q.reset_observers(net)
    q.observe(net, [x])
    q.enable(net)
    assert q.start_learning(net) >= len(layers)
    for name, layer in layers.items():
        quant = q.weight_quantizer(layer)
        expected = q.weight_scale(quant.folded(weight_of(layer)), 4, True)
        assert torch.allclose(quant.scales(quant.folded(weight_of(layer))), expected), name
        assert q.scale_kinds(layer) == "learned"
    loss = net(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in scales.items() if n.endswith("ratio"))


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_weight_fake_quant_is_torchs_bit_for_bit_values_and_gradient(bits):
    from lightning_compress.core.quantization.fake_quant import fake_quant_weight, weight_range, weight_scale

    torch.manual_seed(0)
    weight = torch.randn(32, 16, 3, 3, requires_grad=True)
    low, high = weight_range(bits)
    for scale in (weight_scale(weight, bits, True), 0.3 * weight_scale(weight, bits, True)):  # the second clips
        ours = fake_quant_weight(weight, scale, bits)
        zero = torch.zeros(32, dtype=torch.int32)
        theirs = torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, low, high)
        assert torch.equal(ours, theirs)
        upstream = torch.randn_like(weight)
        (ours_grad,) = torch.autograd.grad(ours, weight, upstream)
        (theirs_grad,) = torch.autograd.grad(theirs, weight, upstream)
        assert torch.equal(ours_grad, theirs_grad)
    clipped = (ours_grad == 0).float().mean()
    assert 0.05 < clipped < 0.95  # the clipping case did clip: the gradient's mask was compared


def test_activation_fake_quant_is_torchs_per_tensor_op_bit_for_bit_with_a_zero_point():
    from lightning_compress.core.quantization.fake_quant import _FakeQuant

    torch.manual_seed(0)
    x = (torch.randn(8, 4, 6, 6) * 3).requires_grad_(True)
    x.data[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, -0.5]) * 0.05  # exact halves: round half to even
    for scale, zero in ((0.05, 100), (0.01, 0), (0.02, 255)):  # the last two clip on one side
        ours = _FakeQuant.apply(x, torch.tensor([scale]), torch.tensor([float(zero)]), 0, 255)
        theirs = torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)
        assert torch.equal(ours, theirs)
        upstream = torch.randn_like(x)
        assert torch.equal(*(torch.autograd.grad(y, x, upstream)[0] for y in (ours, theirs)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_learned_step_op_gives_torchs_lsq_values_and_gradients(per_channel):
    from lightning_compress.core.quantization.fake_quant import _LearnedStepFakeQuant

    torch.manual_seed(0)
    x = (torch.randn(8, 3, 5, 5) * 3).requires_grad_(True)
    channels = 8 if per_channel else 1
    step = (torch.rand(channels) * 0.1 + 0.02).requires_grad_(True)
    zero = torch.zeros(channels) if per_channel else torch.tensor([3.0])
    low, high, factor = (-8, 7, 0.37) if per_channel else (0, 15, 0.37)
    ours = _LearnedStepFakeQuant.apply(x, step, zero, low, high, factor)
    if per_channel:
        theirs = torch._fake_quantize_learnable_per_channel_affine(x, step, zero, 0, low, high, factor)
    else:
        theirs = torch._fake_quantize_learnable_per_tensor_affine(x, step, zero, low, high, factor)
    assert torch.equal(ours, theirs)
    upstream = torch.randn_like(x)
    ours_x, ours_step = torch.autograd.grad(ours, (x, step), upstream)
    theirs_x, theirs_step = torch.autograd.grad(theirs, (x, step), upstream)
    assert torch.equal(ours_x, theirs_x)
    assert 0.05 < float((ours_x == 0).float().mean()) < 0.95  # some clipped: the masks were compared
    torch.testing.assert_close(ours_step, theirs_step, rtol=1e-5, atol=1e-5)  # summed in another order


@pytest.mark.parametrize("bn", [False, True])
def test_the_observed_weight_path_is_the_unfused_arithmetic_with_a_straight_through_gradient(bn):
    net, _x = quantised(bn=bn)
    layer = net.conv2
    quant, stored = q.weight_quantizer(layer), weight_of(layer)
    folded = quant.folded(stored.detach())
    unfused = q.fake_quant_weight(folded, q.weight_scale(folded, quant.bits, True), quant.bits)
    factor = quant.fold_factor(stored)
    expected = unfused if factor is None else unfused / factor
    assert torch.equal(layer.weight, expected)
    upstream = torch.randn_like(stored)
    (grad,) = torch.autograd.grad(layer.weight, stored, upstream)
    assert torch.equal(grad, upstream)
