"""The one tiny-model training helper every test shares."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress.core.graph import find_bn_pairs
from lightning_compress.core.quantization import QuantConfig, attach, enable, link_batchnorms
from lightning_compress.vision.data import EpochSeededSampler


class TinyNet(nn.Module):
    """Conv(1->8) -> Conv(8->8) -> Linear(8*4*4 -> 16) -> Linear(16 -> 4): every prunable kind."""

    def __init__(self, classes: int = 4, bn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=not bn)
        self.bn2 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, classes)

    def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1)))) * scale


class Inverted(nn.Module):
    """A user's own MobileNetV2-style block: ``x + (1x1 expand, BN, ReLU6, 1x1 project, BN)(x)``, the sum written
    out of place or, as EfficientNet does, in place (``out += x``)."""

    def __init__(self, channels: int, in_place: bool = False) -> None:
        super().__init__()
        wide = 2 * channels
        self.conv = nn.Sequential(
            nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), nn.ReLU6(),
            nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )  # fmt: skip
        self.in_place = in_place

    def forward(self, x: Tensor) -> Tensor:
        if self.in_place:
            out = self.conv(x)
            out += x
            return out
        return x + self.conv(x)


class ResidualNet(nn.Module):
    """Conv-BN stem, two :class:`Inverted` residual blocks, average pool and a Linear head (1x8x8 in, 4 classes)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(Inverted(8), Inverted(8, in_place=True))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
        return self.head(self.blocks(self.stem(x))) * scale


class TinyModule(pl.LightningModule):
    """A user-written LightningModule around :class:`TinyNet` (keyword-argument forward included), or around
    :class:`ResidualNet` with ``residual``."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd", bn: bool = False, residual: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net: nn.Module = ResidualNet() if residual else TinyNet(bn=bn)

    def forward(self, x: Tensor, *, scale: float = 1.0) -> Tensor:
        return self.net(x, scale=scale)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x, scale=1.0), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Classifier(pl.LightningModule):
    """The steps a user writes around any classifier (``forward`` is theirs): cross-entropy, ``val/acc``
    and Adam at :attr:`lr`. The zoo, N-d convolution and attention tests derive their modules from it."""

    lr = 1e-3

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), self.lr)


class Attending(Classifier):
    """A user's sequence classifier around ``nn.MultiheadAttention``."""

    lr = 1e-2

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = torch.nn.Linear(4, width)
        self.attention = torch.nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = torch.nn.Linear(width, 3)
        self.example_input_array = torch.zeros(2, 6, 4)

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.attention(h, h, h, need_weights=False)[0].mean(1))


def sequences(n: int = 48) -> TensorDataset:
    """Sequences of 6 steps of 4 features for :class:`Attending`, in 3 classes."""
    x = torch.randn(n, 6, 4, generator=torch.Generator().manual_seed(0))
    return TensorDataset(x, (x.sum((1, 2)) > 0).long() + (x[:, 0, 0] > 0).long())


def synthetic(n: int = 128, seed: int = 0, classes: int = 4) -> TensorDataset:
    """Learnable 8x8 images: the class sets which quadrant is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 1.0
    return TensorDataset(x, y)


def loaders(n: int = 128, batch_size: int = 16, seed: int = 0) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """(train, val) loaders over :func:`synthetic` data; the train order depends on seed and epoch only."""
    train = synthetic(n, seed)
    return (
        DataLoader(train, batch_size=batch_size, sampler=EpochSeededSampler(train, seed)),
        DataLoader(synthetic(64, seed + 1), batch_size=32),
    )


def trainer(tmp_path: Any = None, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer; ``kwargs`` override the defaults."""
    options: dict[str, Any] = {
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    if tmp_path is not None:
        options["default_root_dir"] = str(tmp_path)
    options.update(kwargs)
    return pl.Trainer(**options)


def fit(
    callbacks: list[pl.Callback], module: pl.LightningModule | None = None, seed: int = 0, **kwargs: Any
) -> tuple[pl.Trainer, pl.LightningModule]:
    """Seed, build a :class:`TinyModule` (unless given) and fit it with ``callbacks``."""
    pl.seed_everything(seed, verbose=False)
    module = module or TinyModule()
    ckpt_path = kwargs.pop("ckpt_path", None)
    train, val = loaders(seed=seed)
    t = trainer(callbacks=callbacks, **kwargs)
    t.fit(module, train, val, ckpt_path=ckpt_path)
    return t, module


def digits_checkpoint(path: Path, model: str, epochs: int, **module_kwargs: Any) -> Path:
    """A ``ClassificationModule(model)`` trained ``epochs`` epochs on digits (seed 0), saved the Lightning way."""
    from lightning_compress import ClassificationModule
    from lightning_compress.vision.data import get_datamodule

    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(model, 10, 1, **module_kwargs)
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=get_datamodule("digits"))
    trainer.save_checkpoint(path)
    return path


