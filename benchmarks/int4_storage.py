"""4-bit weights that take 4 bits: the packed int8 file vs the same weights stored a byte each, vs opset 21 INT4.

For each model: train fp32, then QAT at w4a8 (observed scales) in the same run; export the model three ways
from the same QAT state:

- ``int8-stored``: ``pack_weights=False``, the 4-bit integers a byte each (what the export wrote before);
- ``packed`` (the default now): two 4-bit codes a byte, unpacked by ONNX Runtime's constant folding at load;
- ``opset21-int4``: the int8-stored file rewritten to opset 21 with ``INT4`` (``UINT4`` for uint8 storage)
  ``DequantizeLinear`` weights: the standard's own 4-bit layout, to show what ONNX Runtime does with it.

Printed per file: bytes over the fp32 file's, batch-64 latency over the int8-stored file's (interleaved
rounds, median), session-creation time (median of repeats; the packed file unpacks there), and the ONNX
Runtime accuracy; the packed bundle is verified layer by layer against the fake-quant model (the int8
criterion) and its accuracy set beside the fake-quant model's.

Run: ``.venv/bin/python benchmarks/int4_storage.py`` (about 35 minutes on 2 cores);
``--models cnn_small --data digits --epochs 1 --rounds 2`` is a smoke test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from common import fit, get_datamodule, markdown, new_module, ort_figures, save
from onnx import helper, numpy_helper

from lightning_compress import QuantizationAwareTraining, export_onnx
from lightning_compress.deploy.bundle import write_bundle
from lightning_compress.deploy.measure import ort_session
from lightning_compress.deploy.onnx import float_copy
from lightning_compress.deploy.packing import pack_codes

DATA = {"cnn_wide": "mnist5k", "cnn_small": "mnist5k", "mobilenet_v2": "mnist5k32", "resnet18": "mnist5k32"}


def to_opset21_int4(source: Path, target: Path) -> int:
    """Rewrite the 4-bit weights of an int8-stored file as opset-21 INT4/UINT4 initializers; return how many."""
    proto = onnx.load(str(source))
    inits = {init.name: init for init in proto.graph.initializer}
    done = 0
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or not node.input[0].endswith("_int8") or len(node.input) < 3:
            continue
        values, zero = numpy_helper.to_array(inits[node.input[0]]), numpy_helper.to_array(inits[node.input[2]])
        signed = values.dtype == np.int8
        offset = 0 if signed else 120  # uint8 storage: zero point 128 -> UINT4's 8
        codes, zeros = values.astype(np.int32) - offset, zero.astype(np.int32) - offset
        low, high = (-8, 7) if signed else (0, 15)
        if codes.min() < low or codes.max() > high:
            continue
        kind = onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
        name, zero_name = node.input[0] + "4", f"{node.input[0]}4_zero"
        for key, ints, shape in ((name, codes, values.shape), (zero_name, zeros, zero.shape)):
            raw = pack_codes((ints & 15).astype(np.uint8), 4).tobytes()  # ONNX's 4-bit layout: low nibble first
            proto.graph.initializer.append(helper.make_tensor(key, kind, shape, raw, raw=True))
        node.input[0], node.input[2] = name, zero_name
        done += 1
    used = {name for node in proto.graph.node for name in node.input}
    for init in [i for i in proto.graph.initializer if i.name not in used]:
        proto.graph.initializer.remove(init)
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 21
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))
    return done


def load_ms(path: Path, repeats: int) -> float:
    """Median milliseconds to create an ONNX Runtime session for ``path`` (graph optimisation included)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session = ort_session(path)
        times.append(1000 * (time.perf_counter() - start))
        del session
    return statistics.median(times)


