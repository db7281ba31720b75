"""Which layers the techniques work on: the one Conv/Linear type list, selection by name, the stored weight.

No Lightning here. Pruning, quantisation, low-rank factorisation, the model analysis and the
export all select layers through :func:`select_layers` and read weights through :func:`weight_of`,
so a layer under fake quantisation (a parametrized ``weight``) is seen the same way by all of them.

Example::

    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> list(select_layers(model))
    ['0', '2']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import cast

from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_compress.errors import config_error, did_you_mean

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Internal:
    """Marks a module this package attaches to a model (a fake quantiser): no layer of the user's model.

    The model analysis, signatures and layer selection look past such modules.
    """


def is_internal(name: str, module: nn.Module) -> bool:
    """Whether ``module`` (named ``name`` in its model) is this package's or a parametrization container."""
    return isinstance(module, Internal) or ".parametrizations" in f".{name}"


def weight_of(module: nn.Module) -> Tensor:
    """The ``weight`` parameter of a Conv/Linear module: the stored one, also under a parametrization
    (e.g. fake quantisation), where ``module.weight`` is computed from it."""
    if parametrize.is_parametrized(module, "weight"):
        return cast(Tensor, module.parametrizations.weight.original)  # type: ignore[union-attr]
    return cast(Tensor, module.weight)


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches any of the ``fnmatch`` patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: tuple[type[nn.Module], ...] = LAYER_TYPES,
) -> dict[str, nn.Module]:
    """Pick layers by qualified name.

    Args:
        model: the model.
        include: ``fnmatch`` patterns of module names (``"features.*"``); ``None`` selects every
            layer of ``types``. Each pattern must match at least one such layer.
        exclude: patterns of names to leave alone.
        types: the module types to select from (default every Conv and Linear).

    Returns:
        ``{qualified name: module}`` in registration order.

    Raises:
        CompressionConfigError: an ``include`` pattern matches no layer of ``types``.
    """
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, types)}
    if include is not None:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
                hint = did_you_mean(pattern, candidates) or f"prunable layers are {sorted(candidates)[:12]}"
                raise config_error("include", "patterns that match Conv/Linear module names", pattern, hint)
        candidates = {n: m for n, m in candidates.items() if matches(n, include)}
    if exclude:
        candidates = {n: m for n, m in candidates.items() if not matches(n, exclude)}
    return candidates
