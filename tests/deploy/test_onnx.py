import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from lightning_compress import ClassificationModule, QuantizationAwareTraining
from lightning_compress.core import quantization as q
from lightning_compress.core.graph import find_bn_pairs
from lightning_compress.core.layers import select_layers, weight_of
from lightning_compress.core.pruning import prune
from lightning_compress.deploy.onnx import export_onnx
from lightning_compress.deploy.packing import read_storage
from lightning_compress.errors import CompressionConfigError
from lightning_compress.vision.data import get_datamodule
from lightning_compress.vision.models import build_model

FLOAT_COMPUTE = {"Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm", "FusedMatMul"}


@pytest.fixture(scope="module")
def batches():
    dm = get_datamodule("mnist5k", batch_size=64)
    dm.setup("fit")
    loader = iter(dm.val_dataloader())
    return [next(loader)[0] for _ in range(4)]


def calibrated(name, batches, sparsity=0.0, config=None):
    """``name`` with QAT attached, BatchNorms folded, observers and BN statistics fed real batches."""
    torch.manual_seed(0)
    model = build_model(name)
    if sparsity:
        prune(model, sparsity)
    layers = q.attach(model, config or q.QuantConfig())
    q.link_batchnorms(model, find_bn_pairs(model, layers, batches[0][:2]))
    q.enable(model)
    model.train()
    with torch.no_grad():
        for x in batches[:3]:
            model(x)
    return model.eval()


