import json

import pytest
import torch

from lightning_compress.core import quantization as q
from lightning_compress.core.pruning import prune
from lightning_compress.deploy import bundle
from lightning_compress.deploy.bundle import write_bundle
from lightning_compress.deploy.onnx import float_copy
from lightning_compress.errors import ExportVerificationError
from tests.helpers import TinyNet, quantised


def val_batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def test_a_plain_model_gives_every_file_verified_without_lightning(tmp_path):
    model, _ = quantised(bn=True)
    before = float_copy(TinyNet(bn=True))
    prune(model, 0.5, pattern="channel", include=["conv1"])
    with torch.no_grad():  # the BatchNorm after a pruned channel outputs zero (as MagnitudePruning masks it)
        model.bn1.weight.mul_(model.conv1.weight_mask[:, 0, 0, 0])
        model.bn1.bias.mul_(model.conv1.weight_mask[:, 0, 0, 0])
    val = val_batches()
    report = write_bundle(model, before, tmp_path, val[0][0][:2], val, ("onnx", "onnx_int8", "checkpoint"), plots=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.ckpt", "model.int8.onnx", "model.onnx", "report.json", "report.md",
    ]  # fmt: skip
    assert report["structure"]["physical"] and report["structure"]["removed_channels"] == {"conv1": 4}
    assert all(check["passed"] for check in report["verification"].values())
    assert json.loads((tmp_path / "report.json").read_text())["after"]["params"] == report["after"]["params"]
    assert q.quantized_layers(model)  # the trained model keeps its fake quantisation


def test_a_file_that_does_not_verify_writes_nothing(tmp_path, monkeypatch):
    model, _ = quantised()
    val = val_batches(1)
    monkeypatch.setattr(bundle, "_run", lambda path, batch: model(batch).detach().numpy() + 1.0)
    with pytest.raises(ExportVerificationError, match=r"model\.onnx"):
        write_bundle(model, float_copy(TinyNet()), tmp_path, val[0][0][:2], val, ("onnx", "checkpoint"), plots=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_the_validation_data_is_named_not_reported_as_a_mismatch(bad, tmp_path):
    # #15: it read as "ONNX Runtime does not match PyTorch"
    from lightning_compress.errors import CompressionConfigError

    val = val_batches(2)
    val[1][0][3, 0, 2, 2] = bad
    with pytest.raises(CompressionConfigError, match="validation batch 1 holds NaN or infinite values"):
        write_bundle(TinyNet().eval(), float_copy(TinyNet()), tmp_path / "out", val[0][0][:2], val, plots=False)
    assert not (tmp_path / "out").exists()
