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
