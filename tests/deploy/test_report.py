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
    assert rows["fc2"]["stored_bits"] is None  # no int8 file: nothing stored


def test_layer_rows_say_what_the_int8_file_stores_and_nothing_for_a_float_layer():
    net = TinyNet()
    q.attach(net, q.QuantConfig(weight_bits=4), include=["conv2", "fc1", "fc2"])
    q.enable(net)
    q.keep_in_float(net, ["fc2"])  # as a budget plan does: float in the file too
    rows = {row["name"]: row for row in rep.layer_rows(net, {"packed": {"fc1": 4}, "int8_storage_reason": None})}
    assert rows["fc1"]["stored_bits"] == 4 and rows["conv2"]["stored_bits"] == 8  # too small to pack: a byte each
    assert rows["fc2"]["stored_bits"] is None and rows["conv1"]["stored_bits"] is None
    layers = [{"name": n, "sparsity": 0.0, "rank": None, **{k: rows[n][k] for k in ("weight_bits", "stored_bits")}}
              for n in ("fc1", "conv2", "fc2")]  # fmt: skip
    text = rep.markdown({"model": "TinyNet", "before": {}, "after": {}, "files": {}, "verification": {},
                         "structure": {"physical": False, "removed_channels": {}, "reason": None}, "layers": layers})
    assert "| fc1 | 0.000 | — | 4, packed |" in text and "| conv2 | 0.000 | — | 4, stored as int8 |" in text
    assert "| fc2 | 0.000 | — | 4 |" in text


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


def report_with_accuracy(baseline):
    return {
        "model": "TinyNet",
        "before": {"params": 100.0, "onnx_bytes": 400.0, "ort_latency_ms": 2.0},
        "after": {"params": 25.0, "onnx_bytes": 100.0, "ort_latency_ms": 1.0, "ort_accuracy": 0.9,
                  "int8_onnx_bytes": 40.0, "int8_ort_accuracy": 0.88},
        "files": {}, "verification": {}, "structure": {"physical": False, "reason": None},
        "layers": [{"name": "conv1", "sparsity": 0.5, "rank": 3, "weight_bits": 8}],
        "baseline": baseline,
    }


def test_markdown_compares_the_accuracy_with_the_named_baseline_in_points():
    text = rep.markdown(report_with_accuracy({"source": "teacher", "ort_accuracy": 0.92, "candidates": {}}))
    assert "against the distillation teacher" in text and "| baseline | 92.00% | — |" in text
    assert "| model.onnx | 90.00% | -2.00 points |" in text and "| model.int8.onnx | 88.00% | -4.00 points |" in text
    assert "ort_accuracy |" not in text
    plain = rep.markdown(report_with_accuracy(None))
    assert "model.onnx 90.00%, model.int8.onnx 88.00% (no baseline)" in plain
    named = rep.markdown(report_with_accuracy({"source": "dense.ckpt", "ort_accuracy": 0.9, "candidates": {}}))
    assert "against dense.ckpt" in named


def test_plots_have_titles_axis_labels_value_labels_and_a_ratio_scale(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig) or real_close(fig))
    paths = rep.plots(report_with_accuracy({"source": "first_epoch", "ort_accuracy": 0.95, "candidates": {}}),
                      tmp_path)  # fmt: skip
    assert [p.name for p in paths] == ["layers.png", "before_after.png"] and all(p.stat().st_size for p in paths)
    layers, before_after = (fig.axes for fig in figures)
    assert layers[0].get_title().startswith("TinyNet per layer") and layers[0].get_xlabel() == "layer"
    ratios, accuracy = before_after
    assert ratios.get_yscale() == "log" and "after / before" in ratios.get_ylabel() and ratios.get_title()
    assert [t.get_text() for t in ratios.texts] == ["0.25×", "0.25×", "0.50×"]  # params, onnx_bytes, latency
    assert [t.get_text() for t in accuracy.texts] == ["95.0%", "90.0%", "88.0%"]
    assert "the model after its first epoch" in accuracy.get_title() and accuracy.get_ylabel() == "accuracy"
