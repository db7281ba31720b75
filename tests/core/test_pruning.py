import math

import pytest
import torch
from torch import nn

from lightning_compress.core import pruning as core
from lightning_compress.core.pruning import (
    MIN_KEPT_SHARE,
    Pattern,
    apply_masks,
    attach_masks,
    compute_masks,
    fold_masks,
    lamp_scores,
    layer_sparsity,
    masked_modules,
    prune,
    select_layers,
    set_masks,
    sparsity,
)
from lightning_compress.errors import CompressionConfigError
from tests.helpers import TinyNet


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet()


def test_select_layers_defaults_to_every_conv_and_linear(net):
    assert list(select_layers(net)) == ["conv1", "conv2", "fc1", "fc2"]
    assert list(select_layers(net, include=["conv*"])) == ["conv1", "conv2"]
    assert list(select_layers(net, exclude=["fc2"])) == ["conv1", "conv2", "fc1"]


def test_include_that_matches_nothing_names_the_nearest_layer(net):
    with pytest.raises(CompressionConfigError, match=r"`include` must be .* got 'fc3'. HINT: did you mean 'fc2'"):
        select_layers(net, include=["fc3"])


@pytest.mark.parametrize("target", [0.0, 0.3, 0.9, 0.99])
def test_global_unstructured_prunes_exactly_the_target(net, target):
    prune(net, target)
    layers = select_layers(net)
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    assert zeros == round(target * total)


def test_global_threshold_is_shared_across_layers(net):
    weights = {n: m.weight.detach().clone() for n, m in select_layers(net).items()}
    masks = compute_masks(weights, 0.5)
    kept_min = min(float(w[m].abs().min()) for w, m in zip(weights.values(), masks.values(), strict=True))
    pruned_max = max(float(w[~m].abs().max()) for w, m in zip(weights.values(), masks.values(), strict=True))
    assert pruned_max <= kept_min


def test_layer_scope_prunes_every_layer_to_the_target(net):
    prune(net, 0.5, scope="layer")
    for value in layer_sparsity(select_layers(net)).values():
        assert value == pytest.approx(0.5, abs=0.01)


def test_nm_keeps_n_of_every_m_along_the_input_dimension(net):
    prune(net, 0.5, pattern="2:4", include=["conv2", "fc1", "fc2"])
    conv = net.conv2.weight  # (out, in, kh, kw): groups along `in`
    groups = conv.permute(0, 2, 3, 1).reshape(-1, 4)
    assert ((groups != 0).sum(1) <= 2).all() and (groups != 0).sum() == groups.numel() // 2
    linear = net.fc1.weight.reshape(-1, 4)
    assert ((linear != 0).sum(1) == 2).all()


def test_nm_target_below_its_ratio_prunes_fewer_per_group():
    weights = {"w": torch.randn(8, 16)}
    mask = compute_masks(weights, 0.25, "2:4")["w"].reshape(-1, 4)
    assert (mask.sum(1) == 3).all()


def test_nm_on_an_incompatible_layer_names_it(net):
    with pytest.raises(CompressionConfigError, match=r"module 'conv1' cannot take pattern '2:4'.*exclude=\['conv1'\]"):
        prune(net, 0.5, pattern="2:4")


def test_channel_pattern_removes_whole_output_channels_by_norm(net):
    torch.manual_seed(1)
    with torch.no_grad():
        net.conv2.weight[3].mul_(0.01)  # the weakest filter goes first
    prune(net, 0.25, pattern="channel", scope="layer", include=["conv2"])
    zero_channels = (net.conv2.weight.flatten(1) == 0).all(1)
    assert int(zero_channels.sum()) == 2 and bool(zero_channels[3])
    assert (net.conv2.bias[zero_channels] == 0).all()
    assert net.conv2.weight_mask.shape == net.conv2.weight.shape


def test_global_channel_pruning_never_empties_a_layer():
    weights = {"big": torch.ones(4, 3), "small": torch.full((4, 3), 1e-3)}
    masks = compute_masks(weights, 0.5, "channel", scope="global", norm="l2")
    # relative scores: a layer of small weights is not emptied because its weights are small
    assert sum(int(m.sum()) for m in masks.values()) == 4 and all(int(m.sum()) >= 1 for m in masks.values())


