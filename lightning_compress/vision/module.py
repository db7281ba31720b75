"""``ClassificationModule``: the LightningModule the examples, benchmarks and CLI train.

Your own LightningModule works with every callback of this package just the same; this one only
saves writing the usual cross-entropy + accuracy boilerplate.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_compress.errors import CompressionConfigError, config_error, one_of
from lightning_compress.vision.models import TORCHVISION_MODELS, build_model

OPTIMIZERS = ("adam", "adamw", "sgd")
TRAINED_ON = "trained_on"  # the checkpoint key of what the module was trained on


class ClassificationModule(pl.LightningModule):
    """Cross-entropy classification with torchmetrics accuracy.

    Args:
        model: a registered model name (``cnn_small``, ``resnet18``, ...) or an ``nn.Module``.
        num_classes: classes (used for a model built by name and for the metrics).
        in_channels: input channels of a model built by name.
        lr: learning rate.
        optimizer: ``adam``, ``adamw`` or ``sgd`` (momentum 0.9).
        weight_decay: weight decay.
        cosine: anneal the learning rate to zero over ``trainer.max_epochs`` (per epoch).
        weights: pretrained torchvision weights for a torchvision model by name (``DEFAULT``,
            ``IMAGENET1K_V1``, ...), read from the local torch cache only (a clear error otherwise).

    Example::

        module = ClassificationModule("cnn_small", num_classes=10, in_channels=1)
        Trainer(max_epochs=3).fit(module, datamodule=get_datamodule("mnist5k"))
    """

    def __init__(
        self,
        model: str | nn.Module = "cnn_small",
        num_classes: int = 10,
        in_channels: int = 1,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        cosine: bool = False,
        weights: str | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise config_error("optimizer", one_of(OPTIMIZERS), optimizer)
        if not lr > 0:
            raise config_error("lr", "> 0", lr)
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if weights is not None and (not isinstance(model, str) or model not in TORCHVISION_MODELS):
            names = ", ".join(TORCHVISION_MODELS)
            raise CompressionConfigError(f"`weights` is only for the torchvision models ({names}), not {model!r}")
        extra = {} if weights is None else {"weights": weights}
        self.model = model if isinstance(model, nn.Module) else build_model(model, num_classes, in_channels, **extra)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.trained_on: dict[str, Any] = {}  # {"data": name, "input_shape": [C, H, W]}: `export` checks its data

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.trained_on:
            from lightning_compress.vision.data import data_name

            datamodule = getattr(self.trainer, "datamodule", None)
            self.trained_on = {"data": data_name(datamodule), "input_shape": list(batch[0].shape[1:])}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.trained_on:
            checkpoint[TRAINED_ON] = dict(self.trained_on)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.trained_on = dict(checkpoint.get(TRAINED_ON) or {})

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc, prog_bar=True)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    @override
    def configure_optimizers(self) -> Any:
        hp: Any = self.hparams
        params = self.parameters()
        optimizer: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if not hp.cosine:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs or 1))
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
