import pytest
import torch

from lightning_compress.errors import CompressionConfigError
from lightning_compress.vision.module import ClassificationModule
from tests.helpers import TinyNet, loaders, trainer


@pytest.mark.parametrize(("optimizer", "lr"), [("adam", 0.01), ("adamw", 0.01), ("sgd", 0.05)])
def test_trains_and_reports_accuracy(optimizer, lr):
    torch.manual_seed(0)
    module = ClassificationModule(TinyNet(), num_classes=4, lr=lr, optimizer=optimizer, cosine=True)
    train, val = loaders()
    t = trainer(max_epochs=3)
    t.fit(module, train, val)
    accuracy = t.validate(module, val, verbose=False)[0]["val/acc"]
    assert accuracy > 0.5


def test_builds_a_model_by_name_and_saves_hyperparameters():
    module = ClassificationModule("cnn_tiny", num_classes=3, in_channels=1)
    assert module.hparams.model == "cnn_tiny"
    assert module(torch.zeros(2, 1, 8, 8)).shape == (2, 3)


def test_argument_errors():
    with pytest.raises(
        CompressionConfigError, match="`optimizer` must be one of 'adam', 'adamw', 'sgd', got 'rmsprop'"
    ):
        ClassificationModule(optimizer="rmsprop")
    with pytest.raises(CompressionConfigError, match="`lr` must be > 0, got 0"):
        ClassificationModule(lr=0)
