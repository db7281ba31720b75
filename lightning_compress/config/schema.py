"""What a recipe may say: its sections, every key's type and range, with did-you-mean, all problems at once.

:func:`validate` returns every problem of a recipe as a ``key.path: message`` line (empty when
valid): unknown sections and keys (with a did-you-mean), values whose YAML type cannot fit the
constructor's annotation (model, data, Trainer, every callback), unknown model / data / optimizer
names, and ``class_path`` entries whose module defines no such class (read as text, never imported).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_compress.config.trust import locate_class
from lightning_compress.errors import CompressionConfigError, brief, did_you_mean

SECTIONS = ("model", "data", "trainer", "compression", "logger", "seed", "python_path")
LOGGERS = ("wandb", "csv")
COMPRESSION = ("budget", "low_rank", "pruning", "quantization", "distillation", "export")


def callback_factories() -> dict[str, Callable[..., Any]]:
    """``{recipe section: callback class}`` of the ``compression`` section."""
    from lightning_compress.callbacks import (
        BudgetPlanner,
        CompressionExport,
        KnowledgeDistillation,
        LowRankFactorization,
        MagnitudePruning,
        QuantizationAwareTraining,
    )

    return {
        "budget": BudgetPlanner,
        "low_rank": LowRankFactorization,
        "pruning": MagnitudePruning,
        "quantization": QuantizationAwareTraining,
        "distillation": KnowledgeDistillation,
        "export": CompressionExport,
    }


def validate(config: Mapping[str, Any], folders: Sequence[Path] = ()) -> list[str]:
    """Every problem of a recipe, as ``key.path: message`` lines (empty when it is valid).

    ``class_path`` entries are located and read as text (:func:`lightning_compress.config.trust.locate_class`):
    nothing is imported. ``folders`` are the recipe's ``python_path`` (see :mod:`lightning_compress.config.trust`).
    """
    problems = [_unknown(key, SECTIONS, "") for key in config if key not in SECTIONS]
    listed = config.get("python_path")
    if listed is not None and not (isinstance(listed, str) or (
            isinstance(listed, list) and all(isinstance(p, str) for p in listed))):  # fmt: skip
        problems.append(f"python_path: must be a folder or a list of folders, got {brief(listed)}")
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        problems.append(f"python_path: no such folder {', '.join(missing)}")
    if "seed" in config and (not isinstance(config["seed"], int) or isinstance(config["seed"], bool)):
        problems.append(f"seed: must be an integer, got {brief(config['seed'])}")
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
                locate_class(value["class_path"], f"{section}.class_path", base, folders)
            except CompressionConfigError as error:
                problems.append(str(error))
    return problems


def _unknown(key: str, allowed: Sequence[str], prefix: str, what: str | None = None) -> str:
    hint = did_you_mean(str(key), allowed)
    return f"{prefix}{key}: unknown key; allowed: {what or ', '.join(allowed)}" + (f". HINT: {hint}" if hint else "")


def _unknown_value(key: str, value: Any, allowed: Sequence[str]) -> str:
    hint = did_you_mean(brief(value).strip("'"), allowed)
    return f"{key}: unknown value {brief(value)}; allowed: {', '.join(allowed)}" + (f". HINT: {hint}" if hint else "")


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


def check_arguments(
    prefix: str, factory: Callable[..., Any], arguments: Mapping[str, Any], what: str | None = None
) -> list[str]:
    """Unknown keys (with did-you-mean) and values whose YAML type cannot fit the annotation."""
    allowed = _parameters(factory)
    problems = [_unknown(key, allowed, prefix, what) for key in arguments if key not in allowed]
    hints = _hints(factory)
    for key, value in arguments.items():
        if key in hints and not _yaml_fits(value, hints[key]):
            choices = [a for a in typing.get_args(hints[key]) if isinstance(a, str)]
            if typing.get_origin(hints[key]) is typing.Literal and isinstance(value, str):
                problems.append(_unknown_value(f"{prefix}{key}", value, choices))
            else:
                problems.append(f"{prefix}{key}: must be {_describe(hints[key])}, got {brief(value)}")
    return problems


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.func if isinstance(factory, functools.partial) else factory
    try:
        return typing.get_type_hints(getattr(target, "__init__", target) if isinstance(target, type) else target)
    except Exception:  # annotations that cannot be resolved: leave the types to the factory itself
        return {}


def keeps_text(config: Mapping[str, Any], key: Sequence[str], value: Any, text: str) -> bool:
    """Whether an override's ``text`` should stay the string it was typed as: the argument at ``key`` (a
    built-in model or data module, the Trainer, a compression callback) is annotated to take a string,
    and YAML read ``text`` as something it does not take (``--compression.export.dirpath=2024``)."""
    depth = 3 if key and key[0] == "compression" else 2
    factory = section_factory(key[0], config.get(key[0]) or {}, key[1]) if len(key) == depth else None
    hint = _hints(factory).get(key[-1]) if factory is not None else None
    return hint is not None and not _yaml_fits(value, hint) and _yaml_fits(text, hint)


def section_factory(name: str, section: Mapping[str, Any], part: str | None = None) -> Callable[..., Any] | None:
    """The constructor that a recipe section's keys are passed to: the built-in model or data module, the
    Trainer, the compression callback ``part`` names; ``None`` for a ``class_path`` section or a name that
    is not known (those are reported by :func:`validate`)."""
    if name == "trainer":
        import lightning.pytorch as pl

        return pl.Trainer
    if name == "compression":
        return callback_factories().get(part or "")
    if "class_path" in section:
        return None
    if name == "data":
        from lightning_compress.vision.data import DATAMODULES

        return DATAMODULES.get(str(section.get("name", "mnist5k")))
    if name == "model":
        from lightning_compress.vision.module import ClassificationModule

        return ClassificationModule
    return None


def _check_class_path_section(name: str, section: Mapping[str, Any], allowed: Sequence[str]) -> list[str]:
    """The keys of a ``class_path`` section (the class itself is located by :func:`locate_class`)."""
    problems = [_unknown(key, allowed, f"{name}.") for key in section if key not in allowed]
    if not isinstance(section.get("init_args", {}), dict):
        problems.append(f"{name}.init_args: must be a mapping, got {brief(section['init_args'])}")
    return problems


def _check_model(section: Mapping[str, Any]) -> list[str]:
    if "class_path" in section:
        return _check_class_path_section("model", section, ("class_path", "init_args", "checkpoint"))
    from lightning_compress.vision.models import MODELS
    from lightning_compress.vision.module import OPTIMIZERS

    arguments = {k: v for k, v in section.items() if k != "checkpoint"}
    factory = section_factory("model", section)
    assert factory is not None  # not a class_path section
    problems = check_arguments("model.", factory, arguments)
    name, optimizer = arguments.get("model", "cnn_small"), arguments.get("optimizer", "adam")
    if isinstance(name, str) and name not in MODELS:
        problems.append(_unknown_value("model.model", name, list(MODELS)))
    if isinstance(optimizer, str) and optimizer not in OPTIMIZERS:
        problems.append(_unknown_value("model.optimizer", optimizer, OPTIMIZERS))
    if "checkpoint" in section and not isinstance(section["checkpoint"], str):
        problems.append(f"model.checkpoint: must be a file path, got {brief(section['checkpoint'])}")
    return problems


def _check_data(section: Mapping[str, Any]) -> list[str]:
    if "class_path" in section:
        return _check_class_path_section("data", section, ("class_path", "init_args"))
    from lightning_compress.vision.data import DATAMODULES

    name = section.get("name", "mnist5k")
    factory = section_factory("data", section) if isinstance(name, str) else None
    if factory is None:
        return [_unknown_value("data.name", name, list(DATAMODULES))]
    return check_arguments("data.", factory, {k: v for k, v in section.items() if k != "name"})


def _check_trainer(section: Mapping[str, Any]) -> list[str]:
    refused = [f"trainer.{key}: set by the recipe itself (use `compression` / `logger`)" for key in section
               if key in ("callbacks", "logger")]  # fmt: skip
    rest = {k: v for k, v in section.items() if k not in ("callbacks", "logger")}
    factory = section_factory("trainer", section)
    assert factory is not None
    return refused + check_arguments("trainer.", factory, rest, "lightning.Trainer's arguments")


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
        found = check_arguments(f"compression.{name}.", factories[name], arguments)
        problems += found
        if found or name in ("distillation", "export"):  # these touch files: checked when built
            continue
        try:
            factories[name](**arguments)
        except (CompressionConfigError, TypeError) as error:
            problems.append(f"compression.{name}: {error}")
    return problems


def _check_logger(section: Mapping[str, Any]) -> list[str]:
    """Each logger's options against what it takes (W&B: ``WandbLogger``'s and ``wandb.init``'s arguments,
    and ``mode``), so that ``validate`` refuses what ``fit`` would crash on."""
    problems = [_unknown(key, LOGGERS, "logger.") for key in section if key not in LOGGERS]
    for name in (n for n in LOGGERS if n in section):
        options = section[name] if section[name] is not None else {}
        if not isinstance(options, dict):
            problems.append(f"logger.{name}: must be a mapping of options, got {brief(options)}")
            continue
        factory, extra = _logger_factory(name)
        own = _parameters(factory)
        problems += [_unknown(key, [*own, *extra], f"logger.{name}.") for key in options if key not in [*own, *extra]]
        problems += check_arguments(f"logger.{name}.", factory, {k: v for k, v in options.items() if k in own})
        offline = options.get("offline") is True or options.get("mode") == "offline"
        if name == "wandb" and offline and options.get("log_model"):
            problems.append(
                "logger.wandb.log_model: W&B cannot upload checkpoints offline (Lightning refuses log_model with "
                "offline). HINT: drop log_model, or run online; CompressionExport's artifact is logged either way"
            )
    return problems


def _logger_factory(name: str) -> tuple[Callable[..., Any], list[str]]:
    """A logger's class and the options it passes on (W&B's ``**kwargs`` go to ``wandb.init``)."""
    if name == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger, []
    from lightning.pytorch.loggers import WandbLogger

    from lightning_compress.integrations.wandb import init_options

    return WandbLogger, [*init_options(), "mode"]
