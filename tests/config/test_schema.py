import pytest

from lightning_compress.config import load_recipe
from lightning_compress.errors import CompressionConfigError


def test_every_problem_is_reported_at_once_with_its_key_path():
    config = {
        "sead": 1,
        "trainer": {"max_epoch": 3},
        "compression": {"pruning": {"final_sparsity": 1.5}, "quantisation": {}, "low_rank": {"rnak": 3}},
        "logger": {"wandbb": {}},
        "model": {"class_path": "os.system"},
    }
    with pytest.raises(CompressionConfigError) as caught:
        load_recipe(config)
    message = str(caught.value)
    assert "sead: unknown key" in message and "did you mean 'seed'" in message
    config.pop("sead")
    with pytest.raises(CompressionConfigError) as caught:
        load_recipe(config)
    message = str(caught.value)
    for expected in (
        "trainer.max_epoch: unknown key", "did you mean 'max_epochs'",
        "compression.pruning: `final_sparsity` must be in [0, 1), got 1.5",
        "compression.quantisation: unknown key", "did you mean 'quantization'",
        "compression.low_rank.rnak: unknown key", "did you mean 'rank'",
        "logger.wandbb: unknown key", "model.class_path: must be the import path of a LightningModule subclass",
    ):  # fmt: skip
        assert expected in message, expected


@pytest.mark.parametrize("path", ["os.system", "builtins.eval", "subprocess.Popen", "no.such.Module", "Trainer"])
def test_class_path_reaches_only_lightning_classes(path):
    with pytest.raises(CompressionConfigError, match="must be the import path of a LightningModule subclass"):
        load_recipe({"model": {"class_path": path}})
