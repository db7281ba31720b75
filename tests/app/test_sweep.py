import csv
from pathlib import Path

import pytest
import yaml

from lightning_compress.app.sweep import load_sweep, pareto_front, run_sweep, trials
from lightning_compress.config import load_recipe
from lightning_compress.errors import CompressionConfigError

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.yaml"))


def write(tmp_path, **changes):
    sweep = yaml.safe_load(SWEEPS[0].read_text())
    sweep["command"] = [c.replace("recipes/", str(ROOT / "recipes") + "/") for c in sweep["command"]]
    sweep.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweeps_are_valid_wandb_sweeps(path):
    sweep = load_sweep(path)
    assert sweep["command"][-1] == "${args}" and "fit" in sweep["command"]
    assert (ROOT / sweep["recipe"]).exists()
    for parameters in trials(sweep, 3):  # every swept key is a valid override of its recipe
        load_recipe(ROOT / sweep["recipe"], [f"--{key}={value}" for key, value in parameters.items()])


def test_grid_and_random_trials():
    sweep = {"method": "grid", "parameters": {"a": {"values": [1, 2]}, "b": {"values": ["x", "y"]}, "c": {"value": 0}}}
    assert trials(sweep, 3) == [{"a": 1, "b": "x", "c": 0}, {"a": 1, "b": "y", "c": 0}, {"a": 2, "b": "x", "c": 0}]
    sweep = {"method": "random", "parameters": {"a": {"min": 0.5, "max": 0.9}, "b": {"min": 1, "max": 3}}}
    drawn = trials(sweep, 20, seed=1)
    assert len(drawn) == 20 and all(0.5 <= t["a"] <= 0.9 and t["b"] in (1, 2, 3) for t in drawn)
    assert drawn == trials(sweep, 20, seed=1)


def test_pareto_front():
    points = [(0.9, 100.0), (0.95, 200.0), (0.85, 150.0), (0.95, 300.0), (0.8, 50.0)]
    assert pareto_front(points) == [0, 1, 4]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "bayes"}, "`method` must be one of 'grid', 'random'"),
        ({"metric": {"goal": "maximize"}}, "`metric` must be"),
        ({"parameters": {"trainer.max_epochs": 3}}, r"`parameters.trainer.max_epochs` must be \{values"),
        ({"command": ["python", "-m", "lightning_compress", "fit"]}, "`command` must be a list running"),
        ({"metrc": {}}, "did you mean 'metric'"),
    ],
)
def test_sweep_errors(tmp_path, changes, message):
    with pytest.raises(CompressionConfigError, match=message):
        load_sweep(write(tmp_path, **changes))


def test_a_local_sweep_writes_results_and_the_pareto_plot(tmp_path):
    parameters = {
        "compression.pruning.final_sparsity": {"values": [0.5, 0.9]},
        "compression.pruning.end_epoch": {"value": 1},
        "trainer.max_epochs": {"value": 1},
    }
    rows = run_sweep(write(tmp_path, parameters=parameters), count=2, out=tmp_path / "out")
    with open(tmp_path / "out" / "results.csv") as handle:
        saved = list(csv.DictReader(handle))
    assert [float(r["compression.pruning.final_sparsity"]) for r in saved] == [0.5, 0.9]
    assert float(saved[1]["model_bytes"]) < float(saved[0]["model_bytes"])  # sparser: fewer bytes
    assert all(0 < float(r["val/acc"]) <= 1 for r in saved) and any(r["pareto"] == "True" for r in saved)
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "out").glob("trial-*")) == ["trial-0", "trial-1"]  # each a logged run
    assert rows[1]["pareto"]  # fewest bytes is always on the front


def test_a_local_sweep_logs_each_trial_and_the_pareto_front_to_wandb(tmp_path, monkeypatch):
    from tests.helpers import wandb_config, wandb_logged, wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    parameters = {
        "compression.pruning.final_sparsity": {"values": [0.5, 0.9]},
        "compression.pruning.end_epoch": {"value": 1},
        "trainer.max_epochs": {"value": 1},
    }
    run_sweep(write(tmp_path, parameters=parameters), count=2, out=tmp_path / "out", wandb_project="lc-sweep")
    runs = {}
    for run_file in (tmp_path / "out").rglob("run-*.wandb"):
        records = wandb_records(run_file)
        run = next((r.run for r in records if r.HasField("run")), None)
        kinds = [r.WhichOneof("record_type") for r in records]  # once seen empty under make test: say what it held
        assert run is not None, f"{run_file.name} ({run_file.stat().st_size} bytes) has no run record: {kinds}"
        runs[run.display_name] = (run, wandb_logged(run_file), wandb_config(run_file))
    assert sorted(runs) == ["pareto", "trial-0", "trial-1"]  # one W&B run each (an open run took the next trial's)
    assert len({run.run_id for run, _, _ in runs.values()}) == 3
    assert len({run.run_group for run, _, _ in runs.values()}) == 1 and runs["pareto"][0].run_group.startswith(
        "digits-sparsity-")
    sparsities = [runs[f"trial-{i}"][2]["recipe"]["compression"]["pruning"]["final_sparsity"] for i in (0, 1)]
    assert sparsities == [0.5, 0.9] and all(0 < runs[f"trial-{i}"][1]["val/acc"] <= 1 for i in (0, 1))
    summary = runs["pareto"][1]
    assert summary["sweep/results/_type"] == "table-file" and summary["sweep/pareto_front/_type"] == "table-file"
    assert summary["sweep/pareto/_type"] == "image-file"
    assert runs["pareto"][2]["sweep"]["metric"]["name"] == "val/acc"


def test_check_runs_one_short_trial_and_names_a_metric_the_recipe_does_not_log(tmp_path):
    from lightning_compress.app.cli import main
    from lightning_compress.app.sweep import check_sweep

    figures = check_sweep(write(tmp_path), tmp_path / "out")
    assert 0 < figures["val/acc"] <= 1
    wrong = write(tmp_path, metric={"name": "val_acc", "goal": "maximize"})
    with pytest.raises(CompressionConfigError, match=r"metric.name 'val_acc' is not logged by its recipe, which logs "
                       r".*val/acc.* HINT: did you mean 'val/acc'\?"):  # fmt: skip
        check_sweep(wrong, tmp_path / "out")
    assert main(["sweep", str(wrong), "--check", "--out", str(tmp_path / "out")]) == 2
