"""Which int8 weight type ONNX Runtime computes exactly on this CPU.

ONNX Runtime runs a QDQ file's ``QLinearConv``/``QGemm`` with uint8 activations and the weights' own type.
With int8 weights (u8s8) on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI: many AMD EPYC and
older Xeons), its kernels add pairs of u8 x s8 products in int16 (``vpmaddubsw``), which saturates at
32767: a layer whose inputs and weights are both large comes out wrong by tens of quantisation steps
(seen here: 17% of a first convolution's outputs off by up to 67 steps). ORT documents the problem and
two ways round it, 7-bit weights (``reduce_range``) or uint8 weights (u8u8), whose kernels widen to
int16 before multiplying and are exact. The export keeps the trained weights and stores them as
uint8 with zero point 128 where the CPU needs it: the same values, no retraining, integer kernels still.

``auto`` decides by the CPU the export runs on (and is verified on): int8 where ORT's u8s8 kernels are
exact (x86 with AVX-VNNI or AVX-512 VNNI, ARM), uint8 elsewhere. A file built on one machine for
another chooses explicitly (``uint8`` runs exactly everywhere; ``int8`` is faster on VNNI and ARM).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Literal

from lightning_compress.errors import config_error, one_of

WeightType = Literal["auto", "int8", "uint8"]
StoredType = Literal["int8", "uint8"]
WEIGHT_TYPES = ("auto", "int8", "uint8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx512vnni")


@functools.cache
def u8s8_exact(cpuinfo: str = "/proc/cpuinfo") -> tuple[bool, str]:
    """Whether ORT's u8s8 kernels are exact on this CPU, and why (one line, for the report and logs)."""
    machine = platform.machine().lower()
    if machine == "aarch64" or machine.startswith("arm"):  # arm64, armv8l, ...
        return True, f"an {machine} CPU (ORT's int8 dot products do not saturate)"
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False, f"a {machine or 'unknown'} CPU (not known to run ORT's u8s8 kernels exactly)"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path(cpuinfo).read_text().splitlines()
                      if line.startswith("flags")), [])  # fmt: skip
    except OSError:
        return False, "an x86 CPU whose features cannot be read (VNNI not known)"
    vnni = next((f for f in VNNI_FLAGS if f in flags), None)
    if vnni:
        return True, f"an x86 CPU with {vnni} (ORT's u8s8 kernels are exact)"
    return False, "an x86 CPU without VNNI (ORT's u8s8 kernels add pairs in int16 and saturate)"


def resolve_weight_type(choice: str) -> tuple[StoredType, str]:
    """``(int8 | uint8, reason)`` for a :data:`WeightType`."""
    if choice not in WEIGHT_TYPES:
        raise config_error("int8_weights", one_of(WEIGHT_TYPES), choice)
    if choice == "int8":
        return "int8", "chosen"
    if choice == "uint8":
        return "uint8", "chosen"
    exact, why = u8s8_exact()
    return ("int8" if exact else "uint8"), f"auto: {why}"
