import numpy as np
import pytest
import torch
from PIL import Image

from lightning_compress.data import EpochSeededSampler, ImageFolderDataModule, get_datamodule
from lightning_compress.errors import CompressionConfigError


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


def _write_pngs(root, classes=("cat", "dog"), per_class=5, size=12):
    rng = np.random.default_rng(0)
    for label in classes:
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")


def test_imagefolder_splits_a_single_folder(tmp_path):
    _write_pngs(tmp_path)
    dm = ImageFolderDataModule(tmp_path, image_size=16, in_channels=1, val_fraction=0.2, batch_size=4)
    assert dm.num_classes == 2
    dm.setup("fit")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 1, 16, 16) and set(y.tolist()) <= {0, 1}


def test_imagefolder_uses_train_and_val_folders(tmp_path):
    _write_pngs(tmp_path / "train", per_class=3)
    _write_pngs(tmp_path / "val", per_class=2)
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
        CompressionConfigError, match=r"`data` must be one of 'digits', 'mnist5k', 'imagefolder', got 'mnist'"
    ):
        get_datamodule("mnist")
    with pytest.raises(CompressionConfigError, match="`batch_size` must be a positive integer, got 0"):
        get_datamodule("digits", batch_size=0)
