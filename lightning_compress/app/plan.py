"""``lightning-compress plan RECIPE --target latency=0.5 --techniques channel,int8 --out PLANNED.yaml``.

Trains the recipe's model a warm-up (no compression), plans per-layer settings to the target with
:func:`lightning_compress.deploy.planning.plan_model` (sensitivity, measured per-layer cost, allocation,
the plan applied one-shot, exported and measured), and writes an ordinary recipe whose compression callbacks
carry the per-layer settings (``layer_sparsity``, ``ranks``, ``layer_bits``), with predicted, measured and
dense figures in a comment; beside it ``*.sensitivity.json`` (the table, reused while weights and data are the
same), ``*.sensitivity.png`` (one curve per layer) and ``*.latency.json`` (the measured per-layer latencies).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_compress.deploy.planning import (
    METRICS,
    Plan,
    Target,
    measure_plan,
    parse_techniques,
    plan_model,
    plot_sensitivity,
)
from lightning_compress.errors import config_error


def comment_block(plan: Plan, source: str, epochs: int) -> str:
    """The YAML comment a planned recipe starts with: what was asked, predicted, measured and dense."""
    lines = [
        f"# Planned by `lightning-compress plan {source} --target {plan.target.metric}={plan.target.value}`",
        f"# from {epochs} warm-up epoch(s), sensitivity on {plan.sensitivity.samples} validation samples "
        f"({plan.sensitivity.batches} batches), in {plan.seconds:.1f} s.",
        "# figure      dense        predicted    measured (one-shot, before training)",
    ]
    for metric in METRICS:
        measured = plan.measured.get(metric)
        shown = f"{measured:<12.6g}" if measured is not None else "-"
        ratio = plan.predicted[metric] / plan.dense[metric] if plan.dense[metric] else float("nan")
        lines.append(f"# {metric:<11} {plan.dense[metric]:<12.6g} {plan.predicted[metric]:<12.6g} {shown}"
                     f"  (predicted {ratio:.2f}x dense)")  # fmt: skip
    lines.append(f"# predicted validation-loss increase (sum over layers): {plan.predicted_loss:.4f}")
    if "accuracy" in plan.measured:
        dense = plan.sensitivity.baseline["accuracy"]
        lines.append(f"# one-shot accuracy {plan.measured['accuracy']:.4f} (dense {dense:.4f}): before any training")
    lines.append("# latency: ms per batch (ONNX Runtime, its default threads); bytes: the ONNX file (unstructured")
    lines.append("# sparsity is predicted as a bitmap, the file stores zeros); params / macs: non-zero, per sample")
    return "\n".join(lines) + "\n"


def scheduled(sections: Mapping[str, Mapping[str, Any]], max_epochs: int) -> dict[str, dict[str, Any]]:
    """The plan's compression sections with a schedule for a run of ``max_epochs``: pruning ramps to 60% of
    it, factorisation at epoch 1 (after a warm-up epoch), QAT for the last two epochs."""
    planned = {name: dict(section) for name, section in sections.items()}
    if "pruning" in planned:
        planned["pruning"]["end_epoch"] = max(1, round(0.6 * max_epochs))
    if "low_rank" in planned:
        planned["low_rank"]["epoch"] = min(1, max_epochs - 1)
    if "quantization" in planned:
        planned["quantization"]["start_epoch"] = max(0, max_epochs - 2)
    return planned


def plan_recipe(
    path: str,
    target: str,
    techniques: str,
    out: str,
    epochs: int = 1,
    batches: int = 4,
    overrides: Sequence[str] = (),
    python_path: Sequence[str] = (),
    runs: int = 20,
) -> Plan:
    """``lightning-compress plan``: warm the recipe's model up, plan, measure, write the planned recipe to ``out``."""
    import lightning.pytorch as pl
    import yaml

    from lightning_compress.config import load_recipe

    goal = Target.parse(target)
    allowed = parse_techniques(techniques)
    if not isinstance(epochs, int) or epochs < 0:
        raise config_error("--epochs", "a whole number of warm-up epochs >= 0", epochs)
    if not isinstance(batches, int) or batches < 1:
        raise config_error("--batches", "a positive number of validation batches", batches)
    recipe = load_recipe(path, overrides, python_path)
    pl.seed_everything(recipe.seed, verbose=False)
    model = recipe.model()
    data = recipe.datamodule()
    if epochs:
        kwargs = {k: v for k, v in recipe.trainer_kwargs().items() if k not in ("max_epochs", "max_steps")}
        trainer = pl.Trainer(**{**kwargs, "max_epochs": epochs, "logger": False, "enable_checkpointing": False,
                                "enable_model_summary": False, "callbacks": []})  # fmt: skip
        trainer.fit(model, datamodule=data)
    else:
        data.setup("fit")
    model.eval()
    val = []
    for x, y in data.val_dataloader():
        val.append((x, y))
        if len(val) == batches:
            break
    batch_size = int((recipe.config.get("data") or {}).get("batch_size") or len(val[0][1]))
    cache = Path(out).with_suffix(".latency.json")
    kept = Path(out).with_suffix(".sensitivity.json")
    plan = plan_model(model, val, goal, allowed, batch_size, cache=cache, runs=runs, sensitivity_cache=kept)
    if not plan.measured:
        plan.measured = measure_plan(model, plan, val, batch_size, runs)
    config = copy.deepcopy(recipe.config)
    compression = dict(config.get("compression") or {})
    for section in ("pruning", "low_rank", "quantization"):
        compression.pop(section, None)
    planned = scheduled(plan.settings(), int(recipe.trainer_kwargs().get("max_epochs") or 1))
    config["compression"] = {**planned, **compression}
    text = comment_block(plan, path, epochs) + yaml.safe_dump(config, sort_keys=False)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    load_recipe(out, python_path=python_path).callbacks()  # what was written validates and builds
    from importlib.util import find_spec

    if find_spec("matplotlib") is not None:
        plot_sensitivity(plan.sensitivity, Path(out).with_suffix(".sensitivity.png"))
    return plan
