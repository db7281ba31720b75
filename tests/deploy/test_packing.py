import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lightning_compress.core import quantization as q
from lightning_compress.deploy import packing
from lightning_compress.deploy.onnx import export_onnx
from lightning_compress.vision.models import build_model


def test_codes_pack_low_nibble_first_by_hand():
    codes = np.array([1, 2, 3, 15, 7], np.uint8)  # odd: the last byte is padded with a zero code
    packed = packing.pack_codes(codes, 4)
    assert packed.reshape(-1).tolist() == [0x21, 0xF3, 0x07]
    assert packing.unpack_codes(packed, 4, 5).tolist() == codes.tolist()
    crumbs = np.array([3, 0, 1, 2, 1], np.uint8)  # 2 bits: four to a byte, the first in the lowest two bits
    two = packing.pack_codes(crumbs, 2)
    assert two.reshape(-1).tolist() == [0b10010011, 0b00000001]
    assert packing.unpack_codes(two, 2, 5).tolist() == crumbs.tolist()


def test_storage_bits_by_the_span_of_the_values():
    assert packing.storage_bits(np.array([-7, 7], np.int8)) == 4  # a 4-bit grid: 15 values
    assert packing.storage_bits(np.array([-8, 7], np.int8)) == 4
    assert packing.storage_bits(np.array([-1, 0, 1], np.int8)) == 2  # a 2-bit grid
    assert packing.storage_bits(np.array([127, 135], np.uint8)) == 4  # uint8 with zero point 128
    assert packing.storage_bits(np.array([-8, 8], np.int8)) is None  # 17 values: a byte each
    assert packing.storage_bits(np.zeros(0, np.int8)) is None


def _dequantized_graph(weights: np.ndarray) -> onnx.ModelProto:
    """x -> Conv(x, DequantizeLinear(weights_int8)): the weight layout fold_weight_quantizers leaves."""
    channels = weights.shape[0]
    inits = [
        numpy_helper.from_array(weights, "w_int8"),
        numpy_helper.from_array(np.full(channels, 0.1, np.float32), "conv.parametrizations.weight.0.scale"),
        numpy_helper.from_array(np.zeros(channels, weights.dtype), "zero"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_int8", "conv.parametrizations.weight.0.scale", "zero"], ["w"], axis=0),
        helper.make_node("Conv", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights.shape[1], 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 4, 4])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("low, high, bits", [(-7, 7, 4), (-1, 1, 2), (-8, 7, 4)])
def test_packed_graph_computes_the_same_weights_and_onnx_runtime_folds_it(low, high, bits):
    rng = np.random.default_rng(0)
    weights = rng.integers(low, high + 1, size=(65, 49, 1, 1)).astype(np.int8)  # 3185: a padded last byte
    plain, packed = _dequantized_graph(weights), _dequantized_graph(weights)
    result = packing.pack_weights(packed)
    assert result == {"w_int8": packing.PackedTensor("conv", bits, 3185)}
    assert "w_int8" not in {i.name for i in packed.graph.initializer}
    onnx.checker.check_model(packed)
    x = rng.standard_normal((1, 49, 4, 4)).astype(np.float32)
    assert (_run(packed, x) == _run(plain, x)).all()
    stored = next(i for i in packed.graph.initializer if i.name.endswith("/packed"))
    assert numpy_helper.to_array(stored).size == -(-3185 * bits // 8)
    assert packed.ByteSize() < plain.ByteSize() - 3185 * (8 - bits) // 8 + 1200  # the unpacking: under 1.2 KB
    assert packing.unfolded_reason(packed) is None


def test_a_tensor_too_small_to_gain_stays_a_byte_a_weight():
    model = _dequantized_graph(np.ones((2, 3, 1, 1), np.int8))
    before = model.ByteSize()
    assert packing.pack_weights(model) == {} and model.ByteSize() == before


def test_unfolded_unpacking_is_named():
    weights = np.ones((64, 64, 1, 1), np.int8)
    model = _dequantized_graph(weights)
    packing.pack_weights(model)
    # the packed bytes made a graph input: no longer a constant, ONNX Runtime would unpack at every run
    stored = next(i for i in model.graph.initializer if i.name.endswith("/packed"))
    model.graph.initializer.remove(stored)
    model.graph.input.append(helper.make_tensor_value_info(stored.name, TensorProto.UINT8, list(stored.dims)))
    reason = packing.unfolded_reason(model)
    assert reason is not None and "does not fold" in reason and "every inference" in reason


def test_eight_bit_weights_stay_a_byte_each():
    weights = np.resize(np.arange(-100, 100, dtype=np.int8), (64, 64, 1, 1))
    model = _dequantized_graph(weights)
    assert packing.pack_weights(model) == {}
    assert "w_int8" in {i.name for i in model.graph.initializer}


def _calibrated_cnn(bits: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, images = build_model("cnn_small"), torch.rand(32, 1, 28, 28)
    q.attach(model, q.QuantConfig(weight_bits=bits))
    q.enable(model)
    with torch.no_grad():
        model(images)
    return model.eval(), images


def test_export_falls_back_to_int8_storage_and_says_why(tmp_path, monkeypatch):
    model, images = _calibrated_cnn(4)
    monkeypatch.setattr(packing, "unfolded_reason", lambda proto: "this runtime unpacks at every run")
    with pytest.warns(UserWarning, match=r"stores its \d+ narrow weight tensors as int8: this runtime unpacks"):
        path = export_onnx(model, images[:1], tmp_path / "m.int8.onnx", int8=True)
    assert packing.read_storage(path) == {"packed": {}, "int8_storage_reason": "this runtime unpacks at every run"}
    graph = onnx.load(str(path)).graph
    assert not [n for n in graph.node if n.name.startswith(packing.UNPACK)]
    assert any(i.name.endswith("_int8") for i in graph.initializer)
    monkeypatch.undo()
    packed = export_onnx(model, images[:1], tmp_path / "p.int8.onnx", int8=True)
    assert set(packing.read_storage(packed)["packed"].values()) == {4}
    assert packed.stat().st_size < 0.6 * path.stat().st_size
    with torch.no_grad():
        expected = model(images).numpy()
    for file in (path, packed):
        got = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"]).run(None, {"input": images.numpy()})
        assert (got[0].argmax(1) == expected.argmax(1)).mean() > 0.9  # the same integers either way
