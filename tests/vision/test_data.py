import pytest
import torch

from lightning_compress.errors import CompressionConfigError
from lightning_compress.vision.data import (
    EpochSeededSampler,
    ImageFolderDataModule,
    TorchvisionDataModule,
    get_datamodule,
)
from tests.helpers import cifar_checksums_off, write_cifar10, write_mnist, write_pngs


def test_digits_split_and_shapes():
    dm = get_datamodule("digits", batch_size=32)
    dm.setup("fit")
    assert len(dm.train_set) == 1437 and len(dm.val_set) == 360
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.long
    assert dm.example_input().shape == (1, 1, 8, 8)


def test_mnist5k_is_the_embedded_subset_with_a_fixed_split():
    dm, again = get_datamodule("mnist5k"), get_datamodule("mnist5k")
    dm.setup("fit")
    again.setup("fit")
    assert len(dm.train_set) == 4000 and len(dm.val_set) == 1000
    assert dm.train_set.indices == again.train_set.indices
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 1, 28, 28)
    labels = torch.tensor([int(dm.val_set[i][1]) for i in range(len(dm.val_set))])
    assert labels.unique().numel() == 10


def test_sampler_order_depends_on_seed_and_epoch_only():
    data = list(range(50))
    a, b = EpochSeededSampler(data, seed=3), EpochSeededSampler(data, seed=3)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)  # a fresh sampler at the same epoch: what a resumed run sees
    assert sorted(first) == data


def test_imagefolder_splits_a_single_folder(tmp_path):
    write_pngs(tmp_path)
    dm = ImageFolderDataModule(tmp_path, image_size=16, in_channels=1, val_fraction=0.2, batch_size=4)
    assert dm.num_classes == 2
    dm.setup("fit")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 16, 16) and set(y.tolist()) <= {0, 1}


def test_imagefolder_uses_train_and_val_folders(tmp_path):
    write_pngs(tmp_path / "train", per_class=3)
    write_pngs(tmp_path / "val", per_class=2)
    dm = get_datamodule("imagefolder", root=tmp_path, image_size=(10, 12), in_channels=3, batch_size=16)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 4
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 10, 12)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(CompressionConfigError, match="`root` must be an existing folder"):
        ImageFolderDataModule(tmp_path / "missing")
    with pytest.raises(CompressionConfigError, match=r"`in_channels` must be 1 .* got 2"):
        ImageFolderDataModule(tmp_path, in_channels=2)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(CompressionConfigError, match="is not an image folder"):
        ImageFolderDataModule(tmp_path).setup()


def test_unknown_data_name_and_bad_batch_size():
    with pytest.raises(
        CompressionConfigError,
        match=r"`data` must be one of 'digits', 'mnist5k', .*got 'mnist6k'. HINT: did you mean 'mnist5k'",
    ):
        get_datamodule("mnist6k")
    with pytest.raises(
        CompressionConfigError, match=r"data 'cifar10': missing a required argument: 'root'; it takes \(root"
    ):
        get_datamodule("cifar10")
    with pytest.raises(CompressionConfigError, match="`batch_size` must be a positive integer, got 0"):
        get_datamodule("digits", batch_size=0)


def test_cifar10_from_files_on_disk(tmp_path, monkeypatch):
    cifar_checksums_off(monkeypatch)
    dm = get_datamodule("cifar10", root=str(write_cifar10(tmp_path)), batch_size=4)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, (32, 32))
    dm.setup("fit")
    assert len(dm.train_set) == 40 and len(dm.val_set) == 8  # five train batches, one test batch
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.long
    assert dm.example_input().shape == (1, 3, 32, 32)


def test_torchvision_mnist_reads_idx_files(tmp_path):
    dm = get_datamodule("mnist", root=str(write_mnist(tmp_path)), batch_size=5)  # no check replaced
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.val_set) == 10
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]


def test_absent_or_corrupt_torchvision_data_is_a_clear_error_and_nothing_is_downloaded(tmp_path, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(
        CompressionConfigError, match=r"CIFAR10 is not under `root` .*cifar-10-batches-py.*download: false"
    ):
        get_datamodule("cifar10", root=str(tmp_path))
    write_cifar10(tmp_path)  # the real reader now sees files failing their checksums
    dm = get_datamodule("cifar10", root=str(tmp_path))
    with pytest.raises(CompressionConfigError, match=r"CIFAR10 is not under `root` .*corrupted"):
        dm.setup("fit")
    with pytest.raises(CompressionConfigError, match=r"`dataset` must be one of 'CIFAR10'.*HINT: did you mean 'MNIST'"):
        TorchvisionDataModule("MNSIT", tmp_path)