def weight_ints(path):
    """The integer weights the file stores, as signed steps (stored value minus zero point) whatever
    their type (int8, or uint8 with zero point 128 where the CPU needs it) and storage (packed weights are
    read as ONNX Runtime holds them once it has loaded the file: its graph after constant folding)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path) + ".basic.onnx"
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0].endswith("_int8"):
            ints, zero = inits[node.input[0]], inits[node.input[2]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * ints.ndim
            if zero.size > 1:
                shape[axis] = -1
            out.append(ints.astype(np.int16) - zero.astype(np.int16).reshape(shape))
    return out


def session(path, optimized=None):
    options = ort.SessionOptions()
    if optimized:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_fp32_export_matches_torch_at_any_batch_size(tmp_path, batches):
    torch.manual_seed(0)
    model = build_model("cnn_tiny").eval()
    export_onnx(model, batches[0][:1], tmp_path / "m.onnx")
    run = session(tmp_path / "m.onnx")
    for x in (batches[3], batches[3][:1]):
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.allclose(run.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)


def test_fp32_export_of_a_qat_model_drops_fake_quant(tmp_path, batches):
    model = calibrated("cnn_tiny", batches)
    export_onnx(model, batches[0][:1], tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert "QuantizeLinear" not in ops and "Conv" in ops
    assert q.quantized_layers(model)  # the model itself is untouched


@pytest.fixture(scope="module")
def trained():
    """cnn_small trained for 40 steps with QAT on mnist5k (observers and BatchNorms settled)."""
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule("cnn_small")
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=40, limit_val_batches=0, callbacks=[QuantizationAwareTraining()],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=get_datamodule("mnist5k"))
    return module.model.eval()


def test_int8_runs_integer_kernels_and_agrees_within_one_step(tmp_path, batches, trained):
    model = trained
    export_onnx(model, batches[0][:1], tmp_path / "m.int8.onnx", int8=True)
    run = session(tmp_path / "m.int8.onnx", optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 2
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1  # one Q in, one DQ out
    assert not FLOAT_COMPUTE & set(ops), ops
    step = model.classifier[3].output_quant.qparams()[0]
    x = batches[3]
    with torch.no_grad():
        expected = model(x).numpy()
    got = run.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - expected).max() <= step * 1.001
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95  # ties within one step may flip


def test_uint8_weights_store_the_same_steps_and_run_exactly_on_any_cpu(tmp_path, batches, trained):
    """uint8 weights (zero point 128) hold the int8 file's values step for step, and ORT runs them with
    integer kernels within one output step of PyTorch on every CPU (u8u8 does not saturate)."""
    example = batches[0][:1]
    signed = export_onnx(trained, example, tmp_path / "s.int8.onnx", int8=True, int8_weights="int8")
    unsigned = export_onnx(trained, example, tmp_path / "u.int8.onnx", int8=True, int8_weights="uint8")
    stored = {i.name: numpy_helper.to_array(i) for i in onnx.load(unsigned).graph.initializer}
    types = {a.dtype for name, a in stored.items() if name.endswith("_int8")}
    assert types == {np.dtype(np.uint8)}
    a, b = weight_ints(signed), weight_ints(unsigned)
    assert len(a) == len(b) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    run = session(unsigned, optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 2 and not FLOAT_COMPUTE & set(ops)
    with torch.no_grad():
        expected = trained(batches[3]).numpy()
    step = trained.classifier[3].output_quant.qparams()[0]
    assert np.abs(run.run(None, {"input": batches[3].numpy()})[0] - expected).max() <= step * 1.001


def _dequantize_graph(zero_point, per_channel=False):
    """One weight ``DequantizeLinear``: int8 steps [-128, -1, 0, 127], scale 0.5 (or one per element), the given
    zero point input."""
    from onnx import TensorProto, helper

    scale = np.array([0.5, 0.25, 1.0, 2.0] if per_channel else 0.5, np.float32)
    inits = [numpy_helper.from_array(np.array([-128, -1, 0, 127], np.int8), "w_int8"),
             numpy_helper.from_array(scale, "w_scale")]  # fmt: skip
    inputs = ["w_int8", "w_scale"]
    nodes = []
    if zero_point is not None:
        inputs.append("w_zero")
        if isinstance(zero_point, str):  # computed at run time: not a constant
            nodes.append(helper.make_node("Identity", ["z_in"], ["w_zero"]))
        else:
            inits.append(numpy_helper.from_array(np.full(scale.shape, zero_point, np.int8), "w_zero"))
    nodes.append(helper.make_node("DequantizeLinear", inputs, ["w"], name="dq", axis=0))
    graph_inputs = [helper.make_tensor_value_info("z_in", TensorProto.INT8, [])] if isinstance(zero_point, str) else []
    graph = helper.make_graph(nodes, "g", graph_inputs, [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4])],
                              initializer=inits)  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("zero_point", [None, 0, 3])
def test_unsigned_weights_keep_every_value_whatever_the_zero_point(zero_point, per_channel):
    from onnx.reference import ReferenceEvaluator

    from lightning_compress.deploy.onnx import store_weights_unsigned

    model = _dequantize_graph(zero_point, per_channel)
    before = ReferenceEvaluator(model).run(None, {})[0]
    assert store_weights_unsigned(model) == 1
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert stored["w_int8"].dtype == np.uint8
    onnx.checker.check_model(model, full_check=True)  # the zero point has the scale's shape
    np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {})[0], before)


def test_unsigned_weights_refuse_a_zero_point_they_cannot_read():
    from lightning_compress.deploy.onnx import store_weights_unsigned

    with pytest.raises(ValueError, match=r"w_int8.*constant int8 zero point"):
        store_weights_unsigned(_dequantize_graph("computed"))


def test_auto_weight_type_follows_the_cpu(tmp_path, monkeypatch):
    from lightning_compress.deploy import cpu

    def exact(flags, machine="x86_64"):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
        cpu.u8s8_exact.cache_clear()
        try:
            return cpu.u8s8_exact(str(tmp_path / "cpuinfo"))
        finally:
            cpu.u8s8_exact.cache_clear()

    assert exact("avx2 avx512f avx512_vnni")[0] and exact("avx2 avx_vnni")[0]
    ok, why = exact("avx2 avx512f")
    assert not ok and "without VNNI" in why and "saturate" in why
    assert exact("", machine="aarch64")[0]
    assert cpu.resolve_weight_type("uint8") == ("uint8", "chosen")
    with pytest.raises(CompressionConfigError, match=r"int8_weights.*'auto', 'int8', 'uint8'.*got 'u8'"):
        cpu.resolve_weight_type("u8")


def test_int8_file_is_a_quarter_of_fp32(tmp_path, batches):
    model = calibrated("cnn_small", batches)
    int8 = export_onnx(model, batches[0][:1], tmp_path / "m.int8.onnx", int8=True)
    fp32 = export_onnx(model, batches[0][:1], tmp_path / "m.onnx")
    assert int8.stat().st_size <= 0.27 * fp32.stat().st_size


def test_four_bit_weights_export_on_their_grid(tmp_path, batches):
    model = calibrated("cnn_tiny", batches, config=q.QuantConfig(weight_bits=4))
    export_onnx(model, batches[0][:1], tmp_path / "m.int8.onnx", int8=True)
    weights = [a for a in weight_ints(tmp_path / "m.int8.onnx") if a.ndim > 1]
    assert len(weights) == 5 and all(np.abs(a).max() <= 7 for a in weights)
    got = session(tmp_path / "m.int8.onnx").run(None, {"input": batches[3].numpy()})[0]
    with torch.no_grad():
        assert (got.argmax(1) == model(batches[3]).numpy().argmax(1)).mean() > 0.95


@pytest.mark.parametrize("weights", ["int8", "uint8"])
def test_narrow_weights_are_packed_and_run_the_same_integer_kernels(tmp_path, batches, weights):
    model = calibrated("cnn_wide", batches)
    q.set_weight_bits(model, {"features.0": 4, "features.4": 4, "features.8": 4, "classifier.3": 2})
    example = batches[0][:1]
    packed = export_onnx(model, example, tmp_path / "p.int8.onnx", int8=True, int8_weights=weights)
    plain = export_onnx(model, example, tmp_path / "u.int8.onnx", int8=True, int8_weights=weights, pack_weights=False)
    storage = read_storage(packed)
    assert model.get_submodule("features.0").weight.numel() < 1000  # the 4-bit stem: its unpacking would outweigh it
    assert storage == {"packed": {"features.4": 4, "features.8": 4, "classifier.3": 2},
                       "int8_storage_reason": None}  # classifier.1 has 8 bits: a byte each
    assert read_storage(plain) is None  # not asked to pack: the file says nothing
    # the same integers, as ONNX Runtime holds them after loading, and the same outputs
    assert all((a == b).all() for a, b in zip(weight_ints(packed), weight_ints(plain), strict=True))
    runs = [session(path).run(None, {"input": batches[3].numpy()})[0] for path in (packed, plain)]
    assert (runs[0] == runs[1]).all()
    kernels = []
    for path in (packed, plain):
        session(path, optimized=str(path) + ".all.onnx")
        kernels.append(sorted(n.op_type for n in onnx.load(str(path) + ".all.onnx").graph.node))
    assert kernels[0] == kernels[1] and "QLinearConv" in kernels[0]  # packing changes no kernel
    size = {path: path.stat().st_size for path in (packed, plain)}
    narrow = sum(model.get_submodule(n).weight.numel() for n in storage["packed"])
    saved = size[plain] - size[packed]  # 4-bit: half a byte a weight saved, 2-bit three quarters
    expected = sum((0.5 if b == 4 else 0.75) * model.get_submodule(n).weight.numel()
                   for n, b in storage["packed"].items())
    overhead = expected - saved  # the unpacking nodes and constants: about 1.1 KB a tensor
    assert narrow > 0 and 0 <= overhead < 1536 * len(storage["packed"]), (saved, expected)


def test_pruned_weights_are_zero_in_the_int8_file(tmp_path, batches):
    model = calibrated("cnn_small", batches, sparsity=0.8)
    stored = {tuple(weight_of(m).shape): (weight_of(m) == 0).numpy() for m in select_layers(model).values()}
    export_onnx(model, batches[0][:1], tmp_path / "m.int8.onnx", int8=True)
    int8 = {a.shape: a for a in weight_ints(tmp_path / "m.int8.onnx") if a.ndim > 1}
    assert int8.keys() == stored.keys()
    pruned = sum(int(mask.sum()) for mask in stored.values())
    assert pruned >= 0.8 * sum(mask.size for mask in stored.values()) - 5
    for shape, mask in stored.items():
        assert (int8[shape][mask] == 0).all(), shape  # every pruned weight is an int8 zero


def test_int8_needs_qat_state(tmp_path, batches):
    with pytest.raises(CompressionConfigError, match=r"int8 export needs QAT state.*HINT: train with"):
        export_onnx(build_model("cnn_tiny"), batches[0][:1], tmp_path / "m.onnx", int8=True)


def test_unwritable_folder_is_a_clear_error(tmp_path, batches):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CompressionConfigError, match="cannot write the ONNX file"):
        export_onnx(build_model("cnn_tiny"), batches[0][:1], tmp_path / "file" / "m.onnx")


def test_interrupted_write_leaves_no_file(tmp_path, batches, monkeypatch):
    def broken_save(proto, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(build_model("cnn_tiny"), batches[0][:1], tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_pruned_channel_keeps_its_bias_in_int8(tmp_path, batches, trained):
    import copy

    model = copy.deepcopy(trained)
    linear = model.classifier[3]
    with torch.no_grad():  # output 0: every weight pruned, a bias that matters
        linear.parametrizations.weight.original[0] = 0.0
        linear.bias[0] = 3.0
    export_onnx(model, batches[0][:1], tmp_path / "m.int8.onnx", int8=True)
    x = batches[3]
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    got = session(tmp_path / "m.int8.onnx").run(None, {"input": x.numpy()})[0]
    step = linear.output_quant.qparams()[0]
    assert np.abs(got[:, 0] - expected[:, 0]).max() <= step * 1.001  # not clipped to ±2**31 steps of ~0


def test_relu6_between_layers_shares_one_range_and_runs_as_one_integer_chain(tmp_path, batches):
    """Conv-BN-ReLU6 (MobileNet's block): the next layer's input range serves the Conv's output, so the
    file has one QuantizeLinear per tensor, ONNX Runtime drops the Clip into the quantisation and runs
    the chain on integer kernels, and the file still agrees with the fake-quant model within one step."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(inplace=True),
        torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.BatchNorm2d(8), torch.nn.Hardtanh(-1.0, 6.0),
        torch.nn.Conv2d(8, 4, 1), torch.nn.Hardtanh(0.5, 2.0), torch.nn.Flatten(), torch.nn.LazyLinear(10),
    )  # fmt: skip
    net(batches[0][:2])
    q.calibrate(net, batches[:2])
    assert q.share_ranges(net, batches[0][:2]) == ["0", "3"]  # Hardtanh(0.5, 2) clips 0: its input keeps a range
    path = export_onnx(net, batches[0][:1], tmp_path / "relu6.int8.onnx", int8=True)
    run = session(path, optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearConv") == 3 and ops.count("QGemm") == 1 and not FLOAT_COMPUTE & set(ops), ops
    assert ops.count("Clip") == 1  # only Hardtanh(0.5, 2): a float clip between a DQ and a Q
    step = net[9].output_quant.qparams()[0]
    with torch.no_grad():
        expected = net(batches[3]).numpy()
    assert np.abs(run.run(None, {"input": batches[3].numpy()})[0] - expected).max() <= step * 1.001


def test_residual_sums_run_as_integer_adds_and_agree_within_one_step(tmp_path):
    """A user's MobileNetV2-style blocks (``x + f(x)``, and EfficientNet's in-place ``out += x``): the sums of two
    quantised tensors are quantised too, so ONNX Runtime adds them with QLinearAdd, every Conv runs on integer
    kernels, and the file agrees with the fake-quant model within one step of its output."""
    from tests.helpers import ResidualNet

    torch.manual_seed(0)
    net, images = ResidualNet(), torch.randn(96, 1, 8, 8)
    done = q.calibrate(net, [images[i : i + 32] for i in range(0, 64, 32)])
    assert done.sums == ["blocks.0", "blocks.1"]
    path = export_onnx(net, images[:1], tmp_path / "residual.int8.onnx", int8=True)
    run = session(path, optimized=tmp_path / "opt.onnx")
    ops = [n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node]
    assert ops.count("QLinearAdd") == 2 and "Add" not in ops and not FLOAT_COMPUTE & set(ops), ops
    assert ops.count("QLinearConv") == 5, ops
    step = net.head[2].output_quant.qparams()[0]
    with torch.no_grad():
        expected = net(images[64:]).numpy()
    assert np.abs(run.run(None, {"input": images[64:].numpy()})[0] - expected).max() <= step * 1.001
