import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from lightning_compress.deploy.onnx import float_copy, int8_copy, pick_logits, write_onnx
from lightning_compress.deploy.verify import (
    FP32_MIN_SQNR_DB,
    compare,
    layerwise,
    quantized_tensors,
    sqnr_db,
    verify_fp32,
    verify_int8,
)
from lightning_compress.errors import ExportVerificationError
from tests.helpers import quantised


def test_sqnr_ignores_a_shift_of_each_rows_logits_and_is_infinite_for_identical_outputs():
    reference = np.array([[100.0, 101.0], [100.0, 99.0]])  # large logits, small differences between classes
    # noise 0.01 against a signal of 0.5 around each row's mean: 34 dB (the raw values would say 80 dB)
    assert sqnr_db(reference + 0.01, reference) == pytest.approx(20 * np.log10(0.5 / 0.01))
    assert compare(reference, reference)["sqnr_db"] is None and compare(reference, reference)["relative_error"] == 0


def test_fp32_check_passes_float_rounding_at_any_scale_and_fails_a_wrong_file():
    g = torch.Generator().manual_seed(0)
    reference = 300 * torch.randn(64, 10, generator=g)  # EfficientNet-like logit scale
    rounding = reference.numpy() * (1 + 2e-6 * np.random.default_rng(0).standard_normal((64, 10)))
    result = verify_fp32(rounding.astype(np.float32), reference, "model.onnx")
    assert result["passed"] and result["sqnr_db"] > FP32_MIN_SQNR_DB
    assert result["max_abs_diff"] > 1e-4 * 300 / 10  # the old max-|difference| rule gave 3e-2 here: near its edge
    wrong = reference.numpy().copy()
    wrong[:, 3] += 1.0  # one class's bias off by one
    with pytest.raises(ExportVerificationError, match=r"model\.onnx: .*SQNR \d+\.\d dB \(at least 80\)"):
        verify_fp32(wrong, reference, "model.onnx")


def test_fp32_check_fails_a_decisive_flip_and_allows_a_near_tie():
    reference = torch.tensor([[2.0, 1.0], [1.0, 1.0 + 1e-9]])
    near_tie = np.array([[2.0, 1.0], [1.0 + 1e-9, 1.0]], dtype=np.float64)  # the tie flips: not decisive
    assert verify_fp32(near_tie, reference, "model.onnx")["decisive_flips"] == 0
    flipped = reference.numpy().copy()
    flipped[0] = [1.0, 2.0]
    result = compare(flipped, reference.numpy())
    assert result["decisive_flips"] == 0  # the row's own difference (1.0) covers its margin: SQNR fails it
    with pytest.raises(ExportVerificationError):
        verify_fp32(flipped, reference, "model.onnx")


@pytest.fixture(scope="module")
def int8_file(tmp_path_factory):
    model, x = quantised(bn=True)
    model.eval()
    prepared = int8_copy(model, x[:2])
    path = write_onnx(prepared, x[:2], tmp_path_factory.mktemp("int8") / "model.int8.onnx", int8=True)
    with torch.no_grad():
        fake_quant, floating = model(x), float_copy(model)(x)
    return model, prepared, x, path, fake_quant, floating


def test_int8_check_compares_every_quantised_tensor_within_one_step(int8_file):
    _, prepared, x, path, fake_quant, floating = int8_file
    taps = quantized_tensors(onnx.load(str(path)))
    assert {"conv1.input_quant", "conv2.input_quant", "fc1.input_quant", "fc2.input_quant"} <= set(taps)
    rows = layerwise(path, prepared, x, pick_logits)
    assert rows[-1]["layer"] == "logits" and len(rows) >= 5
    assert all(row["max_steps"] <= 1.0 + 1e-4 and row["off_share"] == 0 for row in rows), rows
    result = verify_int8(path, prepared, x, fake_quant, floating, pick_logits)
    assert result["passed"] and result["layers"]["first_diverging"] is None
    assert result["layers"]["instrumented_run_max_diff"] == 0.0  # exposing the tensors changes no kernel
    assert "one quantisation step" in result["criterion"]
    assert result["sqnr_vs_float_db"] is not None and result["fake_quant_sqnr_vs_float_db"] is not None


