"""The budget planner's functional part: per-layer settings chosen from measured sensitivity and measured cost.

No Lightning here. :func:`analyse` measures, once, how much each layer's validation loss moves under each
candidate setting (:mod:`lightning_compress.core.sensitivity`) and what each option costs
(:mod:`lightning_compress.deploy.cost`, ONNX Runtime latency on this machine at the batch size);
:meth:`Analysis.choose` picks one option per layer meeting a :class:`Target` with the least predicted loss
(:mod:`lightning_compress.core.allocation`); :func:`plan_model` does both and, for figures of the exported
file (latency, bytes), applies each allocation one-shot, exports and measures it and corrects the budget.
:meth:`Plan.settings` is the plan as the callbacks' arguments (``layer_sparsity``, ``ranks``, ``layer_bits``).
Used by ``lightning-compress plan`` (:mod:`lightning_compress.app.plan`) and by
:class:`~lightning_compress.BudgetPlanner` inside a fit.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_compress.core import low_rank as low_rank_core
from lightning_compress.core import quantization as quant
from lightning_compress.core.allocation import Choice, allocate
from lightning_compress.core.graph import coupled_layers, entangled_layers, find_bn_pairs
from lightning_compress.core.layers import (
    attention_internals,
    follow_replaced,
    select_layers,
    shared_weights,
    weight_of,
)
from lightning_compress.core.pruning import prune
from lightning_compress.core.sensitivity import Sensitivity, Setting, fingerprint, low_rank_rank, sensitivity
from lightning_compress.core.surgery import swap_modules
from lightning_compress.deploy.cost import CostModel, Option, layer_calls
from lightning_compress.deploy.onnx import export_onnx, float_copy
from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of

TECHNIQUES = ("channel", "unstructured", "low_rank", "int8", "int4")
METRICS = ("latency", "bytes", "params", "macs")
CANDIDATES: dict[str, list[Setting]] = {
    "channel": [Setting("channels", f) for f in (0.25, 0.5, 0.75)],
    "unstructured": [Setting("sparsity", s) for s in (0.5, 0.75, 0.9)],
    "low_rank": [Setting("low_rank", r) for r in (0.5, 0.25)],
}
BITS = {"int8": 8, "int4": 4}
COST_KEY = {"latency": "latency_ms", "bytes": "bytes", "params": "params", "macs": "macs"}


@dataclass(frozen=True)
class Target:
    """What to meet: ``metric`` (see :data:`METRICS`) at ``value``, a ratio of the dense fp32 model's figure
    (``latency=0.5``) or, with ``absolute``, the figure itself (``latency=2.5ms``, ``bytes=200000``)."""

    metric: str
    value: float
    absolute: bool = False

    @classmethod
    def parse(cls, text: str) -> Target:
        metric, sep, raw = str(text).partition("=")
        metric = metric.strip()
        if metric not in METRICS:
            raise config_error("--target", f"METRIC=VALUE with METRIC {one_of(METRICS)}", text,
                               did_you_mean(metric, METRICS))  # fmt: skip
        absolute = raw.strip().endswith("ms")
        try:
            value = float(raw.strip().removesuffix("ms"))
        except ValueError:
            value = math.nan
        if not sep or not value > 0 or (absolute and metric != "latency"):
            raise config_error("--target", "a ratio in (0, 1] of the dense model (latency=0.5) or an absolute "
                               "figure (latency=2.5ms, bytes=200000)", text)  # fmt: skip
        return cls(metric, value, absolute or value > 1)

    def budget(self, dense: float) -> float:
        return self.value if self.absolute else self.value * dense


def parse_techniques(text: str | Sequence[str]) -> list[str]:
    """``"channel,int8"`` (or a list) as a validated list; ``channel`` and ``unstructured`` exclude each other
    (a recipe holds one pruning callback)."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    for name in names:
        if name not in TECHNIQUES:
            raise config_error("--techniques", f"a comma-separated list of {one_of(TECHNIQUES)}", name,
                               did_you_mean(name, TECHNIQUES))  # fmt: skip
    if not names:
        raise config_error("--techniques", f"at least one of {one_of(TECHNIQUES)}", text)
    if "channel" in names and "unstructured" in names:
        raise config_error("--techniques", "at most one of 'channel' and 'unstructured' (one pruning callback)", text)
    return list(dict.fromkeys(names))


