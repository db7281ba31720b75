"""What every callback shares: a diverged run stops, reuse across fits holds no memory (strategies: test_surgery)."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_compress import (
    CompressionExport,
    KnowledgeDistillation,
    LowRankFactorization,
    MagnitudePruning,
    QuantizationAwareTraining,
    TrainingDivergedError,
)
from lightning_compress.callbacks.base import CompressionCallback, find_callback, find_callbacks
from lightning_compress.callbacks.replace import notify
from tests.helpers import TinyModule, fit


def _all(teacher, folder):
    return [
        LowRankFactorization(epoch=1, ratio=0.5, include=["net.fc1"]),
        MagnitudePruning(final_sparsity=0.5, end_epoch=1),
        QuantizationAwareTraining(start_epoch=1),
        KnowledgeDistillation(teacher),
        CompressionExport(folder, plots=False, val_batches=1),
    ]


class Diverging(TinyModule):
    """The loss turns NaN at the 5th step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 4 else loss


@pytest.mark.parametrize("which", ["all", "export_only"])
def test_a_nan_loss_stops_with_a_clear_message_and_exports_nothing(tmp_path, which):
    callbacks = _all(TinyModule(), tmp_path / "out")
    if which == "export_only":
        callbacks = callbacks[-1:]
    with pytest.raises(TrainingDivergedError, match=r"the training loss is nan at epoch 0, global step 5: training "
                       r"stopped and nothing was exported. HINT: lower the learning rate"):  # fmt: skip
        fit(callbacks, module=Diverging(), max_epochs=2)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _live_tensor_bytes() -> tuple[int, int]:
    """Live tensors with storage: the ONNX exporter's fake (symbolic-shape) tensors hold no memory."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor)]
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


@pytest.mark.slow
def test_reusing_the_same_callbacks_for_five_fits_does_not_grow_memory(tmp_path):
    teacher = TinyModule()
    callbacks = _all(teacher, tmp_path / "out")
    gone, sizes = [], []
    for _ in range(5):
        trainer, module = fit(callbacks, module=TinyModule(bn=True), max_epochs=2)
        assert (tmp_path / "out" / "model.onnx").exists()
        gone.append(weakref.ref(module))
        del trainer, module
        sizes.append(_live_tensor_bytes())
    assert all(ref() is None for ref in gone), "a fitted model is still referenced"  # not even the last one
    (count, nbytes), (last_count, last_bytes) = sizes[1], sizes[-1]
    assert last_count <= count and last_bytes <= nbytes, sizes


class Watcher(CompressionCallback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_modules_replaced(self, trainer, pl_module, replaced):
        self.seen += list(replaced)


class NotOurs(Callback):
    def on_modules_replaced(self, trainer, pl_module, replaced):  # a user callback that happens to use the name
        raise AssertionError("only compression callbacks are told")


def test_find_callback_is_by_type_and_the_replacement_hook_is_declared():
    watcher, pruning = Watcher(), MagnitudePruning(0.5)
    trainer = SimpleNamespace(callbacks=[NotOurs(), pruning, watcher])
    assert find_callback(trainer, MagnitudePruning) is pruning
    assert find_callback(trainer, QuantizationAwareTraining) is None
    assert find_callbacks(trainer, CompressionCallback) == [pruning, watcher]
    assert CompressionCallback().on_modules_replaced(trainer, None, {}) is None  # a documented no-op
    notify(SimpleNamespace(callbacks=[NotOurs(), watcher]), None, {"fc": (nn.Linear(1, 1), nn.Linear(1, 1))})
    assert watcher.seen == ["fc"]


def test_every_callback_state_names_its_kind():
    teacher = nn.Linear(2, 2)
    callbacks = [MagnitudePruning(0.5), QuantizationAwareTraining(), LowRankFactorization()]
    callbacks.append(KnowledgeDistillation(teacher))
    kinds = {type(c).__name__: c.state_dict()["kind"] for c in callbacks}
    assert kinds == {
        "MagnitudePruning": "pruning", "QuantizationAwareTraining": "quantization",
        "LowRankFactorization": "low_rank", "KnowledgeDistillation": "distillation",
    }  # fmt: skip


class Interrupting(TinyModule):
    """Ctrl-C at the 7th step (the second epoch: every technique is on)."""

    def training_step(self, batch, batch_idx):
        if self.global_step >= 6:
            raise KeyboardInterrupt
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("way_out", ["KeyboardInterrupt", "exception"])
def test_every_way_out_of_fit_drops_the_model(way_out, tmp_path):
    # #15: after a KeyboardInterrupt the callbacks kept the model referenced (Lightning calls only
    # `on_exception` on that path, not `teardown`)
    callbacks = _all(TinyModule(), tmp_path / "out")
    module = Interrupting(bn=True) if way_out == "KeyboardInterrupt" else Diverging(bn=True)
    expected = SystemExit if way_out == "KeyboardInterrupt" else Exception  # Lightning exits 1 after Ctrl-C
    try:
        fit(callbacks, module=module, max_epochs=3)
    except expected:
        pass  # the exception (and its traceback's frames, the trainer's) is gone after this block
    else:
        raise AssertionError("the fit was not interrupted")
    ref = weakref.ref(module)
    del module
    gc.collect()
    holders = [type(o).__name__ for o in gc.get_referrers(ref())] if ref() is not None else []
    assert ref() is None, f"the interrupted model is still referenced by {holders}"
