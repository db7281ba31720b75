import itertools
import random

import pytest

from lightning_compress.core.allocation import RESOLUTION, Choice, allocate, total_cost
from lightning_compress.errors import CompressionConfigError


def random_layers(rng: random.Random, count: int = 5) -> dict[str, list[Choice]]:
    return {
        f"l{i}": [Choice("dense", 0.0, rng.uniform(5, 10))]
        + [Choice(f"o{j}", rng.uniform(0, 1), rng.uniform(0.5, 9)) for j in range(3)]
        for i in range(count)
    }


def best_loss(layers: dict[str, list[Choice]], budget: float) -> float:
    fits = [c for c in itertools.product(*layers.values()) if sum(x.cost for x in c) <= budget]
    return min(sum(x.loss for x in combo) for combo in fits) if fits else float("inf")


def test_the_plan_meets_the_budget_and_beats_every_plan_of_a_slightly_smaller_one():
    rng = random.Random(0)
    exact = feasible = 0
    for _ in range(200):
        layers = random_layers(rng)
        budget = sum(options[0].cost for options in layers.values()) * rng.uniform(0.3, 0.9)
        if sum(min(c.cost for c in options) for options in layers.values()) > budget:
            continue
        feasible += 1
        picks = allocate(layers, budget)
        assert set(picks) == set(layers) and total_cost(picks) <= budget
        loss = sum(c.loss for c in picks.values())
        assert loss <= best_loss(layers, budget * (1 - len(layers) / RESOLUTION)) + 1e-9
        exact += abs(loss - best_loss(layers, budget)) < 1e-9
    assert exact >= 0.95 * feasible  # the optimum itself but on knife-edge budgets (173 of 173 here)


def test_a_fixed_cost_counts_against_the_budget_and_the_slack_is_spent():
    layers = {"a": [Choice("dense", 0.0, 10.0), Choice("half", 0.2, 5.0)],
              "b": [Choice("dense", 0.0, 10.0), Choice("half", 0.01, 5.0)]}  # fmt: skip
    assert {n: c.option for n, c in allocate(layers, 15.0).items()} == {"a": "dense", "b": "half"}
    assert {n: c.option for n, c in allocate(layers, 13.0, fixed=3.0).items()} == {"a": "half", "b": "half"}
    assert {n: c.option for n, c in allocate(layers, 100.0).items()} == {"a": "dense", "b": "dense"}


def test_an_unreachable_budget_says_the_lowest_reachable_cost():
    layers = {"a": [Choice("dense", 0.0, 10.0), Choice("half", 0.2, 5.0)]}
    with pytest.raises(CompressionConfigError, match=r"the budget 4 cannot be met: .* costs 6 in all \(1 outside"):
        allocate(layers, 4.0, fixed=1.0)
    with pytest.raises(CompressionConfigError, match=r"no option to choose from for the layers \['b'\]"):
        allocate({**layers, "b": []}, 10.0)