def _mutated(path, tmp_path, change):
    proto = onnx.load(str(path))
    change(proto)
    out = tmp_path / "model.int8.onnx"
    onnx.save(proto, str(out))
    return out


def test_int8_check_names_the_layer_where_a_wrong_file_departs(int8_file, tmp_path):
    _, prepared, x, path, fake_quant, floating = int8_file

    def wrong_scale(proto):  # fc1's input scale written 1.5x too large
        scale = next(i for i in proto.graph.initializer if i.name == "fc1.input_quant.scale")
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))

    def swapped_channels(proto):  # conv2's first two output channels exchanged (a channel removal gone wrong)
        producers = {o: n for n in proto.graph.node for o in n.output}
        conv = [n for n in proto.graph.node if n.op_type == "Conv"][1]
        weight = next(i for i in proto.graph.initializer if i.name == producers[conv.input[1]].input[0])
        values = numpy_helper.to_array(weight).copy()
        values[[0, 1]] = values[[1, 0]]
        weight.CopyFrom(numpy_helper.from_array(values, weight.name))

    cases = ((wrong_scale, "(input|output) of 'fc1'"), (swapped_channels, "(output of 'conv2'|input of 'fc1')"))
    for change, where in cases:
        wrong = _mutated(path, tmp_path, change)
        with pytest.raises(ExportVerificationError, match=rf"parts ways with the PyTorch model at the {where}: .*step"):
            verify_int8(wrong, copy.deepcopy(prepared), x, fake_quant, floating, pick_logits)


def test_int8_weights_on_a_cpu_whose_kernels_saturate_fail_with_the_reason_and_the_fix(monkeypatch, tmp_path):
    """Inputs near the top of their range meet weights near ±127: u8s8 pairs exceed int16 on x86 without VNNI.
    Where this CPU saturates, the int8-weight file fails its check, and the message says why and what to do;
    the uint8-weight file of the same model passes. Elsewhere only the hint's rule is checked."""
    from lightning_compress.deploy import cpu, verify

    monkeypatch.setattr(cpu, "u8s8_exact", lambda: (False, "an x86 CPU without VNNI"))
    hint = verify._saturation_hint(("int8", "chosen"))
    assert "this is an x86 CPU without VNNI" in hint and "int8_weights='uint8'" in hint
    assert verify._saturation_hint(("uint8", "auto: ...")) == "" and verify._saturation_hint(None) == ""
    monkeypatch.undo()
    if cpu.u8s8_exact()[0]:
        return
    model, x = quantised(bn=True)
    x = 0.9 + 0.1 * torch.rand_like(x)  # positive inputs near the top of their range: uint8 codes near 255
    with torch.no_grad():
        model.conv1.weight.fill_(0.5)  # one value per channel: every int8 weight is 127
        model.train()
        model(x)
    model.eval()
    prepared = int8_copy(model, x[:2])
    with torch.no_grad():
        fake_quant, floating = model(x), float_copy(model)(x)
    signed = write_onnx(prepared, x[:2], tmp_path / "s.int8.onnx", int8=True, int8_weights="int8")
    with pytest.raises(ExportVerificationError, match=r"HINT: this is an x86 CPU without VNNI.*uint8"):
        verify_int8(signed, copy.deepcopy(prepared), x, fake_quant, floating, pick_logits, ("int8", "chosen"))
    unsigned = write_onnx(prepared, x[:2], tmp_path / "u.int8.onnx", int8=True, int8_weights="uint8")
    assert verify_int8(unsigned, prepared, x, fake_quant, floating, pick_logits, ("uint8", "chosen"))["passed"]
