"""The W&B-only extras of an export: the files as an artifact and the per-layer table.

The one module that imports ``wandb``; it is imported only when a ``WandbLogger`` is attached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def log_export(logger: Any, report: dict[str, Any], folder: Path) -> None:
    """Log the exported files and report as an artifact, and the per-layer rows as a ``wandb.Table``."""
    import wandb

    run = logger.experiment
    artifact = wandb.Artifact(name=f"compressed-{run.id}", type="model", metadata={"after": report["after"]})
    for entry in report["files"].values():
        artifact.add_file(entry["path"])
    for name in ("report.json", "report.md"):
        if (folder / name).exists():
            artifact.add_file(str(folder / name))
    run.log_artifact(artifact)
    columns: list[str | int] = ["name", "sparsity", "rank", "weight_bits"]
    table = wandb.Table(columns=columns, data=[[row[str(c)] for c in columns] for row in report["layers"]])
    run.log({"export/layers": table})


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
