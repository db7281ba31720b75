import pytest
import torch
from torch import nn

from lightning_compress.core import quantization as q
from lightning_compress.core.layers import LAYER_TYPES, is_internal, select_layers, weight_of
from lightning_compress.errors import CompressionConfigError
from tests.helpers import TinyNet


def test_one_type_list_selects_by_name_for_every_technique():
    net = TinyNet(bn=True)
    assert list(select_layers(net)) == ["conv1", "conv2", "fc1", "fc2"]
    assert list(select_layers(net, include=["fc*"], exclude=["fc2"])) == ["fc1"]
    assert all(isinstance(m, LAYER_TYPES) for m in select_layers(net).values())
    with pytest.raises(CompressionConfigError, match="did you mean 'conv1'"):
        select_layers(net, include=["conv_1"])


def test_weight_of_is_the_stored_weight_also_under_fake_quantisation():
    net = TinyNet()
    stored = net.fc1.weight
    q.attach(net)
    q.enable(net)
    assert weight_of(net.fc1) is not net.fc1.weight and torch.equal(weight_of(net.fc1), stored)
    quantisers = [(n, m) for n, m in net.named_modules() if is_internal(n, m)]
    assert quantisers and all(not isinstance(m, (*LAYER_TYPES, nn.BatchNorm2d)) for _, m in quantisers)


OLD_PATHS = [
    ("pruning", "prune"), ("quantization", "attach"), ("surgery", "replace_modules"), ("export", "export_onnx"),
]  # fmt: skip


@pytest.mark.parametrize(("old", "name"), OLD_PATHS)
def test_old_module_paths_still_import_with_a_deprecation_warning(old, name):
    import importlib
    import sys

    sys.modules.pop(f"lightning_compress.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"lightning_compress.{old} moved"):
        module = importlib.import_module(f"lightning_compress.{old}")
    assert callable(getattr(module, name))


LAYERS = ["net.conv1", "net.conv2", "net.fc1", "net.fc2"]


def test_per_layer_resolves_names_and_patterns():
    from lightning_compress.core.layers import per_layer

    assert per_layer("ranks", {"net.fc1": 4, "net.conv*": 2}, LAYERS) == {"net.fc1": 4, "net.conv1": 2, "net.conv2": 2}
    assert per_layer("ranks", {"net.fc*": 3, "net.fc2": 3}, LAYERS) == {"net.fc1": 3, "net.fc2": 3}  # agreeing


def test_per_layer_names_an_unknown_key_the_nearest_layer_and_the_choices():
    from lightning_compress.core.layers import per_layer

    with pytest.raises(CompressionConfigError, match=r"`layer_sparsity\['net.fc3'\]` must be .*did you mean 'net.fc"):
        per_layer("layer_sparsity", {"net.fc3": 0.5}, LAYERS)
    with pytest.raises(CompressionConfigError, match=r"the layers it may name are \['net.conv1'"):
        per_layer("layer_sparsity", {"head.*": 0.5}, LAYERS)
    assert per_layer("layer_sparsity", {"head.*": 0.5}, LAYERS, strict=False) == {}


def test_per_layer_refuses_two_values_for_one_layer():
    from lightning_compress.core.layers import per_layer

    with pytest.raises(CompressionConfigError, match=r"gives layer 'net.fc2' two values: 8 by 'net.fc\*' and 4 by"):
        per_layer("layer_bits", {"net.fc*": 8, "net.fc2": 4}, LAYERS)
