"""Building the objects a validated recipe names: callbacks, model, data module, loggers, the Trainer.

:class:`Recipe` is plain data (the resolved YAML); its methods build the objects. A constructor's
own refusal (a ``TypeError`` / ``ValueError`` of a model, a data module or Lightning) becomes a
:class:`~lightning_compress.errors.CompressionConfigError` naming the section.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_compress.config.schema import COMPRESSION, callback_factories
from lightning_compress.config.trust import import_class, search_folders
from lightning_compress.errors import CompressionConfigError


@dataclass
class Recipe:
    """A validated recipe (plain data: ``config`` is the resolved YAML, overrides applied)."""

    config: dict[str, Any]
    path: Path | None = None
    python_path: tuple[str, ...] = ()  # --python-path folders, besides the recipe's own `python_path`

    @property
    def folders(self) -> list[Path]:
        """Where a ``class_path`` may come from besides the installed environment (see ``config.trust``)."""
        return search_folders(self.config, self.path, self.python_path)

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    def callbacks(self) -> list[Any]:
        """The compression callbacks, in the order of the composition contract."""
        factories = callback_factories()
        sections = dict(self.config.get("compression") or {})
        if "export" in sections and self.path is not None:  # one W&B artifact per recipe: its exports are versions
            from lightning_compress.callbacks.export import artifact_name

            sections["export"] = {"artifact_name": artifact_name(self.path.stem), **(sections["export"] or {})}
        return [factories[name](**sections[name]) for name in COMPRESSION if name in sections]

    def trainer_kwargs(self) -> dict[str, Any]:
        """Arguments for ``lightning.Trainer`` (without callbacks and logger)."""
        return dict(self.config.get("trainer") or {})

    def loggers(self, run_name: str | None = None) -> list[Any]:
        """``logger: {wandb: {...}, csv: {...}}`` as Lightning loggers; a W&B run records the recipe, intact, as its
        config's ``recipe`` (Lightning adds the module's hyper-parameters beside it).

        ``run_name`` names the W&B run and the CSV folder (a sweep's trials). Under ``wandb agent``
        (``WANDB_SWEEP_ID`` set) a recipe without a ``logger`` section logs to the agent's W&B run, so the
        sweep sees its metric.
        """
        section = self.config.get("logger") or {}
        if not section and os.environ.get("WANDB_SWEEP_ID"):  # a trial of `wandb agent`: the sweep reads its run
            section = {"wandb": {}}
        loggers: list[Any] = []
        if "csv" in section:
            from lightning.pytorch.loggers import CSVLogger

            csv_options = {"save_dir": "lightning_logs", **(section["csv"] or {})}
            if run_name:
                csv_options["name"] = run_name
            loggers.append(built("logger.csv", lambda: CSVLogger(**csv_options)))
        if "wandb" in section:
            from lightning.pytorch.loggers import WandbLogger

            options: dict[str, Any] = dict(section["wandb"] or {})
            if options.pop("mode", None) == "offline":
                options["offline"] = True
            if run_name:
                options["name"] = run_name
            logger = built("logger.wandb", lambda: WandbLogger(**options))
            # under its own key: Lightning logs the module's hyper-parameters at the top level (a `model` of its own)
            logger.experiment.config.update({"recipe": self.config}, allow_val_change=True)
            loggers.append(logger)
        return loggers

    def model(self) -> Any:
        """The LightningModule: a built-in ``ClassificationModule`` or the recipe's ``class_path``.

        Raises:
            CompressionConfigError: a value the module's constructor refuses (with the section named).
        """
        return built("model", self._model)

    def _model(self) -> Any:
        section = dict(self.config.get("model") or {})
        checkpoint = section.pop("checkpoint", None)
        if "class_path" in section:
            module = import_class(section["class_path"], "model.class_path", "LightningModule", self.folders)(
                **section.get("init_args", {})
            )
        else:
            from lightning_compress.vision.module import ClassificationModule

            data = self.datamodule()
            section.setdefault("num_classes", data.num_classes)
            section.setdefault("in_channels", data.in_channels)
            module = ClassificationModule(**section)
        if checkpoint is not None:  # fine-tuning: start from trained (possibly compressed) weights
            from lightning_compress.deploy.restore import restore

            restore(module, checkpoint)
        return module

    def datamodule(self) -> Any:
        """The LightningDataModule: a built-in name or the recipe's ``class_path``.

        Raises:
            CompressionConfigError: a value the data module's constructor refuses (with the section named).
        """
        return built("data", self._datamodule)

    def _datamodule(self) -> Any:
        section = dict(self.config.get("data") or {})
        if "class_path" in section:
            return import_class(section["class_path"], "data.class_path", "LightningDataModule", self.folders)(
                **section.get("init_args", {})
            )
        from lightning_compress.vision.data import get_datamodule

        name = section.pop("name", "mnist5k")
        section.setdefault("seed", self.seed)
        return get_datamodule(name, **section)


def built(section: str, build: Callable[[], Any]) -> Any:
    """``build()``, with a constructor's own ``TypeError`` / ``ValueError`` as a :class:`CompressionConfigError`."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return build()
    except CompressionConfigError:
        raise
    except (TypeError, ValueError, MisconfigurationException) as err:  # e.g. torchmetrics refusing num_classes=0,
        raise CompressionConfigError(f"{section}: {err}") from None  # Lightning refusing max_epochs=-3


def build_trainer(recipe: Recipe, callbacks: list[Any], loggers: list[Any]) -> Any:
    """``lightning.Trainer`` from the recipe; Lightning's own refusals become a :class:`CompressionConfigError`."""
    import lightning.pytorch as pl

    options = recipe.trainer_kwargs()
    return built("trainer", lambda: pl.Trainer(callbacks=callbacks, logger=loggers or False, **options))
