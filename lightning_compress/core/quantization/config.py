"""Quantisation settings: :class:`QuantConfig`, a frozen dataclass validated in ``__post_init__``.

No Lightning here; imports only :mod:`lightning_compress.errors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lightning_compress.errors import config_error, did_you_mean, one_of

OBSERVERS = ("minmax", "ema")
SCALES = ("observed", "learned")


WEIGHT_BITS = (2, 8)  # the widths fake quantisation supports (stored as int8 in an exported model)


def check_weight_bits(name: str, bits: Any) -> int:
    """``bits`` if it is a weight bit-width we support (an integer from 2 to 8), else an error naming ``name``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not WEIGHT_BITS[0] <= bits <= WEIGHT_BITS[1]:
        raise config_error(name, f"an integer from {WEIGHT_BITS[0]} to {WEIGHT_BITS[1]}", bits)
    return bits


@dataclass(frozen=True)
class QuantConfig:
    """How to fake-quantise.

    Args:
        weight_bits: weight bits, 2–8 (symmetric, zero point 0, range ``±(2**(bits-1) - 1)``; in an exported
            int8 file 5–8 bits take a byte, 3–4 half a byte, 2 a quarter: see :mod:`lightning_compress.deploy.packing`).
        activation_bits: activation bits: 8 (affine, unsigned).
        per_channel: one weight scale per output channel (else one per tensor).
        observer: ``minmax`` (running min/max of all batches) or ``ema`` (moving average of each
            batch's min/max, Krishnamoorthi 2018).
        ema_decay: the moving average's decay for ``ema``, reached after a warm-up
            (``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` batches).
        fold_bn: quantise Conv weights with the following BatchNorm folded in.
        scales: ``observed`` (weight scales from ``max|w|``, activation ranges from the observer, all along)
            or ``learned``: step sizes trained by gradient descent from a calibrated start (LSQ, Esser et
            al. 2020), weights (per channel) and layer inputs / outputs; residual-sum ranges stay observed.
    """

    weight_bits: int = 8
    activation_bits: int = 8
    per_channel: bool = True
    observer: str = "ema"
    ema_decay: float = 0.99
    fold_bn: bool = True
    scales: str = "observed"

    def __post_init__(self) -> None:
        check_weight_bits("weight_bits", self.weight_bits)
        if self.activation_bits != 8 or isinstance(self.activation_bits, bool):
            allowed = "8 (activations are uint8 in the exported model)"
            raise config_error("activation_bits", allowed, self.activation_bits)
        if self.observer not in OBSERVERS:
            hint = did_you_mean(str(self.observer), OBSERVERS)
            raise config_error("observer", one_of(OBSERVERS), self.observer, hint)
        if self.scales not in SCALES:
            raise config_error("scales", one_of(SCALES), self.scales, did_you_mean(str(self.scales), SCALES))
        if not isinstance(self.ema_decay, float) or not 0.0 < self.ema_decay < 1.0:
            raise config_error("ema_decay", "a float in (0, 1)", self.ema_decay)
        for name in ("per_channel", "fold_bn"):
            if not isinstance(getattr(self, name), bool):
                raise config_error(name, "True or False", getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (round-trips through :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        """Build from a plain dict; unknown keys are an error naming the known ones."""
        known = set(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise config_error("quantization key", one_of(sorted(known)), key, did_you_mean(key, known))
        return cls(**data)
