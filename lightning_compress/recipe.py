"""Recipes: one YAML file says model, data, trainer, compression, logger and seed.

``load_recipe(path, overrides=[...])`` reads the file with ``yaml.safe_load``, applies dotted
overrides (``compression.pruning.final_sparsity=0.95``, the form ``wandb agent`` passes), and
validates **everything at once**: the error lists every problem with its key path, what is allowed
and a did-you-mean for misspelt keys. The returned :class:`Recipe` builds the callbacks, the model,
the data and the Trainer arguments.

Example::

    recipe = load_recipe("recipes/mnist5k/prune.yaml", ["compression.pruning.final_sparsity=0.95"])
    Trainer(callbacks=recipe.callbacks(), **recipe.trainer_kwargs()).fit(recipe.model(), recipe.datamodule())
"""

from __future__ import annotations

import collections.abc
import copy
import functools
import importlib
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lightning_compress.errors import CompressionConfigError, did_you_mean

SECTIONS = ("model", "data", "trainer", "compression", "logger", "seed")
LOGGERS = ("wandb", "csv")


def _callbacks() -> dict[str, Callable[..., Any]]:
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


COMPRESSION = ("low_rank", "pruning", "quantization", "distillation", "export")


@dataclass
class Recipe:
    """A validated recipe (plain data: ``config`` is the resolved YAML, overrides applied)."""

    config: dict[str, Any]
    path: Path | None = None

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def callbacks(self) -> list[Any]:
        """The compression callbacks, in the order of the composition contract."""
        factories = _callbacks()
        sections = self.config.get("compression") or {}
        return [factories[name](**sections[name]) for name in COMPRESSION if name in sections]

    def trainer_kwargs(self) -> dict[str, Any]:
        """Arguments for ``lightning.Trainer`` (without callbacks and logger)."""
        return dict(self.config.get("trainer") or {})

    def loggers(self, run_name: str | None = None) -> list[Any]:
        """``logger: {wandb: {...}, csv: {...}}`` as Lightning loggers; a W&B run records the recipe as its config.

        ``run_name`` names the W&B run and the CSV folder (a sweep's trials).
        """
        section = self.config.get("logger") or {}
        loggers: list[Any] = []
        if "csv" in section:
            from lightning.pytorch.loggers import CSVLogger

            csv_options = {"save_dir": "lightning_logs", **(section["csv"] or {})}
            if run_name:
                csv_options["name"] = run_name
            loggers.append(CSVLogger(**csv_options))
        if "wandb" in section:
            from lightning.pytorch.loggers import WandbLogger

            options: dict[str, Any] = dict(section["wandb"] or {})
            if options.pop("mode", None) == "offline":
                options["offline"] = True
            if run_name:
                options["name"] = run_name
            logger = WandbLogger(**options)
            logger.experiment.config.update(self.config, allow_val_change=True)
            loggers.append(logger)
        return loggers

    def model(self) -> Any:
        """The LightningModule: a built-in ``ClassificationModule`` or the recipe's ``class_path``.

        Raises:
            CompressionConfigError: a value the module's constructor refuses (with the section named).
        """
        return _built("model", self._model)

    def _model(self) -> Any:
        section = dict(self.config.get("model") or {})
        checkpoint = section.pop("checkpoint", None)
        if "class_path" in section:
            module = _import_class(section["class_path"], "model.class_path", "LightningModule")(
                **section.get("init_args", {})
            )
        else:
            from lightning_compress.module import ClassificationModule

            data = self.datamodule()
            section.setdefault("num_classes", data.num_classes)
            section.setdefault("in_channels", data.in_channels)
            module = ClassificationModule(**section)
        if checkpoint is not None:  # fine-tuning: start from trained (possibly compressed) weights
            from lightning_compress.restore import restore

            restore(module, checkpoint)
        return module

    def datamodule(self) -> Any:
        """The LightningDataModule: a built-in name or the recipe's ``class_path``.

        Raises:
            CompressionConfigError: a value the data module's constructor refuses (with the section named).
        """
        return _built("data", self._datamodule)

    def _datamodule(self) -> Any:
        section = dict(self.config.get("data") or {})
        if "class_path" in section:
            return _import_class(section["class_path"], "data.class_path", "LightningDataModule")(
                **section.get("init_args", {})
            )
        from lightning_compress.data import get_datamodule

        name = section.pop("name", "mnist5k")
        section.setdefault("seed", self.seed)
        return get_datamodule(name, **section)


def _built(section: str, build: Callable[[], Any]) -> Any:
    """``build()``, with a constructor's own ``TypeError`` / ``ValueError`` as a :class:`CompressionConfigError`."""
    try:
        return build()
    except CompressionConfigError:
        raise
    except (TypeError, ValueError) as err:  # e.g. torchmetrics refusing num_classes=0, a user class's check
        raise CompressionConfigError(f"{section}: {err}") from None


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
                _import_class(value["class_path"], f"{section}.class_path", base)
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
    from lightning_compress.models import MODELS
    from lightning_compress.module import OPTIMIZERS, ClassificationModule

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
    from lightning_compress.data import DATAMODULES

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
    factories = _callbacks()
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


def _import_class(path: Any, key: str, base: str) -> Any:
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
