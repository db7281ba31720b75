"""Reading YAML that users and sweeps write, within bounds: recipes, sweep files, ``--key=VALUE`` overrides.

- Numbers as YAML 1.2 reads them: ``2:4`` stays the string ``"2:4"`` (YAML 1.1, PyYAML's default, reads it
  as the base-60 integer 124) and ``1e-3`` is a float (PyYAML's default keeps it a string).
- Bounded: a file above :data:`MAX_BYTES`, or a document whose aliases expand to more than
  :data:`MAX_VALUES` values (a "billion laughs" of nested ``&a [*b, *b, ...]``), is refused before anything
  walks or formats it.
- Messages show a user's value through :func:`lightning_compress.errors.brief`: never unbounded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from lightning_compress.errors import CompressionConfigError

MAX_BYTES = 1 << 20  # a recipe or sweep file; real ones are a few hundred bytes
MAX_VALUES = 100_000  # values once every alias is expanded

_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 numbers (no base 60; exponents without a dot are floats)."""


_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _NUMBERS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse(text: str, what: str) -> Any:
    """One YAML document, bounded (see the module's notes).

    Raises:
        CompressionConfigError: ``what`` is too large, not YAML, or expands beyond :data:`MAX_VALUES`.
    """
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise CompressionConfigError(f"{what} is larger than {MAX_BYTES:,} bytes: not a recipe")
    try:
        value = yaml.load(text, Loader=RecipeLoader)  # a SafeLoader subclass: no Python objects
    except yaml.YAMLError as error:
        raise CompressionConfigError(f"{what} is not valid YAML: {_one_line(error)}") from None
    _within_bounds(value, what)
    return value


def read(path: str | os.PathLike[str], what: str) -> Any:
    """:func:`parse` of a file; a file that cannot be read is a :class:`CompressionConfigError` too."""
    try:
        size = Path(path).stat().st_size
        if size > MAX_BYTES:
            raise CompressionConfigError(f"{what} {str(path)!r} is larger than {MAX_BYTES:,} bytes: not a recipe")
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise CompressionConfigError(f"cannot read {what} {str(path)!r}: {error}") from None
    return parse(text, f"{what} {str(path)!r}")


def _within_bounds(value: Any, what: str) -> None:
    """Count the values as a walk over them would meet them (aliases once per use), up to :data:`MAX_VALUES`."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise CompressionConfigError(
                f"{what} expands to more than {MAX_VALUES:,} values (nested YAML aliases?): refused"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _one_line(error: yaml.YAMLError) -> str:
    return " ".join(str(error).split())[:300]
