"""The W&B-only extras of an export (the files as an artifact, the plots, the per-layer table) and of a sweep.

The one module that imports ``wandb``; it is imported only when a ``WandbLogger`` is attached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def log_export(logger: Any, report: dict[str, Any], folder: Path, name: str) -> None:
    """Log the exported files, report and plots as version of the artifact ``name`` (the same every run, so W&B
    keeps the history), the plots as images and the per-layer rows as a ``wandb.Table``."""
    import wandb

    run = logger.experiment
    metadata = {"after": report["after"], "baseline": report.get("baseline")}
    artifact = wandb.Artifact(name=name, type="model", metadata=metadata)
    for entry in report["files"].values():
        artifact.add_file(entry["path"])
    plots = sorted(folder.glob("*.png"))
    for path in [folder / "report.json", folder / "report.md", *plots]:
        if path.exists():
            artifact.add_file(str(path))
    run.log_artifact(artifact)
    columns: list[str | int] = ["name", "sparsity", "rank", "weight_bits"]
    table = wandb.Table(columns=columns, data=[[row[str(c)] for c in columns] for row in report["layers"]])
    images = {f"export/plots/{path.stem}": wandb.Image(str(path), caption=path.name) for path in plots}
    run.log({"export/layers": table, **images})


def log_sweep(project: str, group: str, folder: Path, rows: list[dict[str, Any]], sweep: dict[str, Any]) -> None:
    """One more run of the sweep's group: ``sweep/results`` (every trial) and ``sweep/pareto_front`` tables, the
    ``sweep/pareto`` plot, and the sweep file as its config."""
    import wandb

    run = wandb.init(project=project, group=group, name="pareto", job_type="sweep", dir=str(folder),
                     config={"sweep": sweep})  # fmt: skip
    columns: list[str | int] = list(rows[0])
    table = wandb.Table(columns=columns, data=[[row[str(c)] for c in columns] for row in rows])
    front = wandb.Table(columns=columns, data=[[row[str(c)] for c in columns] for row in rows if row["pareto"]])
    logged: dict[str, Any] = {"sweep/results": table, "sweep/pareto_front": front}
    if (folder / "pareto.png").exists():
        logged["sweep/pareto"] = wandb.Image(str(folder / "pareto.png"), caption="the metric against model bytes")
    run.log(logged)
    run.finish()


def finish_run() -> None:
    """Finish the W&B run this process has open, if any: ``wandb.init`` would hand it to the next run started
    here (the next trial of a sweep) instead of starting a new one."""
    import wandb

    if wandb.run is not None:
        wandb.run.finish()


def init_options() -> list[str]:
    """The options ``wandb.init`` takes (``WandbLogger`` passes its extra ``**kwargs`` on to it), less
    ``config`` and ``settings`` (a recipe's own); ``[]`` without wandb installed."""
    import inspect

    try:
        import wandb
    except ImportError:
        return []
    parameters = inspect.signature(wandb.init).parameters.items()
    return [n for n, p in parameters if n not in ("config", "settings") and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                        p.KEYWORD_ONLY)]  # fmt: skip
