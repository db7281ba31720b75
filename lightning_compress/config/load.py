"""Reading a recipe: bounded YAML 1.2 (:mod:`lightning_compress.config.reading`), dotted overrides in the
form ``wandb agent`` passes, validation.

``load_recipe(path, overrides=[...])`` applies ``compression.pruning.final_sparsity=0.95``-style
overrides and validates **everything at once** (:func:`lightning_compress.config.schema.validate`):
the error lists every problem with its key path, what is allowed and a did-you-mean.

Example::

    recipe = load_recipe("recipes/mnist5k/prune.yaml", ["compression.pruning.final_sparsity=0.95"])
    Trainer(callbacks=recipe.callbacks(), **recipe.trainer_kwargs()).fit(recipe.model(), recipe.datamodule())
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_compress.config.build import Recipe
from lightning_compress.config.reading import parse, read
from lightning_compress.config.schema import SECTIONS, keeps_text, validate
from lightning_compress.errors import CompressionConfigError


def load_recipe(
    path: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = (), python_path: Sequence[str] = ()
) -> Recipe:
    """Read, override and validate a recipe.

    ``python_path``: folders a ``class_path`` may be imported from, besides the recipe's own ``python_path``
    and the installed environment (see :mod:`lightning_compress.config.trust`).

    Raises:
        CompressionConfigError: every problem found, one per line, each with its key path.
    """
    if isinstance(path, Mapping):
        config, where = copy.deepcopy(dict(path)), None
    else:
        where = Path(path)
        config = read(where, "the recipe") or {}
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise CompressionConfigError(f"a recipe must be a mapping of sections {list(SECTIONS)}, got {kind}")
    problems = [p for item in overrides for p in _override(config, item)]
    recipe = Recipe(config, where, tuple(python_path))
    problems += validate(config, recipe.folders if not problems else ())
    if problems:
        raise CompressionConfigError("the recipe has problems:\n  - " + "\n  - ".join(problems))
    return recipe


def _override(config: dict[str, Any], item: str) -> list[str]:
    text = item[2:] if item.startswith("--") else item
    key, sep, raw = text.partition("=")
    if not sep or not key:
        return [f"override {item!r} must look like key.path=VALUE (e.g. compression.pruning.final_sparsity=0.9)"]
    try:
        value = parse(raw, f"the value of override {key!r}") if raw else None
    except CompressionConfigError as error:
        return [str(error)]
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return [f"override {key!r}: {part!r} is not a section"]
        node = child
    if raw and not isinstance(value, str) and keeps_text(config, parts, value, raw):
        value = raw  # typed where a string goes: `--compression.export.dirpath=2024` stays "2024"
    node[parts[-1]] = value
    return []
