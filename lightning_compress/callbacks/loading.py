"""Compressed checkpoints that load the Lightning way: :class:`CompressedCheckpointMixin`.

A checkpoint of a compressed model holds factorised layers (``fc.0.weight``, ``fc.1.weight``), pruning
masks and fake-quantisation parameters that a fresh instance of the module does not have, so
``MyModule.load_from_checkpoint(path)`` and ``Trainer.test(model, ckpt_path=path)`` without the
compression callbacks fail on the keys. Mixing this class into the module (before ``LightningModule``)
rebuilds that structure in ``on_load_checkpoint``, which Lightning calls before it loads the weights:

    class MyModule(CompressedCheckpointMixin, pl.LightningModule): ...

    model = MyModule.load_from_checkpoint("epoch=9.ckpt")      # factorised, masked, fake-quantised
    Trainer().test(MyModule(), dataloader, ckpt_path="epoch=9.ckpt")

Without the mixin, :func:`lightning_compress.restore` does the same for any module.
"""

from __future__ import annotations

from typing import Any

from lightning_compress.callbacks.base import CompressionCallback, find_callbacks
from lightning_compress.deploy.restore import rebuild_structure


class CompressedCheckpointMixin:
    """Rebuild a compressed checkpoint's structure when Lightning loads it into this module.

    A fit with the compression callbacks in its Trainer (a resume) leaves the structure to them.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None or not find_callbacks(trainer, CompressionCallback):
            rebuild_structure(self, checkpoint)  # type: ignore[arg-type]  # mixed into a LightningModule
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
