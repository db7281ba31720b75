"""Weights narrower than 8 bits stored packed in the int8 ONNX file: a 4-bit weight takes half a byte, 2-bit a quarter.

No Lightning here. What ONNX Runtime runs (measured with 1.32 on x86_64, ``benchmarks/int4_storage.py``):
opset 21's ``INT4`` ``DequantizeLinear`` loads, but its QDQ fusion needs 8-bit weights, so the layer
stays a float ``Conv`` behind a per-run dequantisation (about 5x the int8 file's latency on a 64-channel
conv). So the file keeps opset 18 and 8-bit ``DequantizeLinear`` weights, and stores their integers
packed into ``uint8`` bytes (two 4-bit codes, or four 2-bit codes, per byte) behind standard operators
that unpack them (``BitShift``, ``BitwiseAnd``, ``Reshape``, ``Cast``, ``Add``). Every input of those is
a constant, so ONNX Runtime's constant folding runs them once, when the session is created: the session
holds the same int8 tensors as the unpacked file and fuses ``QLinearConv`` / ``QGemm`` as before — the
same kernels, latency and outputs, a smaller file.

A tensor is packed when its stored integers span fewer than 16 (or 4) values, whatever the layer's
nominal width (the codes are the integers minus the tensor's smallest: lossless by construction), and
packing makes the file smaller (the unpacking takes about 1 KB a tensor: a layer of a few thousand
weights or fewer stays a byte a weight).
:func:`unfolded_reason` checks that this ONNX Runtime folds the unpacking at load; where it does not,
the export keeps int8 storage and says why (:data:`STORAGE_KEY` in the file's metadata, a warning).

Example::

    packed = pack_weights(proto)          # {tensor: bits} of what was packed
    reason = unfolded_reason(proto)       # None: ONNX Runtime unpacks at load
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_compress.errors import OptionalModule, require

if TYPE_CHECKING:
    import onnx
    from onnx import helper, numpy_helper
else:  # the `export` extra
    onnx = OptionalModule("onnx", "export", "the ONNX export")
    helper = OptionalModule("onnx.helper", "export", "the ONNX export")
    numpy_helper = OptionalModule("onnx.numpy_helper", "export", "the ONNX export")

PACKED_BITS = (2, 4)  # the narrowest first
STORAGE_KEY = "lightning_compress.weight_storage"  # model metadata: what the file stores and why
UNPACK = "lc_unpack/"  # the prefix of every unpacking node's name
WEIGHT_SUFFIX = "_int8"  # fold_weight_quantizers' name for an integer weight tensor
_SCALE_SUFFIX = ".parametrizations.weight.0.scale"  # a weight DequantizeLinear's scale: names the layer


@dataclass(frozen=True)
class PackedTensor:
    """One packed weight tensor: the layer it belongs to (as the file names it), its bits, its elements."""

    layer: str
    bits: int
    elements: int


def storage_bits(values: np.ndarray) -> int | None:
    """The narrowest of :data:`PACKED_BITS` whose codes hold every value of ``values`` (integers), or None."""
    if values.size == 0:
        return None
    span = int(values.max()) - int(values.min())
    return next((bits for bits in PACKED_BITS if span < 2**bits), None)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes in ``[0, 2**bits)`` packed little-end first: code ``i * per_byte + j`` in bits ``j*bits...`` of
    byte ``i``; shape ``[bytes, 1]`` (the unpacking broadcasts it against the shifts)."""
    per_byte = 8 // bits
    codes = codes.reshape(-1).astype(np.uint8)
    flat = np.concatenate([codes, np.zeros((-codes.size) % per_byte, np.uint8)]).reshape(-1, per_byte)
    packed = np.zeros(flat.shape[0], np.uint8)
    for slot in range(per_byte):
        packed |= (flat[:, slot] << (slot * bits)).astype(np.uint8)
    return packed.reshape(-1, 1)


