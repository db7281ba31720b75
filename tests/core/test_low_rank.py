import pytest
import torch
from torch import nn

from lightning_compress.core.low_rank import (
    LowRank,
    describe,
    factorize,
    factorize_conv_svd,
    factorize_conv_tucker2,
    factorize_linear,
    plan,
    rank_for,
    rebuild,
)
from lightning_compress.core.surgery import swap_modules
from lightning_compress.errors import CompressionConfigError
from tests.helpers import TinyNet


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_full_rank_reproduces_every_layer_kind():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    x = torch.randn(5, 12)
    assert close(factorize_linear(linear, 7)(x), linear(x))
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2)
    image = torch.randn(2, 6, 11, 9)
    assert close(factorize_conv_svd(conv, 10)(image), conv(image))  # min(10, 6*3*3)
    assert close(factorize_conv_tucker2(conv, (10, 6))(image), conv(image))
    no_bias = nn.Conv2d(4, 4, 1, bias=False)
    assert close(factorize_conv_svd(no_bias, 4)(image[:, :4]), no_bias(image[:, :4]))


def test_truncated_svd_is_the_best_rank_r_approximation():
    torch.manual_seed(0)
    linear = nn.Linear(20, 16, bias=False)
    values = torch.linalg.svdvals(linear.weight.detach().double())
    new = factorize_linear(linear, 5)
    approx = (new[1].weight @ new[0].weight).double()
    error = torch.linalg.matrix_norm(approx - linear.weight.detach().double())
    assert error.item() == pytest.approx(values[5:].pow(2).sum().sqrt().item(), rel=1e-4)  # Eckart-Young


def test_structure_respects_stride_padding_and_dilation():
    conv = nn.Conv2d(8, 16, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    svd = factorize_conv_svd(conv, 4)
    assert (svd[0].stride, svd[0].padding, svd[0].dilation, svd[1].kernel_size) == ((2, 1), (1, 2), (1, 2), (1, 1))
    tucker = factorize_conv_tucker2(conv, (6, 3))
    assert [m.weight.shape[:2] for m in tucker] == [(3, 8), (6, 3), (16, 6)]
    assert tucker[1].stride == (2, 1) and tucker[0].kernel_size == tucker[2].kernel_size == (1, 1)


def test_rank_rules():
    torch.manual_seed(0)
    layer = nn.Linear(100, 50)
    assert rank_for(layer, ratio=0.5) == (16,)  # 16 * 150 <= 2500 < 17 * 150
    new, result = factorize(layer, ratio=0.5)
    assert result.params_after <= 0.5 * result.params_before + 50 and isinstance(new, LowRank)
    with torch.no_grad():  # singular values 10, 1, 1, 0.01 ...: energy shares 0.980, 0.990, 0.99995, ...
        u, _, vh = torch.linalg.svd(torch.randn(50, 100), full_matrices=False)
        s = torch.tensor([10.0, 1.0, 1.0] + [0.01] * 47)
        layer.weight.copy_(u @ torch.diag(s) @ vh)
    assert [rank_for(layer, energy=e, floor=1) for e in (0.98, 0.99, 0.9999)] == [(1,), (2,), (3,)]
    assert rank_for(layer, energy=0.98) == (4,)  # the default floor: never below rank 4
    assert rank_for(layer, energy=1.0) == (50,)
    conv = nn.Conv2d(32, 64, 3)
    r_out, r_in = rank_for(conv, ratio=0.4, method="tucker2")
    assert 32 * r_in + r_in * r_out * 9 + r_out * 64 <= 0.4 * conv.weight.numel()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"`rank/ratio/energy` must be exactly one of them set, got None"),
        ({"rank": 2, "ratio": 0.5}, r"`rank/ratio/energy` must be exactly one of them set, got \['rank', 'ratio'\]"),
        ({"rank": 0}, "`rank` must be an integer >= 1, got 0"),
        ({"ratio": 1.0}, r"`ratio` must be a number in \(0, 1\), got 1.0"),
        ({"energy": 0}, r"`energy` must be a number in \(0, 1\], got 0"),
        ({"energy": 1.5}, r"`energy` must be a number in \(0, 1\], got 1.5"),
        ({"rank": 2, "conv_method": "cp"}, "`conv_method` must be one of 'svd', 'tucker2', got 'cp'"),
    ],
)
def test_settings_errors(kwargs, message):
    with pytest.raises(CompressionConfigError, match=message):
        factorize(nn.Linear(8, 8), **kwargs)


def test_rank_not_below_the_smallest_dimension():
    with pytest.raises(CompressionConfigError, match=r"`rank` must be < 4 for Linear \(4, 16\), got 4"):
        factorize(nn.Linear(16, 4), rank=4)
    with pytest.raises(CompressionConfigError, match=r"< 8 for Conv2d \(8, 1, 3, 3\), got 40 \(and every other"):
        plan(TinyNet(), rank=40, include=["*"])  # every TinyNet layer has a dimension below 40
    with pytest.raises(CompressionConfigError, match=r"< 8 for Conv2d \(8, 8, 3, 3\), got 40 \(and every other"):
        plan(TinyNet(), rank=40)  # by default conv1 (fan-in 9) and fc2 (the classifier) are not tried