def test_global_channel_allocation_keeps_every_resnet18_layer_alive():
    # Regression: global channel pruning at 0.5 left resnet18's layer-4 convs 1-8 of 512 channels
    # (their per-weight magnitudes are smaller: larger fan-in); now every layer keeps >= 25%.
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    convs = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    masks = compute_masks(convs, 0.5, "channel", scope="global")
    kept = {name: float(mask.float().mean()) for name, mask in masks.items()}
    assert min(kept.values()) >= 0.25 and kept["layer4.1.conv2"] >= 0.25
    pruned = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert pruned == pytest.approx(0.5, abs=1e-3)


def test_masks_are_buffers_in_the_state_dict(net):
    prune(net, 0.5)
    keys = net.state_dict().keys()
    assert {"conv1.weight_mask", "fc2.weight_mask"} <= set(keys)
    assert net.conv1.weight_mask.dtype == torch.bool
    assert not list(net.conv1._forward_pre_hooks.values()) and not list(net.conv1._forward_hooks.values())


def test_apply_masks_zeros_weights_again_after_an_update(net):
    prune(net, 0.7)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    apply_masks(masked_modules(net).values())
    assert sparsity(select_layers(net)) == pytest.approx(0.7, abs=1e-3)


def test_state_dict_without_masks_loads_as_nothing_pruned(net):
    dense_state = TinyNet().state_dict()
    attach_masks(select_layers(net))
    net.load_state_dict(dense_state)
    assert all(bool(m.weight_mask.all()) for m in masked_modules(net).values())


def test_fold_gives_a_plain_state_dict_of_the_original_class(net):
    prune(net, 0.8)
    fold_masks(net)
    assert masked_modules(net) == {}
    fresh = TinyNet()
    fresh.load_state_dict(net.state_dict())  # strict: no leftover mask keys
    assert sparsity(select_layers(fresh)) == pytest.approx(0.8, abs=1e-3)


def test_set_masks_then_compute_again_is_monotonic(net):
    layers = select_layers(net)
    attach_masks(layers)
    previous = None
    for target in (0.2, 0.5, 0.8):
        masks = compute_masks({n: m.weight for n, m in layers.items()}, target)
        set_masks(layers, masks)
        apply_masks(layers.values())
        if previous is not None:
            for name in masks:
                assert not (masks[name] & ~previous[name]).any()  # nothing pruned comes back
        previous = masks


@pytest.mark.parametrize(
    ("text", "expected"),
    [("unstructured", Pattern("unstructured")), ("channel", Pattern("channel")), ("2:4", Pattern("n:m", 2, 4))],
)
def test_pattern_parse(text, expected):
    assert Pattern.parse(text) == expected


@pytest.mark.parametrize("text", ["4:2", "0:4", "2-4", "structured", "a:b"])
def test_pattern_parse_refuses(text):
    with pytest.raises(CompressionConfigError, match="`pattern` must be 'unstructured', 'channel' or 'N:M'"):
        Pattern.parse(text)


def test_compute_masks_argument_errors():
    w = {"w": torch.randn(4, 4)}
    with pytest.raises(CompressionConfigError, match=r"`target` must be in \[0, 1\), got 1.0"):
        compute_masks(w, 1.0)
    with pytest.raises(CompressionConfigError, match="`scope` must be one of 'global', 'layer', 'lamp', got 'glob'"):
        compute_masks(w, 0.5, scope="glob")
    with pytest.raises(CompressionConfigError, match="`norm` must be one of 'l1', 'l2', got 'l3'"):
        compute_masks(w, 0.5, "channel", norm="l3")


def test_lamp_scores_are_the_papers_formula_on_a_hand_checked_layer():
    # sorted |w|: 1, 2, 3 -> squares 1, 4, 9; each over the sum of itself and the larger ones: 1/14, 4/13, 9/9
    scores = lamp_scores(torch.tensor([[3.0, -1.0], [2.0, 0.0]]))
    expected = torch.tensor([[1.0, 1 / 14], [4 / 13, 0.0]])
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(lamp_scores(torch.tensor([1.0, 1.0])), torch.tensor([0.5, 1.0]))  # ties: index order
    torch.testing.assert_close(lamp_scores(torch.zeros(3)), torch.zeros(3))  # an emptied layer: no NaN


