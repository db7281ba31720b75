"""Models: a small CNN family for the embedded data and a torchvision factory.

Every model takes ``num_classes`` and ``in_channels`` and works at any input size from 8x8 up
(global pooling before the classifier). torchvision models start from random weights or from
pretrained weights already in the local torch cache; nothing is downloaded.

Example::

    >>> model = build_model("cnn_small", num_classes=10, in_channels=1)
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of


def _block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return layers


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks (each max-pooled by 2), pooling to ``pooled`` x ``pooled``, a two-layer classifier.

    With three blocks a 28x28 image reaches 4x4, so the pooling to 4 (or 2) is exact and exports to
    ONNX as a plain ``AveragePool`` (other sizes use adaptive pooling).

    Args:
        channels: output channels of each conv block.
        hidden: width of the hidden classifier layer.
        pooled: spatial size before the classifier.
        num_classes: classifier outputs.
        in_channels: input image channels.
    """

    def __init__(
        self, channels: Sequence[int], hidden: int, pooled: int = 4, num_classes: int = 10, in_channels: int = 1
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in channels:
            layers += _block(cin, cout, pool=True)
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pooled = pooled
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(cin * pooled * pooled, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        h, w = x.shape[-2:]
        p = self.pooled
        if (h, w) != (p, p):
            exact = h % p == 0 and w % p == 0
            x = F.avg_pool2d(x, (h // p, w // p)) if exact else F.adaptive_avg_pool2d(x, p)
        return self.classifier(x)


def cnn_tiny(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """About 12k parameters: 8, 16 and 16 channels, a 32-unit classifier."""
    return SmallCNN((8, 16, 16), hidden=32, pooled=4, num_classes=num_classes, in_channels=in_channels)


def cnn_small(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """About 155k parameters: 16, 32 and 64 channels, a 128-unit classifier."""
    return SmallCNN((16, 32, 64), hidden=128, pooled=4, num_classes=num_classes, in_channels=in_channels)


def cnn_wide(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """About 635k parameters: 64, 128 and 256 channels, a 256-unit classifier."""
    return SmallCNN((64, 128, 256), hidden=256, pooled=2, num_classes=num_classes, in_channels=in_channels)


def _adapt_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first Conv2d so it takes ``in_channels`` (same kernel, stride, padding).

    Trained filters are carried over: summed over colour for one input channel, their colour mean
    repeated (and rescaled) otherwise, so a pretrained network still sees edges.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    conv: Any = child  # torchvision's convs hold tuples where Conv2d's stubs want pairs
                    new = nn.Conv2d(
                        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None,
                    )  # fmt: skip
                    with torch.no_grad():
                        mean = child.weight.mean(1, keepdim=True)
                        new.weight.copy_(mean * child.in_channels / in_channels)
                        if child.bias is not None and new.bias is not None:
                            new.bias.copy_(child.bias)
                    setattr(parent, child_name, new)
                return model
    return model


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """A fresh last ``nn.Linear`` with ``num_classes`` outputs (fine-tuning pretrained weights)."""
    parent_name, _, child_name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1].rpartition(".")
    head = model.get_submodule(parent_name).get_submodule(child_name)
    if isinstance(head, nn.Linear) and head.out_features != num_classes:
        setattr(model.get_submodule(parent_name), child_name, nn.Linear(head.in_features, num_classes))


def cached_weights_file(name: str, weights: str) -> tuple[Any, Path]:
    """torchvision's weights enum member for ``name`` and the file it would be read from in the local cache.

    Raises:
        CompressionConfigError: ``weights`` is not one of the model's weights.
    """
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    choices = list(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is a member alias
    if weights not in choices:
        raise config_error("model.weights", one_of(choices), weights, did_you_mean(str(weights), choices))
    member = enum[weights]
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlparse(member.url).path).name
    return member, file


def load_cached_weights(name: str, weights: str) -> tuple[dict[str, torch.Tensor], int]:
    """The state dict of torchvision's pretrained ``weights`` for ``name``, from the local cache only.

    Returns the state dict and its number of classes.

    Raises:
        CompressionConfigError: the file is not in the cache (nothing is downloaded) or cannot be read.
    """
    member, file = cached_weights_file(name, weights)
    if not file.is_file():
        raise CompressionConfigError(
            f"model.weights: {name} {member} is not in the local torch cache: expected {str(file)!r}. "
            f"Nothing is downloaded: copy the file there (torchvision fetches it from {member.url}), set "
            "TORCH_HOME to the cache that holds it, or drop `weights:` to start from random weights."
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise CompressionConfigError(f"model.weights: cannot read {str(file)!r}: {err}") from None
    return state, len(member.meta["categories"])


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 10, in_channels: int = 3, weights: str | None = None) -> nn.Module:
        import torchvision

        if weights is None:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        else:  # pretrained: load the cached file into the original architecture, then adapt head and stem
            state, classes = load_cached_weights(name, weights)
            model = torchvision.models.get_model(name, weights=None, num_classes=classes)
            try:
                model.load_state_dict(state)
            except RuntimeError as err:
                raise CompressionConfigError(f"model.weights: the cached file does not fit {name}: {err}") from None
            _replace_head(model, num_classes)
        return _adapt_first_conv(model, in_channels)

    factory.__doc__ = (
        f"torchvision's ``{name}`` with ``num_classes`` and ``in_channels``; ``weights`` (e.g. ``DEFAULT``) are "
        "read from the local torch cache only, with a new classifier head when ``num_classes`` differs."
    )
    return factory


def torchvision_model(name: str, num_classes: int = 10, size: int = 224) -> nn.Module:
    """Any torchvision classification model by name (``torchvision.models.list_models``), random weights
    (nothing is downloaded), built for ``size``-pixel inputs: without GoogLeNet's / Inception's auxiliary
    heads, and with ViT's and MaxViT's input size set."""
    import torchvision

    extra: dict[str, Any] = {}
    if name in ("googlenet", "inception_v3"):
        extra = {"aux_logits": False, "init_weights": True}
    elif name.startswith("vit_"):
        extra = {"image_size": size}
    elif name.startswith("maxvit_"):
        extra = {"input_size": (size, size)}
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)


TORCHVISION_MODELS = ("resnet18", "resnet34", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5")

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn_tiny": cnn_tiny,
    "cnn_small": cnn_small,
    "cnn_wide": cnn_wide,
    **{name: _torchvision(name) for name in TORCHVISION_MODELS},
}


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Raises:
        CompressionConfigError: an unknown name; the message lists the known ones.
    """
    if name not in MODELS:
        raise config_error("model", one_of(MODELS), name, did_you_mean(name, MODELS))
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