def unpack_codes(packed: np.ndarray, bits: int, elements: int) -> np.ndarray:
    """:func:`pack_codes` undone (what the file's unpacking operators compute), flat."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, -1)
    return ((packed.reshape(-1, 1) >> shifts) & (2**bits - 1)).reshape(-1)[:elements]


def _shared(bits: int) -> dict[str, np.ndarray]:
    """The unpacking constants every tensor of ``bits`` bits reads."""
    return {
        f"{UNPACK}shifts{bits}": np.arange(0, 8, bits, dtype=np.uint8).reshape(1, -1),
        f"{UNPACK}mask{bits}": np.array(2**bits - 1, np.uint8),
        f"{UNPACK}flat": np.array([-1], np.int64),
        f"{UNPACK}start": np.array([0], np.int64),
    }


def _layer(graph: onnx.GraphProto, tensor: str) -> str:
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == tensor:
            return node.input[1].removesuffix(_SCALE_SUFFIX)
    return tensor


def pack_weights(model: onnx.ModelProto) -> dict[str, PackedTensor]:
    """Store every integer weight whose values span fewer than 16 steps packed (:func:`storage_bits`), in place,
    where that makes the file smaller.

    The tensor keeps its name and type: the last unpacking node outputs it. Run after
    :func:`~lightning_compress.deploy.onnx.fold_weight_quantizers`, ``quantize_biases`` and
    ``store_weights_unsigned`` (which read the integer tensors). Returns ``{tensor: PackedTensor}``.
    """
    graph = model.graph
    readers = {name for node in graph.node if node.op_type == "DequantizeLinear" for name in node.input[:1]}
    packed: dict[str, PackedTensor] = {}
    nodes: list[onnx.NodeProto] = []
    shared: set[str] = set()
    for init in list(graph.initializer):
        if not init.name.endswith(WEIGHT_SUFFIX) or init.name not in readers:
            continue
        values = numpy_helper.to_array(init)
        bits = storage_bits(values) if values.dtype in (np.int8, np.uint8) else None
        if bits is None:
            continue
        base = int(values.min())
        codes = (values.astype(np.int32) - base).astype(np.uint8)
        name, stem = init.name, UNPACK + init.name
        own = [
            numpy_helper.from_array(array, key)
            for key, array in {
                f"{stem}/packed": pack_codes(codes, bits),
                f"{stem}/end": np.array([values.size], np.int64),
                f"{stem}/shape": np.array(values.shape, np.int64),
                f"{stem}/base": np.array(base, np.int32),
            }.items()
        ]
        common = [numpy_helper.from_array(array, key) for key, array in _shared(bits).items() if key not in shared]
        target = onnx.TensorProto.INT8 if values.dtype == np.int8 else onnx.TensorProto.UINT8
        steps: list[tuple[str, list[str | None], dict[str, Any]]] = [
            ("BitShift", [f"{stem}/packed", f"{UNPACK}shifts{bits}"], {"direction": "RIGHT"}),
            ("BitwiseAnd", [None, f"{UNPACK}mask{bits}"], {}),
            ("Reshape", [None, f"{UNPACK}flat"], {}),
            ("Slice", [None, f"{UNPACK}start", f"{stem}/end"], {}),  # the padding of the last byte off
            ("Reshape", [None, f"{stem}/shape"], {}),
            ("Cast", [None], {"to": onnx.TensorProto.INT32}),
            ("Add", [None, f"{stem}/base"], {}),
            ("Cast", [None], {"to": target}),
        ]
        unpack: list[onnx.NodeProto] = []
        previous = ""
        for i, (op, inputs, attributes) in enumerate(steps):
            output = name if i == len(steps) - 1 else f"{stem}/{i}"
            wired = [previous if item is None else item for item in inputs]
            unpack.append(helper.make_node(op, wired, [output], name=f"{stem}/{i}", **attributes))
            previous = output
        if sum(t.ByteSize() for t in own + common) + sum(n.ByteSize() for n in unpack) >= init.ByteSize():
            continue  # a small tensor: its unpacking would take more bytes than packing saves
        graph.initializer.extend([*own, *common])
        shared.update(t.name for t in common)
        nodes.extend(unpack)
        graph.initializer.remove(init)
        packed[name] = PackedTensor(_layer(graph, name), bits, int(values.size))
    for node in reversed(nodes):  # constants only: ahead of every other node keeps the graph sorted
        graph.node.insert(0, node)
    return packed


def unfolded_reason(model: onnx.ModelProto) -> str | None:
    """Why ONNX Runtime would unpack at every run instead of once at load, or ``None`` where it folds every
    unpacking node (checked by loading ``model`` at ``ORT_ENABLE_BASIC`` and reading back the optimised graph)."""
    ort = require("onnxruntime", "export", "the packed 4-bit export")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "basic.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            return f"ONNX Runtime {ort.__version__} cannot load the packed file ({type(err).__name__}: {err})"
        left = [node.name for node in onnx.load(options.optimized_model_filepath).graph.node]
    left = [name for name in left if name.startswith(UNPACK)]
    if left:
        return (
            f"ONNX Runtime {ort.__version__} does not fold {len(left)} unpacking operators at load "
            f"(e.g. {left[0]!r}): they would run at every inference"
        )
    return None


def describe_storage(packed: dict[str, PackedTensor], reason: str | None = None, prefix: str = "") -> dict[str, Any]:
    """The file's storage statement: ``{"packed": {layer: bits}, "int8_storage_reason": reason}``, layer names
    without ``prefix`` (a wrapper's, e.g. ``model.``)."""
    return {"packed": {t.layer.removeprefix(prefix): t.bits for t in packed.values()}, "int8_storage_reason": reason}


def set_storage(model: onnx.ModelProto, storage: dict[str, Any]) -> None:
    """Write :func:`describe_storage` into the file's metadata (:data:`STORAGE_KEY`, JSON)."""
    for entry in list(model.metadata_props):
        if entry.key == STORAGE_KEY:
            model.metadata_props.remove(entry)
    model.metadata_props.append(onnx.StringStringEntryProto(key=STORAGE_KEY, value=json.dumps(storage)))


def read_storage(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What an int8 file says about its weight storage (:func:`set_storage`), or ``None`` where it says nothing."""
    proto = onnx.load(str(Path(path)), load_external_data=False)
    entry = next((e.value for e in proto.metadata_props if e.key == STORAGE_KEY), None)
    return json.loads(entry) if entry is not None else None
