"""Cross-layer equalisation (Nagel et al. 2019): the paper's scale on hand-checked pairs, the function unchanged."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.core import graph
from lightning_compress.core.equalization import TOLERANCE, equalization_pairs, equalize
from lightning_compress.core.layers import bn_fold_factor


def _randomise(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.2, 3.0)
            module.bias.data.normal_(0, 0.2)
    return model.eval()


def _chain(activation: nn.Module, second: nn.Module | None = None) -> nn.Sequential:
    with torch.no_grad():
        first = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        first.weight.mul_(torch.tensor([0.1, 1.0, 5.0, 20.0]).reshape(4, 1, 1, 1))  # very unequal channels
    return _randomise(nn.Sequential(first, nn.BatchNorm2d(4), activation, second or nn.Conv2d(4, 3, 3, padding=1)))


def _ranges(model: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    folded = model[0].weight * bn_fold_factor(model[1]).reshape(-1, 1, 1, 1)
    second = model[3].weight
    columns = second.abs().amax((0, 2, 3)) if second.shape[1] > 1 else second.abs().flatten(1).amax(1)
    return folded.abs().flatten(1).amax(1), columns


def test_the_scale_is_the_papers_and_the_function_is_unchanged():
    model = _chain(nn.ReLU())
    x = torch.randn(8, 2, 6, 6)
    reference = model(x)
    r1, r2 = (r.detach().clone() for r in _ranges(model))
    done = equalize(model, [x], iterations=1)
    assert done.pairs == [("0", "3")] and not done.skipped and not done.clipped
    after1, after2 = _ranges(model)
    # s_i = sqrt(r1_i r2_i): both layers' channel i ranges end equal to the geometric mean
    torch.testing.assert_close(after1, (r1 * r2).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(after2, (r1 * r2).sqrt(), rtol=1e-5, atol=0)
    assert after1.max() / after1.min() < r1.max() / r1.min()  # the first layer's channels closer together
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)
    assert done.max_change <= TOLERANCE


def test_into_a_depthwise_convolution_each_channel_scales_its_own_filter():
    model = _chain(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4))
    x = torch.randn(8, 2, 6, 6)
    reference = model(x)
    r1, r2 = (r.detach().clone() for r in _ranges(model))
    equalize(model, [x], iterations=1)
    after1, after2 = _ranges(model)
    torch.testing.assert_close(after1, (r1 * r2).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(after2, (r1 * r2).sqrt(), rtol=1e-5, atol=0)
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


def test_relu6_keeps_clipping_channels_and_bounds_the_others():
    model = _chain(nn.ReLU6())
    x = torch.randn(16, 2, 6, 6)
    before_clip = model[1](model[0](x))
    peaks = before_clip.transpose(0, 1).reshape(4, -1).amax(1)
    assert bool((peaks >= 6).any()) and bool((peaks < 6).any())  # both kinds of channel
    reference = model(x)
    gamma = model[1].weight.detach().clone()
    done = equalize(model, [x], iterations=1)
    assert done.clipped == [("0", "3")]
    scale = model[1].weight.detach() / gamma
    reaching = peaks >= 6
    torch.testing.assert_close(scale[reaching], torch.ones_like(scale[reaching]))
    assert bool((scale[~reaching] * peaks[~reaching] <= 6 + 1e-4).all())  # never pushed into the clip
    torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5)


class Residual(nn.Module):
    """conv -> relu -> conv, whose first activation is also added to the output by the block's own code."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.mul_(torch.tensor([0.1, 1.0, 5.0, 20.0]).reshape(4, 1, 1, 1))

    def forward(self, x):
        h = self.relu(self.conv1(x))
        return self.conv2(h) + h


def test_a_tensor_also_used_by_the_blocks_own_code_is_no_pair():
    model = Residual().eval()
    x = torch.randn(4, 4, 6, 6)
    reference = model(x)
    weights = model.conv1.weight.detach().clone()
    assert graph.analyze(model, x).chains == {}  # the analysis sees `+ h` consume the activation: a branch
    done = equalize(model, [x])
    assert done.pairs == [] and done.skipped == {}
    assert torch.equal(model.conv1.weight, weights)
    torch.testing.assert_close(model(x), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("between", "why"),
    [(nn.SiLU(), None), (nn.GELU(), None), (nn.Hardtanh(-1.0, 1.0), "act clips below at -1.0")],
)
def test_a_non_homogeneous_activation_is_no_pair(between, why):
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(2, 4, 3))
    model.add_module("act", between)
    model.add_module("out", nn.Conv2d(4, 3, 3))
    pairs, skipped = equalization_pairs(model.eval(), torch.randn(2, 2, 8, 8))
    assert pairs == [] and skipped.get("conv -> out") == why  # SiLU / GELU end the chain: not even a candidate


def test_a_functional_activation_ends_the_chain():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 4, 3), nn.Conv2d(4, 3, 3)

        def forward(self, x):
            return self.b(F.gelu(self.a(x)))

    pairs, skipped = equalization_pairs(Functional().eval(), torch.randn(2, 2, 8, 8))
    assert pairs == [] and skipped == {}  # the hooks never see the two layers connected: nothing to scale


def test_mobilenet_v2_equalises_its_inverted_residuals_exactly():
    from torchvision.models import mobilenet_v2

    model = _randomise(mobilenet_v2(num_classes=10))
    x = torch.randn(8, 3, 32, 32)
    reference = model(x).detach()
    done = equalize(model, [x], iterations=1)
    assert len(done.pairs) >= 30 and len(done.clipped) >= 30  # expand -> depthwise -> project, across ReLU6
    assert all("used elsewhere" in why for why in done.skipped.values())  # the residual adds
    torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
