import pytest
import torch

from lightning_compress.errors import CompressionConfigError
from lightning_compress.vision.models import MODELS, build_model, cached_weights_file
from lightning_compress.vision.module import ClassificationModule


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


def test_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(
        CompressionConfigError,
        match=r"resnet18 ResNet18_Weights.IMAGENET1K_V1 is not in the local torch cache: "
        r"expected '.*checkpoints/resnet18-f37072fd.pth'. Nothing is downloaded",
    ):
        build_model("resnet18", num_classes=10, in_channels=3, weights="DEFAULT")
    with pytest.raises(
        CompressionConfigError, match=r"`model.weights` must be one of 'DEFAULT', 'IMAGENET1K_V1', got 'IMAGENET'. HINT"
    ):
        build_model("resnet18", weights="IMAGENET")
    # a cache holding "the" weights (random here: the file name is what torchvision looks for)
    torch.manual_seed(0)
    trained = torchvision.models.resnet18(num_classes=1000)
    _, file = cached_weights_file("resnet18", "IMAGENET1K_V1")
    file.parent.mkdir(parents=True)
    torch.save(trained.state_dict(), file)
    model = build_model("resnet18", num_classes=10, in_channels=1, weights="IMAGENET1K_V1")
    assert torch.equal(model.layer4[1].conv2.weight, trained.layer4[1].conv2.weight)  # loaded
    assert model.fc.out_features == 10  # a new head for 10 classes
    assert torch.allclose(model.conv1.weight, trained.conv1.weight.sum(1, keepdim=True), atol=1e-6)  # grey stem
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(CompressionConfigError, match=r"model.weights: cannot read"):
        build_model("resnet18", weights="DEFAULT")
    with pytest.raises(
        CompressionConfigError, match=r"`weights` is only for the torchvision models \(resnet18, .*\), not 'cnn_small'"
    ):
        ClassificationModule("cnn_small", weights="DEFAULT")
