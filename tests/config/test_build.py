from pathlib import Path

from lightning_compress.config import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_loggers_from_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = {
        "seed": 3,
        "logger": {"csv": {"save_dir": str(tmp_path)}, "wandb": {"project": "lc-tests", "save_dir": str(tmp_path),
                                                                  "mode": "offline", "tags": ["recipe"]}},
    }  # fmt: skip
    csv, wandb = load_recipe(config).loggers()
    assert type(csv).__name__ == "CSVLogger" and type(wandb).__name__ == "WandbLogger"
    assert dict(wandb.experiment.config)["recipe"]["seed"] == 3 and list(wandb.experiment.tags) == ["recipe"]
    wandb.experiment.finish()


def test_model_checkpoint_starts_from_trained_weights(tmp_path):
    import torch

    from lightning_compress import ClassificationModule

    trained = ClassificationModule("cnn_tiny", 10, 1)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "trained.ckpt")
    model = load_recipe({"model": {"model": "cnn_tiny", "checkpoint": str(tmp_path / "trained.ckpt")},
                         "data": {"name": "digits"}}).model()  # fmt: skip
    for key, value in trained.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
