"""Reading a recipe: ``yaml.safe_load``, dotted overrides in the form ``wandb agent`` passes, validation.

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

import yaml

from lightning_compress.config.build import Recipe
from lightning_compress.config.schema import SECTIONS, validate
from lightning_compress.errors import CompressionConfigError


def load_recipe(path: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Raises:
        CompressionConfigError: every problem found, one per line, each with its key path.
    """
    if isinstance(path, Mapping):
        config, where = copy.deepcopy(dict(path)), None
    else:
        where = Path(path)
        try:
            config = yaml.safe_load(where.read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise CompressionConfigError(f"cannot read the recipe {str(path)!r}: {error}") from None
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise CompressionConfigError(f"a recipe must be a mapping of sections {list(SECTIONS)}, got {kind}")
    problems = [p for item in overrides for p in _override(config, item)]
    problems += validate(config)
    if problems:
        raise CompressionConfigError("the recipe has problems:\n  - " + "\n  - ".join(problems))
    return Recipe(config, where)


def _override(config: dict[str, Any], item: str) -> list[str]:
    text = item[2:] if item.startswith("--") else item
    key, sep, raw = text.partition("=")
    if not sep or not key:
        return [f"override {item!r} must look like key.path=VALUE (e.g. compression.pruning.final_sparsity=0.9)"]
    value = yaml.safe_load(raw) if raw else None
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            return [f"override {key!r}: {part!r} is not a section"]
        node = child
    node[parts[-1]] = value
    return []