@dataclass
class Plan:
    """What :func:`plan_model` chose: ``{layer: Option}``, and the ``predicted`` / ``dense`` figures of the
    target metric (and of every metric the cost model counts), the sensitivity table and the seconds it took."""

    target: Target
    options: dict[str, Option]
    predicted: dict[str, float]
    dense: dict[str, float]
    predicted_loss: float
    sensitivity: Sensitivity
    seconds: float
    measured: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # the low-rank layers' ranks

    def settings(self) -> dict[str, dict[str, Any]]:
        """The compression sections of a recipe that carry out the plan (only those it needs)."""
        sections: dict[str, dict[str, Any]] = {}
        sparsity = {n: o.structure.value for n, o in self.options.items() if o.structure and
                    o.structure.kind in ("channels", "sparsity")}  # fmt: skip
        if sparsity:
            kind = next(o.structure.kind for o in self.options.values() if o.structure and o.structure.kind in
                        ("channels", "sparsity"))  # fmt: skip
            sections["pruning"] = {
                "pattern": "channel" if kind == "channels" else "unstructured",
                "final_sparsity": max(sparsity.values()), "include": sorted(sparsity), "layer_sparsity": sparsity,
            }  # fmt: skip
        ranks = {n: self.ranks[n] for n in sorted(self.ranks)}
        if ranks:
            sections["low_rank"] = {"include": sorted(ranks), "ranks": ranks}
        bits = {n: o.bits for n, o in self.options.items() if o.bits}
        if bits:
            sections["quantization"] = {"include": sorted(bits)}
            narrower = {n: b for n, b in sorted(bits.items()) if b != 8}
            if narrower:
                sections["quantization"]["layer_bits"] = narrower
        return sections


def _applicable(layers: Mapping[str, nn.Module], classifier: str | None) -> dict[str, set[str]]:
    """``{layer: the setting kinds it may take}``: the classifier keeps its outputs (no channels, no rank),
    grouped convolutions keep their groups, low-rank needs a fan-in worth factorising. (:func:`analyse` also
    takes channels from layers whose output channels are coupled through a residual add, which share one
    mask, and from layers whose channels a LayerNorm or attention mixes.)"""
    kinds: dict[str, set[str]] = {}
    for name, layer in layers.items():
        allowed = {"sparsity", "bits", "channels", "low_rank"}
        if name == classifier:
            allowed -= {"channels", "low_rank"}
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            allowed -= {"channels", "low_rank"}
        if weight_of(layer)[0].numel() < low_rank_core.MIN_FAN_IN or low_rank_core.skip_reason(layer) is not None:
            allowed.discard("low_rank")
        kinds[name] = allowed
    return kinds


@dataclass
class Analysis:
    """What planning measures once and allocates from many times: the sensitivity table, every layer's options
    with their predicted loss and costs, the dense model's figures and what lies outside the planned layers."""

    layers: dict[str, nn.Module]
    sensitivity: Sensitivity
    options: dict[str, dict[str, Option]]  # {layer: {str(option): option}}
    losses: dict[str, dict[str, float]]  # {layer: {str(option): predicted loss increase}}
    costs: dict[str, dict[str, dict[str, float]]]  # {layer: {str(option): {figure: cost}}}
    dense: dict[str, float]  # the whole dense model, by metric
    outside: dict[str, float]  # the dense model outside the planned layers, by metric
    seconds: float

    def lowest(self, metric: str) -> float:
        """The least the per-layer model predicts for ``metric``: every layer at its cheapest option."""
        key = COST_KEY[metric]
        return self.outside[metric] + sum(min(c[key] for c in self.costs[n].values()) for n in self.layers)

    def choose(self, target: Target, budget: float | None = None) -> Plan:
        """The allocation meeting ``target`` (or a ``budget`` of its metric given directly)."""
        started = time.perf_counter()
        key = COST_KEY[target.metric]
        choices = {name: [Choice(o, self.losses[name][o], self.costs[name][o][key]) for o in self.options[name]]
                   for name in self.layers}  # fmt: skip
        limit = target.budget(self.dense[target.metric]) if budget is None else budget
        picks = allocate(choices, limit, self.outside[target.metric])
        options = {n: self.options[n][c.option] for n, c in picks.items() if c.option != str(Option())}
        predicted = {metric: self.outside[metric] + sum(self.costs[n][picks[n].option][k] for n in self.layers)
                     for metric, k in COST_KEY.items()}  # fmt: skip
        ranks = {n: low_rank_rank(weight_of(self.layers[n]), o.structure.value) for n, o in options.items()
                 if o.structure and o.structure.kind == "low_rank"}  # fmt: skip
        seconds = self.seconds + time.perf_counter() - started
        return Plan(target, options, predicted, self.dense, sum(c.loss for c in picks.values()), self.sensitivity,
                    seconds, ranks=ranks)  # fmt: skip


