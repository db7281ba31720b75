import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from lightning_compress.core.sensitivity import Setting
from lightning_compress.deploy.cost import CostModel, LayerCall, Option, layer_calls, layer_graph, static_costs

MODEL = nn.Sequential(
    nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 32, 3, stride=2, padding=1), nn.Flatten(),
    nn.Linear(8192, 10),
)
OPTIONS = [Option(), Option(bits=8), Option(Setting("channels", 0.5)), Option(Setting("low_rank", 0.25), 8),
           Option(Setting("sparsity", 0.9))]  # fmt: skip


def test_layer_calls_record_the_shapes_the_forward_pass_uses():
    calls = layer_calls(MODEL, torch.zeros(1, 3, 32, 32))
    assert set(calls) == {"0", "2", "4"}
    assert calls["2"] == LayerCall("conv", 64, 32, (1, 64, 32, 32), (3, 3), (2, 2), (1, 1), (1, 1), 1, True)
    assert calls["2"].positions() == 256 and calls["4"].input_shape == (1, 8192)


def test_static_costs_by_hand():
    call = layer_calls(MODEL, torch.zeros(1, 3, 32, 32))["0"]  # 3 -> 64, 3x3, 32x32 outputs
    assert static_costs(call, Option()) == {"params": 1792, "macs": 1024 * 1728, "bytes": 1792 * 4}
    assert static_costs(call, Option(bits=8))["bytes"] == 1728 + 64 * 4  # int8 weights, int32 biases
    assert static_costs(call, Option(bits=4))["bytes"] == 1728 / 2 + 64 * 4  # packed two to a byte
    assert static_costs(call, Option(bits=2))["bytes"] == 1728 / 4 + 64 * 4  # four to a byte
    assert static_costs(call, Option(bits=6))["bytes"] == 1728 + 64 * 4  # 5-8 bits: a byte each
    rank = 4  # floor(0.25 * 64 * 27 / (64 + 27))
    assert static_costs(call, Option(Setting("low_rank", 0.25)))["params"] == rank * 27 + 64 * rank + 64
    half = static_costs(call, Option(Setting("channels", 0.5)))
    assert half["params"] == 32 * 27 + 32 and half["macs"] == 1024 * 32 * 27
    sparse = static_costs(call, Option(Setting("sparsity", 0.9)))
    assert sparse["params"] == round(1728 * 0.1) + 64 and sparse["bytes"] == 173 * 4 + 216 + 64 * 4  # bitmap


@pytest.mark.parametrize("option", OPTIONS, ids=[str(o) for o in OPTIONS])
def test_one_layer_graphs_are_valid_run_and_give_the_layers_output_shape(option, tmp_path):
    calls = layer_calls(MODEL, torch.zeros(1, 3, 32, 32))
    for name, call in calls.items():
        graph = layer_graph(call, option, batch_size=4)
        onnx.checker.check_model(graph, full_check=True)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        spec = session.get_inputs()[0]
        out = session.run(None, {spec.name: np.zeros(spec.shape, np.float32)})[0]
        with torch.no_grad():
            full = MODEL[int(name)](torch.zeros(4, *call.input_shape[1:]))
        channels = full.shape[1] // 2 if option.structure and option.structure.kind == "channels" else full.shape[1]
        assert out.shape == (4, channels, *full.shape[2:])
        ops = {node.op_type for node in onnx.load(tmp_path / f"{name}.onnx").graph.node}
        if option.bits:  # what is timed is ONNX Runtime's integer kernel, not float ops between Q/DQ
            assert ops & {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat"}, ops
            assert "Conv" not in ops and "Gemm" not in ops


def test_latencies_are_measured_once_and_cached(tmp_path):
    cache = tmp_path / "latency.json"
    call = layer_calls(MODEL, torch.zeros(1, 3, 32, 32))["2"]
    first = CostModel(8, runs=3, cache=cache)
    table = first.table({"2": call}, {"2": OPTIONS})
    assert first.measured == 4  # sparsity costs the dense latency: ONNX Runtime has no sparse kernels
    assert table["2"]["sparsity=0.9,float"]["latency_ms"] == table["2"]["dense,float"]["latency_ms"]
    assert all(row["latency_ms"] > 0 for row in table["2"].values())
    again = CostModel(8, runs=3, cache=cache)
    assert again.table({"2": call}, {"2": OPTIONS}) == table and again.measured == 0
    assert CostModel(16, runs=3, cache=cache).latency_ms(call, Option()) > 0  # another batch size: measured
