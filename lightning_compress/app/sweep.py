"""Sweeps over recipe parameters: W&B's sweep format, run locally and offline.

A sweep file is what ``wandb sweep`` takes: ``method`` (``grid`` or ``random`` here), ``metric``
(``name``, ``goal``), ``parameters`` keyed by dotted recipe keys (``values``, ``value``, or ``min`` /
``max`` for random), and a ``command`` that runs ``lightning-compress fit RECIPE ${args}``.
:func:`run_sweep` runs the same search here, one trial at a time, then writes ``results.csv`` and
``pareto.png`` (the metric against model bytes, the Pareto front marked); with a W&B project, each trial
is a W&B run of one group and a last run of that group logs the results and the front as tables and the
plot. :func:`check_sweep` runs one short trial to confirm the sweep's ``metric.name`` is what the recipe
logs (W&B's agent gives a trial no way to know the metric: check before ``wandb sweep``).

Example::

    rows = run_sweep("recipes/sweeps/digits_sparsity.yaml", count=4, out="sweep-out")
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_compress.app.run import train_recipe
from lightning_compress.config.reading import read
from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of, require

METHODS = ("grid", "random")
KEYS = ("program", "method", "metric", "parameters", "command", "name", "description", "project", "entity")


def load_sweep(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a sweep file; returns it with ``recipe`` (the recipe path in its command) added.

    Raises:
        CompressionConfigError: an unreadable file, an unknown key, a method other than grid/random,
            parameters without values, or a command that names no recipe.
    """
    sweep = read(path, "the sweep") or {}
    if not isinstance(sweep, dict):
        raise CompressionConfigError(f"a sweep file must be a mapping, got {type(sweep).__name__}")
    for key in sweep:
        if key not in KEYS:
            raise config_error(f"sweep key {key!r}", one_of(KEYS), key, did_you_mean(str(key), KEYS))
    if sweep.get("method") not in METHODS:
        allowed = one_of(METHODS) + " (locally; W&B's bayes runs with `wandb agent`)"
        raise config_error("method", allowed, sweep.get("method"))
    metric = sweep.get("metric") or {}
    goals = ("maximize", "minimize")
    if not isinstance(metric, dict) or "name" not in metric or metric.get("goal", "maximize") not in goals:
        raise config_error("metric", "{name: ..., goal: maximize|minimize}", metric)
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise config_error("parameters", "a mapping of dotted recipe keys to {values: [...]} / {value: x}", parameters)
    for key, spec in parameters.items():
        if not isinstance(spec, dict) or not ({"values", "value"} & set(spec) or {"min", "max"} <= set(spec)):
            raise config_error(f"parameters.{key}", "{values: [...]}, {value: x} or {min: a, max: b}", spec)
        if sweep["method"] == "grid" and "values" not in spec and "value" not in spec:
            raise config_error(f"parameters.{key}", "{values: [...]} or {value: x} for a grid", spec)
    command = [str(c) for c in sweep.get("command") or []]
    recipes = [c for c in command if c.endswith((".yaml", ".yml"))]
    if "${args}" not in command or not recipes:
        raise config_error("command", "a list running `lightning-compress fit RECIPE.yaml ${args}`", command)
    return {**sweep, "recipe": recipes[0]}