def analyse(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    techniques: Sequence[str],
    batch_size: int,
    cache: str | Path | None = None,
    runs: int = 20,
    sensitivity_cache: str | Path | None = None,
) -> Analysis:
    """Measure what planning needs of ``model``: per-layer sensitivity to every candidate setting of
    ``techniques`` on ``batches``, per-layer costs of every option (latency at ``batch_size``, cached in
    ``cache``), and the dense model's own figures. With ``sensitivity_cache`` (a JSON file) the table is read
    from it when its key matches (same weights, settings and data) and written to it otherwise.

    Raises:
        CompressionConfigError: bad techniques, or no layer to plan.
    """
    started = time.perf_counter()
    techniques = parse_techniques(techniques)
    example = batches[0][0][:2]
    guards = {**attention_internals(model), **shared_weights(model)}
    calls = layer_calls(model, example)
    layers = {n: m for n, m in select_layers(model, types=(nn.Conv2d, nn.Linear)).items()
              if n in calls and n not in guards and weight_of(m).requires_grad}  # fmt: skip
    if not layers:
        raise CompressionConfigError(f"no trainable Conv2d/Linear layer of {type(model).__name__} to plan")
    classifier = next(reversed(list(calls)), None)
    kinds = _applicable(layers, classifier)
    if "channel" in techniques:  # one channel mask for coupled layers, none for mixed ones: not per layer
        tied = {n for group in coupled_layers(model, layers, example) if len(group) > 1 for n in group}
        for name in tied | set(entangled_layers(model, example)):
            kinds.get(name, set()).discard("channels")
    structures = [s for t in techniques for s in CANDIDATES.get(t, [])]
    widths = [BITS[t] for t in techniques if t in BITS]
    settings = structures + [Setting("bits", b) for b in widths]
    bn_pairs = find_bn_pairs(model, layers, example) if "channel" in techniques else {}
    table = _cached_sensitivity(sensitivity_cache, fingerprint(model, layers, settings, batches))
    if table is None:
        table = sensitivity(model, list(layers), settings, batches, applicable=lambda n, m, s: s.kind in kinds[n],
                            bn_pairs=bn_pairs)  # fmt: skip
        if sensitivity_cache is not None:
            Path(sensitivity_cache).parent.mkdir(parents=True, exist_ok=True)
            Path(sensitivity_cache).write_text(json.dumps(table.to_dict(), indent=1))
    model_costs = CostModel(batch_size, runs=runs, cache=cache)
    options: dict[str, dict[str, Option]] = {}
    losses: dict[str, dict[str, float]] = {}
    costs: dict[str, dict[str, dict[str, float]]] = {}
    for name in layers:
        structure_options: list[Setting | None] = [None] + [s for s in structures if str(s) in table.results[name]]
        width_options: list[int | None] = [None] + [b for b in widths if f"bits={b}" in table.results[name]]
        options[name], losses[name], costs[name] = {}, {}, {}
        for structure in structure_options:
            for bits in width_options:
                option = Option(structure, bits)
                parts = ([structure] if structure else []) + ([Setting("bits", bits)] if bits else [])
                options[name][str(option)] = option
                losses[name][str(option)] = sum(max(0.0, table.delta(name, part)["loss"]) for part in parts)
                costs[name][str(option)] = model_costs.costs(calls[name], option)
    model_costs.save()
    dense = _dense_figures(model, example, batch_size, runs)
    dense_option = str(Option())
    outside = {metric: max(0.0, dense[metric] - sum(costs[n][dense_option][key] for n in layers))
               for metric, key in COST_KEY.items()}  # fmt: skip
    return Analysis(layers, table, options, losses, costs, dense, outside, time.perf_counter() - started)


def _cached_sensitivity(path: str | Path | None, key: str) -> Sensitivity | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        saved = Sensitivity.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: measured again
    return saved if saved.key == key else None


