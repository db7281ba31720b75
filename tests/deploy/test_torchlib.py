"""torch's ATen -> ONNX table built once per process (:mod:`lightning_compress.deploy.torchlib`)."""

import onnx
import torch
from torch import nn
from torch.onnx._internal.exporter import _registration

from lightning_compress.deploy import torchlib
from lightning_compress.deploy.onnx import export_onnx


def test_each_export_gets_its_own_copy_of_one_table_and_torch_gets_its_method_back():
    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    fresh = _registration.ONNXRegistry.from_torchlib(opset_version=18)
    with torchlib.torchlib_once():
        first = _registration.ONNXRegistry().from_torchlib(opset_version=18)
        first.functions.setdefault("a custom op", []).append("its translation")  # as custom_translation_table does
        second = _registration.ONNXRegistry.from_torchlib(opset_version=18)
    assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original
    assert first is not second and "a custom op" not in second.functions  # one export's ops stay its own
    assert second.opset_version == fresh.opset_version == 18
    assert set(second.functions) == set(fresh.functions)
    assert all(len(second.functions[t]) == len(fresh.functions[t]) for t in fresh.functions)


def test_a_file_exported_with_the_table_is_the_file_torch_writes(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.randn(2, 1, 6, 6)
    ours = export_onnx(model, x, tmp_path / "ours.onnx")
    with torch.no_grad():
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))  # fmt: skip
    theirs = program.model_proto
    assert [n.op_type for n in onnx.load(ours).graph.node] == [n.op_type for n in theirs.graph.node]


def test_where_torch_has_no_such_table_nothing_is_patched(monkeypatch):
    monkeypatch.setattr(torchlib, "_registry_class", lambda: None)
    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    with torchlib.torchlib_once():
        assert _registration.ONNXRegistry.__dict__["from_torchlib"] is original
