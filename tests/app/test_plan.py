"""``lightning-compress plan``: a planned recipe written, validated and trained (#17)."""

from pathlib import Path

import yaml

from lightning_compress.app.cli import main
from lightning_compress.config import load_recipe
from tests.app.test_cli import QUICKSTART


def test_plan_writes_a_recipe_that_validates_and_trains(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "planned.yaml"
    code = main(["plan", QUICKSTART, "--target", "params=0.5", "--techniques", "channel,int8", "--out", str(out),
                 "--runs", "3", "--trainer.max_epochs=3"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "params dense 12162" in printed
    text = out.read_text()
    assert text.startswith("# Planned by `lightning-compress plan") and "predicted" in text and "measured" in text
    config = yaml.safe_load(text)
    pruning = config["compression"]["pruning"]
    assert pruning["pattern"] == "channel" and set(pruning["layer_sparsity"]) == set(pruning["include"])
    assert out.with_suffix(".sensitivity.png").stat().st_size > 0 and out.with_suffix(".latency.json").is_file()
    assert yaml.safe_load(out.with_suffix(".sensitivity.json").read_text())["samples"] == 128
    callbacks = {type(c).__name__ for c in load_recipe(out).callbacks()}
    assert "MagnitudePruning" in callbacks
    assert main(["fit", str(out), "--trainer.max_epochs=2"]) == 0  # the planned recipe trains
    assert "'pruning/sparsity'" in capsys.readouterr().out
    assert main(["plan", QUICKSTART, "--target", "latency=0.0001ms", "--out", str(tmp_path / "x.yaml"),
                 "--epochs", "0", "--runs", "2"]) == 2  # fmt: skip
    assert "cannot be met" in capsys.readouterr().err


def test_a_recipe_plans_inside_its_fit_with_a_budget_section(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = yaml.safe_load(Path(QUICKSTART).read_text())
    recipe["trainer"]["max_epochs"] = 2
    recipe["compression"] = {
        "budget": {"target": "params=0.6", "epoch": 1, "runs": 2},
        "pruning": {"pattern": "channel", "start_epoch": 1, "end_epoch": 2},
    }
    path = tmp_path / "budgeted.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert [type(c).__name__ for c in load_recipe(path).callbacks()] == ["BudgetPlanner", "MagnitudePruning"]
    assert main(["fit", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "'budget/params_dense': 12162" in out and "'budget/params_predicted'" in out