def plot_sensitivity(table: Sensitivity, path: str | Path) -> Path:
    """One curve per layer and technique: the validation-loss increase against the setting's strength."""
    from lightning_compress.errors import require

    require("matplotlib", "plots", "the sensitivity plot").use("Agg")
    plt = require("matplotlib.pyplot", "plots", "the sensitivity plot")
    kinds = sorted({key.split("=")[0] for results in table.results.values() for key in results})
    figure, axes = plt.subplots(1, max(1, len(kinds)), figsize=(4.5 * max(1, len(kinds)), 3.6), squeeze=False)
    for axis, kind in zip(axes[0], kinds, strict=False):
        for layer, results in table.results.items():
            points = sorted((float(k.split("=")[1]), table.delta(layer, k)["loss"]) for k in results
                            if k.startswith(f"{kind}="))  # fmt: skip
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=layer)
        axis.set_xlabel({"bits": "weight bits", "low_rank": "kept parameter ratio"}.get(kind, f"{kind} pruned"))
        axis.set_ylabel("validation loss increase")
        axis.set_title(kind)
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


TIMING_ROUNDS = 3  # a whole file's latency: the median of this many medians (one spike does not move a plan)
CALIBRATED = ("latency", "bytes")  # metrics of the exported file: what the per-layer sum leaves out is measured
ROUNDS = 8  # allocations at most while calibrating (each distinct one exported and measured once)
TOLERANCE = 0.05  # a measured figure this close under the target ends the calibration


def plan_model(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    target: Target,
    techniques: Sequence[str],
    batch_size: int,
    cache: str | Path | None = None,
    runs: int = 20,
    calibrate: bool = True,
    sensitivity_cache: str | Path | None = None,
) -> Plan:
    """Choose per-layer settings of ``model`` (trained, dense, as the callbacks will see it) that meet ``target``.

    For ``latency`` and ``bytes`` (figures of the exported file) with ``calibrate``, each allocation is applied
    one-shot, exported and measured, and the budget handed to the allocator is scaled by target / measured
    until one budget's plan fits and another's does not, then bisected between them, up to :data:`ROUNDS`
    allocations: the per-layer sum does not see that pruning a layer's channels shrinks the
    next layer's inputs, nor the cost of moving between float and int8 layers. The plan whose measured figure
    is closest to the target without exceeding it is returned (else the lowest measured), its ``measured``
    figures filled in.

    Args:
        model: the model (a ``LightningModule`` or any module; names are its ``named_modules``).
        batches: validation ``(input, label)`` batches for the sensitivity analysis (a few).
        target: what to meet.
        techniques: what may be used (see :data:`TECHNIQUES`).
        batch_size: the batch size latencies are measured at.
        cache: a JSON file for the latency measurements.
        runs: timed calls per latency.
        calibrate: measure and correct as above (else the per-layer prediction alone).
        sensitivity_cache: a JSON file the sensitivity table is kept in (see :func:`analyse`).

    Raises:
        CompressionConfigError: bad techniques, no layer to plan, or a target the techniques cannot reach.
    """
    started = time.perf_counter()
    analysis = analyse(model, batches, techniques, batch_size, cache, runs, sensitivity_cache)
    if not calibrate or target.metric not in CALIBRATED:
        return analysis.choose(target)
    goal = target.budget(analysis.dense[target.metric])
    budget = goal
    try:
        plan = analysis.choose(target)
    except CompressionConfigError:  # by the per-layer sum; what the file measures may still meet it
        budget = analysis.lowest(target.metric)
        plan = analysis.choose(target, budget)
    tried: list[Plan] = []
    seen: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}  # a plan measured once, however many budgets
    fits: float | None = None  # the largest budget whose plan measured within the goal
    exceeds: float | None = None  # the smallest budget whose plan measured over it
    lowest = analysis.lowest(target.metric)
    for _ in range(ROUNDS):
        key = tuple(sorted((name, str(option)) for name, option in plan.options.items()))
        if key not in seen:
            seen[key] = measure_plan(model, plan, batches, batch_size, runs)
            tried.append(plan)
        plan.measured = seen[key]
        measured = plan.measured[target.metric]
        if goal * (1 - TOLERANCE) <= measured <= goal:
            break
        if measured <= goal:
            fits = budget if fits is None else max(fits, budget)
        else:
            exceeds = budget if exceeds is None else min(exceeds, budget)
            if budget <= lowest:  # the cheapest options were measured: nothing smaller to try
                break
        if fits is not None and exceeds is not None:  # bracketed: bisect (the measured figure is not a sum)
            budget = (fits + exceeds) / 2
        else:  # not yet: scale by what the file measured, never below the cheapest options
            budget = max(lowest, budget * goal / measured)
        plan = analysis.choose(target, budget)
    fitting = [p for p in tried if p.measured[target.metric] <= goal]
    best = max(fitting, key=lambda p: p.measured[target.metric]) if fitting else min(
        tried, key=lambda p: p.measured[target.metric])  # fmt: skip
    if best.measured[target.metric] > goal * (1 + TOLERANCE):
        raise CompressionConfigError(
            f"the target {target.metric}={target.value} ({goal:.6g}) cannot be met: the smallest plan measured "
            f"{best.measured[target.metric]:.6g} (dense {analysis.dense[target.metric]:.6g}). HINT: allow more "
            "techniques (int8, low_rank) or set a looser target"
        )
    best.seconds = time.perf_counter() - started
    return best