def test_lamp_compares_layers_by_shape_not_by_scale():
    # the same weights at a tenth of the scale: one magnitude threshold prunes the small layer down to its
    # floor, LAMP (scale-invariant per layer) prunes both alike
    weights = {"big": torch.tensor([4.0, 3.0, 2.0, 1.0]), "small": torch.tensor([0.4, 0.3, 0.2, 0.1])}
    magnitude = compute_masks(weights, 0.5)
    assert magnitude["big"].tolist() == [True, True, True, False]
    assert magnitude["small"].tolist() == [True, False, False, False]
    lamp = compute_masks(weights, 0.5, scope="lamp")
    assert lamp["big"].tolist() == lamp["small"].tolist() == [True, True, False, False]


def test_lamp_prunes_exactly_the_target_and_is_for_unstructured_only(net):
    prune(net, 0.9, scope="lamp")
    layers = select_layers(net)
    total = sum(m.weight.numel() for m in layers.values())
    assert sum(int((m.weight == 0).sum()) for m in layers.values()) == round(0.9 * total)
    message = r"`scope` must be 'global' or 'layer' with pattern 'channel' .*pattern 'unstructured'\), got 'lamp'"
    with pytest.raises(CompressionConfigError, match=message):
        compute_masks({"w": torch.randn(4, 4)}, 0.5, "channel", scope="lamp")


def test_prune_with_nothing_selected():
    with pytest.raises(CompressionConfigError, match="no Conv/Linear layer selected"):
        prune(nn.Sequential(nn.ReLU()), 0.5)


def test_global_unstructured_pruning_never_empties_a_small_magnitude_layer():
    # Regression: a classifier initialised near zero (torchvision's ViT head) was pruned away whole at 50%,
    # and the model's output no longer depended on its input.
    g = torch.Generator().manual_seed(0)
    weights = {"body": torch.randn(64, 64, generator=g), "head": 1e-3 * torch.randn(4, 32, generator=g)}
    masks = compute_masks(weights, 0.5)
    assert int(masks["head"].sum()) == math.ceil(128 * 0.5 * MIN_KEPT_SHARE)  # the floor, no more
    assert sum(int(m.sum()) for m in masks.values()) == (64 * 64 + 128) // 2  # the target still holds
    kept = weights["body"][masks["body"]].abs()
    assert kept.min() >= weights["body"][~masks["body"]].abs().max()  # the rest by one threshold


def test_channel_segments_keep_the_same_number_in_every_group():
    # Regression (#14): ResNeXt / RegNet channels feeding a grouped conv were pruned unevenly across its
    # groups, so they could not be removed.
    torch.manual_seed(0)
    weight = torch.randn(16, 4) * torch.linspace(0.1, 2.0, 16)[:, None]  # the strongest all in the second half
    masks = compute_masks({"a": weight}, 0.5, "channel", "layer", segments={"a": [0] * 8 + [1] * 8})
    assert masks["a"][:8].sum() == masks["a"][8:].sum() == 4
    uneven = compute_masks({"a": weight}, 0.5, "channel", "layer")["a"]
    assert uneven[:8].sum() != uneven[8:].sum()
    kept = masks["a"][:8].nonzero().flatten()  # the strongest of each group
    assert torch.equal(kept, weight[:8].abs().sum(1).topk(4).indices.sort().values)


def test_layer_targets_prune_named_layers_to_their_own_sparsity_and_the_rest_to_the_target(net):
    weights = {name: m.weight for name, m in select_layers(net).items()}
    masks = compute_masks(weights, 0.5, layer_targets={"fc1": 0.9, "conv1": 0.0})
    pruned = {name: 1 - float(mask.float().mean()) for name, mask in masks.items()}
    assert pruned["fc1"] == pytest.approx(0.9, abs=1 / weights["fc1"].numel())
    assert pruned["conv1"] == 0.0
    rest = [name for name in weights if name not in ("fc1", "conv1")]
    kept = sum(int(masks[n].sum()) for n in rest)
    assert kept == sum(weights[n].numel() for n in rest) - round(0.5 * sum(weights[n].numel() for n in rest))
    channels = compute_masks(weights, 0.5, "channel", layer_targets={"conv2": 0.25})
    assert int(channels["conv2"].sum()) == 6  # 8 channels, a quarter pruned


