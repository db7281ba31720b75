"""What a recipe may say: its sections, every key's type and range, with did-you-mean, all problems at once.

:func:`validate` returns every problem of a recipe as a ``key.path: message`` line (empty when
valid): unknown sections and keys (with a did-you-mean), values whose YAML type cannot fit the
constructor's annotation (model, data, Trainer, every callback), unknown model / data / optimizer
names, and ``class_path`` entries that are not importable classes of the expected Lightning base.
"""

from __future__ import annotations

import collections.abc
import functools
import importlib
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_compress.errors import CompressionConfigError, did_you_mean

SECTIONS = ("model", "data", "trainer", "compression", "logger", "seed")
LOGGERS = ("wandb", "csv")
COMPRESSION = ("low_rank", "pruning", "quantization", "distillation", "export")


def callback_factories() -> dict[str, Callable[..., Any]]:
    """``{recipe section: callback class}`` of the ``compression`` section."""
    from lightning_compress.callbacks import (
        CompressionExport,
        KnowledgeDistillation,
        LowRankFactorization,
        MagnitudePruning,
        QuantizationAwareTraining,
    )

    return {
        "low_rank": LowRankFactorization,
        "pruning": MagnitudePruning,
        "quantization": QuantizationAwareTraining,
        "distillation": KnowledgeDistillation,
        "export": CompressionExport,
    }


def validate(config: Mapping[str, Any]) -> list[str]:
    """Every problem of a recipe, as ``key.path: message`` lines (empty when it is valid)."""
    problems = [_unknown(key, SECTIONS, "") for key in config if key not in SECTIONS]
    if "seed" in config and (not isinstance(config["seed"], int) or isinstance(config["seed"], bool)):
        problems.append(f"seed: must be an integer, got {config['seed']!r}")
    for section in ("model", "data", "trainer", "compression", "logger"):
        value = config.get(section)
        if value is not None and not isinstance(value, dict):
            problems.append(f"{section}: must be a mapping, got {type(value).__name__}")
    if problems:
        return problems
    problems += _check_model(config.get("model") or {})
    problems += _check_data(config.get("data") or {})
    problems += _check_trainer(config.get("trainer") or {})
    problems += _check_compression(config.get("compression") or {})
    problems += _check_logger(config.get("logger") or {})
    for section, base in (("model", "LightningModule"), ("data", "LightningDataModule")):
        value = config.get(section) or {}
        if "class_path" in value:
            try:
                import_class(value["class_path"], f"{section}.class_path", base)
            except CompressionConfigError as error:
                problems.append(str(error))
    return problems


def _unknown(key: str, allowed: Sequence[str], prefix: str, what: str | None = None) -> str:
    hint = did_you_mean(str(key), allowed)
    return f"{prefix}{key}: unknown key; allowed: {what or ', '.join(allowed)}" + (f". HINT: {hint}" if hint else "")


def _unknown_value(key: str, value: Any, allowed: Sequence[str]) -> str:
    hint = did_you_mean(str(value), allowed)
    return f"{key}: unknown value {value!r}; allowed: {', '.join(allowed)}" + (f". HINT: {hint}" if hint else "")


def _parameters(factory: Callable[..., Any]) -> list[str]:
    parameters = inspect.signature(factory).parameters.items()
    return [n for n, p in parameters if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _yaml_fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value (None, bool, int, float, str, list, dict) can be passed where ``hint`` is annotated."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_yaml_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path or (isinstance(hint, type) and issubclass(hint, os.PathLike)):
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, Sequence, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, list):
            return False
        if container is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_yaml_fits(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_yaml_fits(v, args[0]) for v in value)
    if container in (dict, Mapping, collections.abc.Mapping):
        return isinstance(value, dict)
    return False  # a class YAML cannot build (a tensor, a module, a callable)


def _describe(hint: Any) -> str:
    text = str(hint).replace("NoneType", "None").replace("<class '", "").replace("'>", "")
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)  # typing.Sequence -> Sequence, torch.nn....Module -> Module