def _dense_figures(model: nn.Module, example: Tensor, batch_size: int, runs: int) -> dict[str, float]:
    """The dense fp32 model's ``latency`` and ``bytes`` (its exported file, timed by ONNX Runtime at ``batch_size``,
    and its size) and ``params`` / ``macs`` (per sample), counted the way the cost model counts layers."""
    from lightning_compress.deploy.measure import count_macs, count_parameters

    return {
        **_file_figures(model, example, batch_size, runs, int8=False),
        "params": float(count_parameters(model)),
        "macs": float(count_macs(model, example[:1])[1]),
    }


def _file_figures(model: nn.Module, example: Tensor, batch_size: int, runs: int, int8: bool) -> dict[str, float]:
    """``latency`` (ms at ``batch_size``) and ``bytes`` of the model's ONNX file (int8 QDQ with ``int8``)."""
    from lightning_compress.deploy.measure import ort_latency_ms
    from lightning_compress.deploy.shrink import remove_zero_channels

    batch = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        if int8:
            export_onnx(model, example, path, int8=True, physical=True)
        else:
            smaller = remove_zero_channels(float_copy(model), example)[0]
            export_onnx(smaller, example, path)
        rounds = [ort_latency_ms(path, batch, runs=runs, warmup=5) for _ in range(TIMING_ROUNDS)]
        return {"latency": statistics.median(rounds), "bytes": float(path.stat().st_size)}


def apply_plan(model: nn.Module, plan: Plan, batches: Sequence[tuple[Tensor, Tensor]]) -> nn.Module:
    """A copy of ``model`` with the plan applied one-shot (factorised at its ranks, pruned to its sparsities,
    fake-quantised at its widths with ranges observed on ``batches``): what its figures are measured on."""
    model = float_copy(model).eval()  # masks folded, fake quantisation off: the plan alone decides
    example = batches[0][0][:2]
    sections = plan.settings()
    if "low_rank" in sections:
        chosen, _ = low_rank_core.plan(model, ratio=0.5, include=sections["low_rank"]["include"], ranks=plan.ranks)
        swap_modules(model, {name: new for name, (new, _) in chosen.items()})
    if "pruning" in sections:
        settings = sections["pruning"]
        prune(model, settings["final_sparsity"], settings["pattern"], scope="layer", include=settings["include"],
              example=example, layer_sparsity=settings["layer_sparsity"])  # fmt: skip
    if "quantization" in sections:
        settings = sections["quantization"]
        include = follow_replaced(settings["include"], model, plan.ranks)  # factorised: their factors
        layers = quant.attach(model, quant.QuantConfig(), include=include)
        quant.set_weight_bits(model, settings.get("layer_bits", {}))
        quant.link_batchnorms(model, find_bn_pairs(model, layers, example))
        quant.enable(model)
        model.train()
        for module in model.modules():  # observe ranges, keep BatchNorm statistics as trained
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        with torch.no_grad():
            for x, _ in batches:
                model(x)
        model.eval()
    return model


def measure_plan(model: nn.Module, plan: Plan, batches: Sequence[tuple[Tensor, Tensor]], batch_size: int,
                 runs: int = 20) -> dict[str, float]:  # fmt: skip
    """The planned model's measured figures: ``latency`` and ``bytes`` of its exported file (int8 where
    quantised) at ``batch_size``, ``params`` / ``macs`` counted, and ``accuracy`` / ``loss`` on ``batches``
    (one-shot, before any training)."""
    from lightning_compress.core.sensitivity import evaluate
    from lightning_compress.deploy.measure import count_macs, count_nonzero

    applied = apply_plan(model, plan, batches)
    example = batches[0][0][:2]
    int8 = bool(quant.quantized_layers(applied))
    figures = evaluate(applied, batches)
    figures.update(_file_figures(applied, example, batch_size, runs, int8=int8))
    figures["params"] = float(count_nonzero(applied))
    figures["macs"] = float(count_macs(applied, example[:1])[1])
    return figures