def trials(sweep: Mapping[str, Any], count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The parameter sets to run: the grid in order (first ``count``) or ``count`` random draws."""
    parameters: Mapping[str, Any] = sweep["parameters"]
    keys = list(parameters)
    if sweep["method"] == "grid":
        choices = [parameters[k]["values"] if "values" in parameters[k] else [parameters[k]["value"]] for k in keys]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.islice(itertools.product(*choices), count)]
    rng = random.Random(seed)

    def draw(spec: Mapping[str, Any]) -> Any:
        if "values" in spec:
            return rng.choice(spec["values"])
        if "value" in spec:
            return spec["value"]
        low, high = spec["min"], spec["max"]
        return rng.randint(low, high) if isinstance(low, int) and isinstance(high, int) else rng.uniform(low, high)

    return [{k: draw(parameters[k]) for k in keys} for _ in range(count)]


def pareto_front(points: Sequence[tuple[float, float]], maximize: bool = True) -> list[int]:
    """Indices of the points not dominated in (metric, bytes): better metric, fewer bytes."""
    front = []
    for i, (metric, size) in enumerate(points):
        better = (lambda a, b: a >= b) if maximize else (lambda a, b: a <= b)
        dominated = any(
            better(m, metric) and s <= size and (m, s) != (metric, size) for j, (m, s) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


SHORT_TRIAL = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=2"]


def run_sweep(
    path: str | os.PathLike[str], count: int, out: str | os.PathLike[str], seed: int = 0,
    wandb_project: str | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run ``count`` trials of the sweep here, then write ``results.csv`` and ``pareto.png``.

    With ``wandb_project``, each trial logs to a W&B run (group: the sweep's name and the time) and one more
    run of the group logs ``sweep/results`` and ``sweep/pareto_front`` tables and the ``sweep/pareto`` plot
    (offline too: ``WANDB_MODE=offline``; the runs are under ``out``).
    """
    sweep = load_sweep(path)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    metric, maximize = sweep["metric"]["name"], sweep["metric"].get("goal", "maximize") == "maximize"
    name = sweep.get("name") or Path(path).stem
    group = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    logging = [f"--logger.wandb.project={wandb_project}", f"--logger.wandb.group={group}",
               f"--logger.wandb.save_dir={folder}"] if wandb_project else []  # fmt: skip
    rows = []
    for index, parameters in enumerate(trials(sweep, count, seed)):
        overrides = _overrides(parameters) + logging
        figures = train_recipe(sweep["recipe"], overrides, run_name=f"trial-{index}", log_dir=str(folder))
        _check_metric(metric, figures, path)
        rows.append({"trial": index, **parameters, metric: figures[metric], "model_bytes": figures["model_bytes"]})
    front = set(pareto_front([(r[metric], r["model_bytes"]) for r in rows], maximize))
    for i, row in enumerate(rows):
        row["pareto"] = i in front
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, metric, maximize, folder / "pareto.png", name)
    if wandb_project:
        from lightning_compress.integrations.wandb import log_sweep

        log_sweep(wandb_project, group, folder, rows, {k: v for k, v in sweep.items() if k != "recipe"})
    return rows


def check_sweep(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> dict[str, float]:
    """One short trial of the sweep's first parameter set (one epoch, two batches): the metric must be logged.

    Raises:
        CompressionConfigError: the metric is not among what the trial logged (the message lists those).
    """
    sweep = load_sweep(path)
    overrides = _overrides(trials(sweep, 1)[0]) + SHORT_TRIAL
    figures = train_recipe(sweep["recipe"], overrides, run_name="check", log_dir=str(out))
    _check_metric(sweep["metric"]["name"], figures, path)
    return figures


def _overrides(parameters: Mapping[str, Any]) -> list[str]:
    """A trial's parameters as the recipe overrides a W&B agent passes (``--key=value``, its ``${args}``)."""
    return [f"--{key}={value}" for key, value in parameters.items()]


def _check_metric(metric: str, figures: Mapping[str, float], path: str | os.PathLike[str]) -> None:
    if metric not in figures:
        hint = did_you_mean(metric, list(figures))
        raise CompressionConfigError(
            f"{path}: the sweep's metric.name {metric!r} is not logged by its recipe, which logs "
            f"{', '.join(sorted(figures))}. HINT: {hint or 'name one of them in metric.name'}"
        )


def _plot(rows: list[dict[str, Any]], metric: str, maximize: bool, path: Path, name: str) -> None:
    require("matplotlib", "plots", "the sweep's Pareto plot").use("Agg")
    plt = require("matplotlib.pyplot", "plots", "the sweep's Pareto plot")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["model_bytes"] for r in rows], [r[metric] for r in rows], color="tab:blue", label="trials")
    for row in rows:
        ax.annotate(f"trial {row['trial']}", (row["model_bytes"], row[metric]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["model_bytes"])
    ax.plot([r["model_bytes"] for r in front], [r[metric] for r in front], "o-", color="tab:red", label="Pareto front")
    ax.set_title(f"{name}: {metric} against model bytes, {len(rows)} trials")
    ax.set_xlabel("model bytes (exported file, zlib-compressed)")
    ax.set_ylabel(f"{metric} ({'higher' if maximize else 'lower'} is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