def _check_arguments(
    prefix: str, factory: Callable[..., Any], arguments: Mapping[str, Any], what: str | None = None
) -> list[str]:
    """Unknown keys (with did-you-mean) and values whose YAML type cannot fit the annotation."""
    allowed = _parameters(factory)
    problems = [_unknown(key, allowed, prefix, what) for key in arguments if key not in allowed]
    target = factory.func if isinstance(factory, functools.partial) else factory
    try:
        hints = typing.get_type_hints(getattr(target, "__init__", target) if isinstance(target, type) else target)
    except Exception:  # annotations that cannot be resolved: leave the types to the factory itself
        hints = {}
    for key, value in arguments.items():
        if key in hints and not _yaml_fits(value, hints[key]):
            problems.append(f"{prefix}{key}: must be {_describe(hints[key])}, got {value!r}")
    return problems


def _check_class_path_section(name: str, section: Mapping[str, Any], allowed: Sequence[str]) -> list[str]:
    """The keys of a ``class_path`` section (the class itself is checked by :func:`_import_class`)."""
    problems = [_unknown(key, allowed, f"{name}.") for key in section if key not in allowed]
    if not isinstance(section.get("init_args", {}), dict):
        problems.append(f"{name}.init_args: must be a mapping, got {section['init_args']!r}")
    return problems


def _check_model(section: Mapping[str, Any]) -> list[str]:
    if "class_path" in section:
        return _check_class_path_section("model", section, ("class_path", "init_args", "checkpoint"))
    from lightning_compress.vision.models import MODELS
    from lightning_compress.vision.module import OPTIMIZERS, ClassificationModule

    arguments = {k: v for k, v in section.items() if k != "checkpoint"}
    problems = _check_arguments("model.", ClassificationModule, arguments)
    name, optimizer = arguments.get("model", "cnn_small"), arguments.get("optimizer", "adam")
    if isinstance(name, str) and name not in MODELS:
        problems.append(_unknown_value("model.model", name, list(MODELS)))
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        problems.append(_unknown_value("model.optimizer", optimizer, OPTIMIZERS))
    if "checkpoint" in section and not isinstance(section["checkpoint"], str):
        problems.append(f"model.checkpoint: must be a file path, got {section['checkpoint']!r}")
    return problems


def _check_data(section: Mapping[str, Any]) -> list[str]:
    if "class_path" in section:
        return _check_class_path_section("data", section, ("class_path", "init_args"))
    from lightning_compress.vision.data import DATAMODULES

    name = section.get("name", "mnist5k")
    if not isinstance(name, str) or name not in DATAMODULES:
        return [_unknown_value("data.name", name, list(DATAMODULES))]
    return _check_arguments("data.", DATAMODULES[name], {k: v for k, v in section.items() if k != "name"})


def _check_trainer(section: Mapping[str, Any]) -> list[str]:
    import lightning.pytorch as pl

    refused = [f"trainer.{key}: set by the recipe itself (use `compression` / `logger`)" for key in section
               if key in ("callbacks", "logger")]  # fmt: skip
    rest = {k: v for k, v in section.items() if k not in ("callbacks", "logger")}
    return refused + _check_arguments("trainer.", pl.Trainer, rest, "lightning.Trainer's arguments")


def _check_compression(section: Mapping[str, Any]) -> list[str]:
    problems = []
    factories = callback_factories()
    for name, arguments in section.items():
        if name not in factories:
            problems.append(_unknown(name, COMPRESSION, "compression."))
            continue
        if not isinstance(arguments, dict):
            problems.append(f"compression.{name}: must be a mapping of arguments, got {type(arguments).__name__}")
            continue
        found = _check_arguments(f"compression.{name}.", factories[name], arguments)
        problems += found
        if found or name in ("distillation", "export"):  # these touch files: checked when built
            continue
        try:
            factories[name](**arguments)
        except (CompressionConfigError, TypeError) as error:
            problems.append(f"compression.{name}: {error}")
    return problems


def _check_logger(section: Mapping[str, Any]) -> list[str]:
    return [_unknown(key, LOGGERS, "logger.") for key in section if key not in LOGGERS]


def import_class(path: Any, key: str, base: str) -> Any:
    """An importable class of the expected Lightning base type; never an arbitrary callable."""
    import lightning.pytorch as pl

    expected = getattr(pl, base)
    module_name, _, name = str(path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError, ValueError):
        found = None
    if not (isinstance(found, type) and issubclass(found, expected)):
        raise CompressionConfigError(
            f"{key}: must be the import path of a {base} subclass (e.g. my_package.models.MyModule), got {path!r}"
        )
    return found