def weights(module: nn.Module) -> dict[str, Tensor]:
    """Every Conv/Linear weight by module name (detached copies)."""
    return {n: m.weight.detach().clone() for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def logged_metrics(logger: CSVLogger, prefix: str) -> dict[str, str]:
    """The last logged value of every ``<prefix>*`` column in a CSV logger's file."""
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last: dict[str, str] = {}
    for row in rows:
        last.update({k: v for k, v in row.items() if k.startswith(prefix) and v not in ("", None)})
    return last


def write_cifar10(root: Path, per_file: int = 8, seed: int = 0) -> Path:
    """CIFAR10's python-pickle layout (five train batches, a test batch, the meta file) with random images.

    torchvision also checks each file's MD5 against the real data set's; tests that read these files
    replace that one check (``cifar_checksums_off``), the parsing is torchvision's own.
    """
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8),
            "labels": [i % 10 for i in range(per_file)],
        }
        (folder / name).write_bytes(pickle.dumps({k: v for k, v in batch.items()}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return root


def cifar_checksums_off(monkeypatch: Any) -> None:
    """Let torchvision's CIFAR reader accept files whose MD5 is not the real data set's (only the check)."""
    import os

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """MNIST's raw IDX files (what torchvision's ``MNIST`` reads from ``root/MNIST/raw``), random digits."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        header = np.array([0x0803, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([0x0801, n], dtype=">i4").tobytes() + labels.tobytes()
        )
    return root


def write_pngs(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 5, size: int = 12) -> None:
    """``root/<class>/<i>.png``: random RGB images in torchvision's ImageFolder layout."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def quantised(bn: bool = False, config: QuantConfig | None = None, batches: int = 3) -> tuple[TinyNet, torch.Tensor]:
    """A TinyNet with QAT attached (BatchNorms folded), enabled and observed on a few batches."""
    torch.manual_seed(0)
    net, x = TinyNet(bn=bn), torch.randn(16, 1, 8, 8)
    layers = attach(net, config or QuantConfig())
    link_batchnorms(net, find_bn_pairs(net, layers, x[:2]))
    enable(net)
    net.train()
    for _ in range(batches):
        net(x)
    return net, x


def wandb_records(run_file: Any) -> list[Any]:
    """The protobuf ``Record``s of a W&B ``run-<id>.wandb`` file, read as the SDK writes it (a ``:W&B`` header,
    then LevelDB-log records of 32 KiB blocks): how a test reads back what an offline run recorded."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    block, offset, pending, records = 32768, 7, b"", []
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:  # a block's tail too short for a header is padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk, offset = data[offset + 7 : offset + 7 + length], offset + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL / LAST: the record is complete (FIRST / MIDDLE: more follows)
            records.append(pb.Record.FromString(pending))
    return records


def wandb_logged(run_file: Any) -> dict[str, Any]:
    """``{key: last value}`` of the history and summary records of a W&B run file."""
    import json

    found: dict[str, Any] = {}
    for record in wandb_records(run_file):
        items = record.history.item if record.HasField("history") else record.summary.update
        for item in items:
            found[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return found


def wandb_config(run_file: Any) -> dict[str, Any]:
    """The run's config as its records left it (``{key: value}``, W&B's own ``_wandb`` key left out)."""
    import json

    config: dict[str, Any] = {}
    for record in wandb_records(run_file):  # wandb.init's config rides on the run record, later changes on their own
        updates = record.run.config.update if record.HasField("run") else record.config.update
        for item in updates:
            config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    config.pop("_wandb", None)
    return config
