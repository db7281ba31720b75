import pytest
import torch

from lightning_compress.errors import CompressionConfigError
from lightning_compress.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("in_channels", "size"), [(1, 28), (3, 32)])
def test_every_model_takes_classes_channels_and_small_inputs(name, in_channels, size):
    model = build_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, in_channels, size, size)).shape == (2, 7)


def test_small_cnns_work_on_8x8_digits():
    for name in ("cnn_tiny", "cnn_small", "cnn_wide"):
        assert build_model(name)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(
        CompressionConfigError, match=r"`model` must be one of .*'cnn_small'.*HINT: did you mean 'resnet18'"
    ):
        build_model("resnet81")
