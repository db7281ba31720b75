"""Compressed checkpoints load the Lightning way with `CompressedCheckpointMixin` (#16)."""

import pytest
import torch

from lightning_compress import (
    CompressedCheckpointMixin,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
)
from tests.helpers import TinyModule, fit, loaders, trainer


class Mine(CompressedCheckpointMixin, TinyModule):
    """A user's module with the mixin."""


def test_load_from_checkpoint_and_trainer_validate_rebuild_the_compressed_structure(tmp_path):
    callbacks = [LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1"]), MagnitudePruning(0.5, end_epoch=1),
                 QuantizationAwareTraining(start_epoch=1)]  # fmt: skip
    t, module = fit(callbacks, module=Mine(bn=True), max_epochs=2)
    t.save_checkpoint(tmp_path / "run.ckpt")
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = module.eval()(x)
    with pytest.raises(RuntimeError, match=r"Missing key|Unexpected key"):  # what users met before
        TinyModule.load_from_checkpoint(tmp_path / "run.ckpt")
    loaded = Mine.load_from_checkpoint(tmp_path / "run.ckpt").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), expected, atol=1e-6)
    val = loaders()[1]
    figures = trainer().validate(module, val, verbose=False)[0]
    fresh = Mine(bn=True)
    assert trainer().validate(fresh, val, ckpt_path=tmp_path / "run.ckpt", verbose=False)[0] == figures
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(x), expected, atol=1e-6)  # the checkpoint's model, not a fresh one