def test_coupled_layers_must_share_their_layer_target():
    weights = {"a": torch.randn(8, 4), "b": torch.randn(8, 4), "c": torch.randn(8, 4)}
    masks = compute_masks(weights, 0.5, "channel", couplings=[["a", "b"]], layer_targets={"a": 0.25, "b": 0.25})
    assert torch.equal(masks["a"], masks["b"]) and int(masks["a"].sum()) == 6
    with pytest.raises(CompressionConfigError, match=r"layers \['a', 'b'\] share one channel mask .* \{'a': 0.25, 'b'"):
        compute_masks(weights, 0.5, "channel", couplings=[["a", "b"]], layer_targets={"a": 0.25})


def test_layer_targets_out_of_range_are_named():
    with pytest.raises(CompressionConfigError, match=r"`layer_targets\['a'\]` must be in \[0, 1\), got 1.5"):
        compute_masks({"a": torch.randn(4, 4)}, 0.5, layer_targets={"a": 1.5})


def test_one_shot_prune_takes_per_layer_sparsities_by_pattern(net):
    prune(net, 0.5, layer_sparsity={"fc*": 0.8})
    assert layer_sparsity({"fc1": net.fc1, "fc2": net.fc2}) == pytest.approx({"fc1": 0.8, "fc2": 0.8}, abs=0.02)
    with pytest.raises(CompressionConfigError, match=r"`layer_sparsity\['fc3'\]`.*did you mean"):
        prune(TinyNet(), 0.5, layer_sparsity={"fc3": 0.8})


def test_mask_pairs_hold_only_masks_that_prune_in_the_weights_dtype(net):
    from lightning_compress.core.pruning import mask_pairs

    modules = select_layers(net)
    attach_masks(modules)
    assert mask_pairs(modules.values()) == ([], [])  # nothing pruned yet: nothing to multiply after a step
    net.fc1.weight_mask[0, :5] = False
    tensors, masks = mask_pairs(modules.values())
    assert len(tensors) == 1 and tensors[0] is net.fc1.weight and masks[0].dtype == net.fc1.weight.dtype
    apply_masks((tensors, masks))
    assert int((net.fc1.weight[0, :5] == 0).sum()) == 5 and int((net.fc1.weight == 0).sum()) == 5


@pytest.mark.parametrize("kind", ["normal", "half zeros", "with -inf", "all equal"])
def test_large_selections_keep_exactly_what_topk_keeps(kind):
    # above LARGE_SELECTION, _keep_top brackets the threshold from a sample before topk: same kept values
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(600_000, generator=generator)
    if kind == "half zeros":
        scores = scores.abs()
        scores[::2] = 0.0
    elif kind == "with -inf":
        scores[::5] = -math.inf
    elif kind == "all equal":
        scores = torch.ones(600_000)
    for keep in (20_000, 300_000, 299_999, 599_999):
        mask = core._keep_top(scores, keep)
        expected = scores.topk(keep, sorted=False).values
        assert int(mask.sum()) == keep
        assert torch.equal(scores[mask].sort().values, expected.sort().values)


def test_a_missed_bracket_falls_back_to_topk():
    # the strided sample sees only every 9th score: make those the largest, so its quantiles miss the threshold
    scores = torch.rand(600_000, generator=torch.Generator().manual_seed(0))
    scores[::9] = 1000 + torch.arange(len(scores[::9]), dtype=torch.float32)
    assert core._bracketed_keep_top(scores, 300_000) is None
    mask = core._keep_top(scores, 300_000)
    assert int(mask.sum()) == 300_000
    assert torch.equal(scores[mask].sort().values, scores.topk(300_000).values.sort().values)
