"""Resuming from any checkpoint Lightning writes ends like the uninterrupted run wherever plain Lightning does
(#15): epoch-end checkpoints, step checkpoints at an epoch's last batch (Lightning then enters the next epoch
without `on_train_epoch_start`: QAT trained it in float, low-rank factorised an epoch late) and mid-epoch."""

import os

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_compress import LowRankFactorization, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.core.low_rank import LowRank
from lightning_compress.core.quantization.fake_quant import ActivationFakeQuant, WeightFakeQuant
from tests.helpers import TinyModule, fit

# 128 samples / 16 = 8 steps an epoch; each checkpoint is the last one before epoch 1, where the phases change
KINDS = {
    "epoch_end": ({"every_n_epochs": 1}, "epoch=0-step=8.ckpt"),
    "last_batch": ({"every_n_train_steps": 8}, "epoch=0-step=8.ckpt"),
    "mid_epoch": ({"every_n_train_steps": 4}, "epoch=0-step=4.ckpt"),
}
PHASES = {
    "plain": list,
    "qat_start": lambda: [QuantizationAwareTraining(start_epoch=1)],
    "qat_freezing": lambda: [QuantizationAwareTraining(freeze_bn_epoch=1, freeze_observers_epoch=1)],
    "low_rank": lambda: [LowRankFactorization(epoch=1, ratio=0.5)],
    "pruning_ramp": lambda: [MagnitudePruning(0.5, start_epoch=0, end_epoch=2)],
}


class Phases(Callback):
    """What each step trains with (after the compression callbacks' hooks): fake quantisation on, observers
    observing, BatchNorms in train mode, factorised layers, the masked fraction of the weights."""

    def __init__(self) -> None:
        self.at: dict[int, tuple] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        modules = list(pl_module.modules())
        quantizers = [m for m in modules if isinstance(m, (WeightFakeQuant, ActivationFakeQuant))]
        masks = [b for name, b in pl_module.named_buffers() if name.endswith("weight_mask")]
        self.at[trainer.global_step] = (
            any(bool(q.enabled) for q in quantizers),
            any(bool(q.observing) for q in quantizers if isinstance(q, ActivationFakeQuant)),
            tuple(m.training for m in modules if isinstance(m, nn.BatchNorm2d)),
            sum(isinstance(m, LowRank) for m in modules),
            round(float(sum((b == 0).sum() for b in masks) / max(1, sum(b.numel() for b in masks))), 4),
        )


def run(phase: str, tmp_path, kind: str | None = None, resume: str | None = None) -> tuple[torch.Tensor, dict]:
    phases = Phases()
    callbacks = [*PHASES[phase](), phases]
    if kind is not None:
        callbacks.append(ModelCheckpoint(tmp_path, save_top_k=-1, **KINDS[kind][0]))
    _, module = fit(callbacks, module=TinyModule(bn=True), max_epochs=3, enable_checkpointing=kind is not None,
                    ckpt_path=resume)  # fmt: skip
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return module.eval()(x), phases.at


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_resuming_ends_like_the_uninterrupted_run(kind, phase, tmp_path):
    expected, phases = run(phase, tmp_path, kind)
    checkpoint = tmp_path / KINDS[kind][1]
    assert checkpoint.exists(), sorted(os.listdir(tmp_path))
    resumed, resumed_phases = run(phase, tmp_path / "again", resume=str(checkpoint))
    assert resumed_phases == {step: phases[step] for step in resumed_phases}  # every step in its phase
    assert len(resumed_phases) == 24 - torch.load(checkpoint, weights_only=True)["global_step"]
    if kind in BIT_IDENTICAL:
        assert torch.equal(resumed, expected), float((resumed - expected).abs().max())


# Plain Lightning (the "plain" phase) resumes these bit-identically; from mid-epoch it does not (the data
# loader's position is not in the checkpoint), so there the phases of every step are what is compared.
BIT_IDENTICAL = ("epoch_end", "last_batch")