def test_plan_skips_what_cannot_or_need_not_be_factorised():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 64, 3), nn.Flatten(), nn.Linear(64, 64))
    chosen, skipped = plan(model, rank=6, include=["*"])
    assert set(chosen) == {"1", "3"}
    assert skipped["0"] == "grouped or depthwise convolution"
    chosen, skipped = plan(model, rank=40, include=["3"])
    assert skipped["3"] == "no saving at rank (40,) (5184 >= 4160 parameters)" and not chosen
    chosen, _ = plan(model, rank=7, conv_method="tucker2", include=["1"])
    assert chosen["1"][1].ranks == (7, 7) and chosen["1"][1].params_after == 8 * 7 + 7 * 7 * 9 + 7 * 64 + 64
    with pytest.raises(CompressionConfigError, match="`include` must be patterns that match Conv/Linear module names"):
        plan(model, rank=2, include=["9"])
    with pytest.raises(CompressionConfigError, match="no Linear/Conv2d layer of Sequential selected to factorise"):
        plan(model, rank=2, exclude=["*"])


def test_rebuild_recreates_factorised_layers_from_a_state_dict():
    torch.manual_seed(0)
    model = TinyNet()
    chosen, _ = plan(model, ratio=0.5, conv_method="tucker2", include=["conv1", "conv2", "fc1"])
    swap_modules(model, {name: new for name, (new, _) in chosen.items()})
    state = model.state_dict()
    fresh = TinyNet()
    rebuilt = rebuild(fresh, state)
    assert set(rebuilt) == set(chosen)
    assert {name: describe(new) for name, (_, new) in rebuilt.items()} == {name: f for name, (_, f) in chosen.items()}
    fresh.load_state_dict(state)  # strict: every key and shape matches
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(CompressionConfigError, match="no Linear/Conv2d layer of TinyNet selected"):
        plan(model, ratio=0.5, exclude=["fc2"])  # factorised layers are not factorised again


class Frozen(nn.Module):
    """A user model: an RGB stem, a frozen layer, a weight-tied pair, attention, a 4-class classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 64, 3, padding=1)
        self.frozen = nn.Linear(64, 64).requires_grad_(False)
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)
        self.b.weight = self.a.weight  # tied
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = nn.Linear(64, 4)


def test_defaults_never_wreck_a_model():
    # Regressions: ratio=0.5 factorised a 4-class classifier to rank 1 and a 3-channel stem, made frozen
    # layers trainable, untied tied weights, and replaced attention's out_proj (which it reads as a weight).
    model = Frozen()
    chosen, skipped = plan(model, ratio=0.5)
    assert set(chosen) == {"conv"}
    assert "classifier" in skipped["head"] and "fan-in 27 < 32" in skipped["stem"]
    assert "frozen" in skipped["frozen"] and "shared with ['b']" in skipped["a"] and "shared with ['a']" in skipped["b"]
    assert "MultiheadAttention reads its weight" in skipped["attn.out_proj"]
    assert rank_for(nn.Linear(16, 4), ratio=0.5) == (4,)  # the floor, not rank 1 (which would save parameters)
    named, _ = plan(model, ratio=0.5, include=["head", "stem"])  # named layers are factorised, never below rank 4
    assert "head" not in named and named["stem"][1].ranks == (7,)  # the head's floor rank (4) saves nothing


def test_per_layer_ranks_override_the_rule_and_the_default_skips():
    net = TinyNet()
    chosen, skipped = plan(net, ratio=0.5, ranks={"fc2": 2, "conv*": 3})
    assert chosen["fc2"][1].ranks == (2,) and chosen["conv1"][1].ranks == (3,) and chosen["conv2"][1].ranks == (3,)
    assert "fc2" not in skipped and "conv1" not in skipped  # the classifier and the small fan-in, named
    assert chosen["fc1"][1].ranks == rank_for(net.fc1, ratio=0.5)  # the rule for the rest
    assert list(chosen) == ["conv1", "conv2", "fc1", "fc2"]  # in the model's order


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ({"fc9": 2}, r"`ranks\['fc9'\]` must be a name or pattern of a selected layer.*did you mean"),
        ({"fc2": 4}, r"`ranks\['fc2'\]`: the rank must be < 4 for Linear \(4, 16\), got 4"),
        ({"fc2": 0}, r"`ranks\['fc2'\]` must be an integer >= 1, got 0"),
        ({"fc1": 15}, r"`ranks\['fc1'\]` must be a rank that saves parameters \(2176 >= 2064 at 15\)"),
    ],
)
def test_per_layer_rank_errors_name_the_layer(ranks, message):
    with pytest.raises(CompressionConfigError, match=message):
        plan(TinyNet(), ratio=0.5, ranks=ranks)


def test_a_named_layer_that_cannot_be_factorised_is_an_error_not_a_skip():
    from lightning_compress.core.low_rank import check_ranks

    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 64, 3), nn.Flatten(), nn.Linear(64, 64))
    with pytest.raises(CompressionConfigError, match=r"`ranks\['0'\]`: '0' cannot be factorised: grouped or dep"):
        plan(model, ratio=0.5, ranks={"0": 2})
    model[3].weight.requires_grad_(False)
    with pytest.raises(CompressionConfigError, match=r"`ranks\['3'\]`: '3' cannot be factorised: frozen"):
        check_ranks(model, {"3": 8})
    with pytest.raises(CompressionConfigError, match=r"`ranks\['1'\]` must be < 64 for '1' \(64, 8, 3, 3\), got 64"):
        check_ranks(model, {"1": 64})