def run_model(model: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    data = args.data or DATA[model]
    module = new_module(model, data, args.seed)
    fit(module, data, args.epochs, args.seed)
    qat = QuantizationAwareTraining(weight_bits=4, calibration_batches=8, freeze_bn_epoch=args.qat_epochs - 1)
    fake_quant, _ = fit(module, data, args.qat_epochs, args.seed, [qat])
    module.eval()
    dm = get_datamodule(data, batch_size=250, seed=args.seed)
    dm.setup("fit")
    val = [(x, y) for x, y in dm.val_dataloader()]
    example = val[0][0][:1]
    paths = {
        "fp32": export_onnx(module.model, example, folder / f"{model}.fp32.onnx"),
        "int8-stored": export_onnx(
            module.model, example, folder / f"{model}.stored.onnx", int8=True, pack_weights=False
        ),
        "packed": export_onnx(module.model, example, folder / f"{model}.packed.onnx", int8=True),
    }
    paths["opset21-int4"] = folder / f"{model}.int4.onnx"
    rewritten = to_opset21_int4(paths["int8-stored"], paths["opset21-int4"])
    figures = ort_figures(paths, args.runs, args.rounds, spinning=(True,), data=data)
    for arm, path in paths.items():
        figures[arm]["load_ms"] = load_ms(path, args.load_repeats)
    report = write_bundle(
        module.model, float_copy(module.model), folder / f"{model}.bundle", example, val[:4], ["onnx_int8"],
        plots=False,
    )  # fmt: skip
    verification = report["verification"]["onnx_int8"]
    storage = report["files"]["onnx_int8"]["storage"]
    found = {
        "figures": figures, "fake_quant_acc": fake_quant, "verified": verification["passed"],
        "worst_off_share": verification["layers"]["worst_off_share"], "storage": storage,
        "int4_rewritten": rewritten,
    }  # fmt: skip
    print(f"{model}: {len(storage['packed'])} layers packed, verification passed={verification['passed']}, "
          f"fake-quant {100 * fake_quant:.2f}%", flush=True)  # fmt: skip
    return found


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = []
    for model, found in results.items():
        figures = found["figures"]
        fp32, stored = figures["fp32"], figures["int8-stored"]
        for arm, fig in figures.items():
            rows.append([
                model, arm, f"{fig['bytes'] / fp32['bytes']:.3f}",
                f"{fig['latency_ms_spin1'] / stored['latency_ms_spin1']:.2f}", f"{fig['load_ms']:.0f}",
                f"{100 * fig['acc']:.2f}",
            ])  # fmt: skip
        rows.append([model, "fake-quant (PyTorch)", "", "", "", f"{100 * found['fake_quant_acc']:.2f}"])
    header = ["model", "file", "bytes / fp32", "latency / int8-stored (batch 64)", "session load ms", "ORT top-1 %"]
    return markdown(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn_wide", "mobilenet_v2", "resnet18"], choices=sorted(DATA))
    parser.add_argument("--data", default=None, help="one dataset for every model (default: by model)")
    parser.add_argument("--epochs", type=int, default=2, help="fp32 epochs before QAT")
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=20, help="calls per latency sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--load-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            results[model] = run_model(model, args, Path(tmp))
    text = table(results)
    print(text)
    for model, found in results.items():
        fig = found["figures"]
        stored = fig["int8-stored"]
        print(f"{model}: packed bytes {fig['packed']['bytes'] / fig['fp32']['bytes']:.3f}x fp32 "
              f"({fig['packed']['bytes'] / stored['bytes']:.3f}x int8-stored); latency over int8-stored: packed "
              f"{fig['packed']['latency_ms_spin1'] / stored['latency_ms_spin1']:.2f}x, opset-21 INT4 "
              f"{fig['opset21-int4']['latency_ms_spin1'] / stored['latency_ms_spin1']:.2f}x; ORT accuracy packed == "
              f"int8-stored: {fig['packed']['acc'] == stored['acc']}; verified: {found['verified']} "
              f"(worst off share {found['worst_off_share']:.4f})")  # fmt: skip
    kwargs = {"directory": args.out} if args.out else {}
    save("int4_storage", {"args": vars(args) | {"out": str(args.out)}, "results": results}, **kwargs)


if __name__ == "__main__":
    main()
