import pytest
import torch

from lightning_compress.core import quantization as q
from lightning_compress.core.low_rank import factorize_linear
from lightning_compress.core.pruning import prune
from lightning_compress.core.surgery import swap_modules
from lightning_compress.deploy import report as rep
from lightning_compress.errors import CompressionConfigError
from tests.helpers import TinyNet


def test_layer_rows_count_sparsity_ranks_and_bits_from_the_tensors():
    net = TinyNet()
    prune(net, 0.5, include=["conv2"], scope="layer")
    swap_modules(net, {"fc1": factorize_linear(net.fc1, rank=3)})
    q.attach(net, q.QuantConfig(weight_bits=4), include=["fc2"])
    rows = {row["name"]: row for row in rep.layer_rows(net)}
    assert rows["conv2"]["sparsity"] == pytest.approx(0.5, abs=0.01) and rows["conv1"]["sparsity"] == 0.0
    assert rows["fc1.0"]["rank"] == 3 and rows["fc1.1"]["rank"] is None
    assert rows["fc2"]["weight_bits"] == 4 and rows["conv1"]["weight_bits"] is None


def test_markdown_has_the_ratios_the_files_and_the_layers():
    report = {
        "model": "TinyNet",
        "before": {"params": 100.0, "onnx_bytes": 400.0},
        "after": {"params": 25.0, "onnx_bytes": 100.0},
        "files": {"onnx": {"path": "out/model.onnx", "bytes": 100}},
        "verification": {
            "onnx": {"max_abs_diff": 1e-6, "top1_agreement": 1.0, "sqnr_db": 121.5, "criterion": "SQNR >= 80 dB"}
        },
        "structure": {"physical": True, "removed_channels": {"conv1": 4}, "reason": None},
        "layers": [{"name": "conv1", "sparsity": 0.5, "rank": None, "weight_bits": 8}],
    }  # fmt: skip
    text = rep.markdown(report)
    assert "| params | 100 | 25 | 0.250 |" in text and "| model.onnx | 100 | 121.5 | 1e-06 | 1.000 |" in text
    assert "`onnx` verified by: SQNR >= 80 dB." in text
    assert "| conv1 | 0.500 | — | 8 |" in text and "Channels removed physically: True" in text


def test_model_figures_rename_nonzero():
    figures = rep.model_figures(TinyNet(), torch.zeros(2, 1, 8, 8))
    assert "nonzero_params" in figures and "nonzero" not in figures and figures["macs"] > 0


@pytest.mark.parametrize(
    ("formats", "message"),
    [(["onnx", "tflite"], "got 'tflite'"), ([], "at least one"), (["onx"], "did you mean 'onnx'")],
)
def test_check_formats(formats, message):
    with pytest.raises(CompressionConfigError, match=message):
        rep.check_formats(formats, ("onnx", "onnx_int8", "checkpoint"))
