import subprocess
import sys
from pathlib import Path

import pytest

from lightning_compress.app.cli import main


def test_bad_input_exits_2_with_a_message(capsys):
    assert main(["demo", "--model", "cnn_smal", "--data", "digits", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "`model` must be one of" in err and "did you mean 'cnn_small'" in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "lightning_compress", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout


def test_export_a_checkpoint(tmp_path, capsys):
    import json

    import lightning.pytorch as pl

    from lightning_compress import ClassificationModule, MagnitudePruning, QuantizationAwareTraining, get_datamodule

    pl.seed_everything(0, verbose=False)
    module = ClassificationModule("cnn_tiny", 10, 1)
    callbacks = [MagnitudePruning(0.5, pattern="channel", end_epoch=1), QuantizationAwareTraining(start_epoch=1)]
    trainer = pl.Trainer(max_epochs=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=get_datamodule("digits"))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    assert main(["export", str(tmp_path / "run.ckpt"), "--out", str(tmp_path / "out"), "--data", "digits"]) == 0
    assert "wrote checkpoint, onnx, onnx_int8 and report.json" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["structure"]["physical"] and all(c["passed"] for c in report["verification"].values())
    assert "ort_accuracy" not in report["before"] and 0 < report["after"]["ort_accuracy"] <= 1
    out = tmp_path / "unsigned"
    assert main(["export", str(tmp_path / "run.ckpt"), "--out", str(out), "--data", "digits", "--int8-weights",
                 "uint8"]) == 0  # fmt: skip  (exact in ONNX Runtime on every CPU)
    assert json.loads((out / "report.json").read_text())["files"]["onnx_int8"]["weights"] == "uint8"


def test_export_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "x.ckpt").write_bytes(b"no")
    assert main(["export", str(tmp_path / "x.ckpt")]) == 2
    assert "cannot read the checkpoint" in capsys.readouterr().err
    import torch

    torch.save({"state_dict": {}}, tmp_path / "y.ckpt")
    assert main(["export", str(tmp_path / "y.ckpt")]) == 2
    assert "needs a checkpoint of lightning_compress's ClassificationModule" in capsys.readouterr().err


QUICKSTART = str(Path(__file__).resolve().parents[2] / "recipes" / "digits" / "quickstart.yaml")


def test_fit_a_recipe_with_overrides(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", QUICKSTART, "--trainer.max_epochs=1", "--compression.pruning.end_epoch=1"]) == 0
    out = capsys.readouterr().out
    assert "'pruning/sparsity': 0.8" in out


def test_validate_and_print_config(capsys):
    assert main(["validate", QUICKSTART]) == 0
    assert "valid (MagnitudePruning)" in capsys.readouterr().out
    assert main(["fit", QUICKSTART, "--print-config", "--compression.pruning.final_sparsity=0.95"]) == 0
    assert "final_sparsity: 0.95" in capsys.readouterr().out


def test_recipe_problems_exit_2_listing_all_of_them(capsys):
    assert main(["validate", QUICKSTART, "--trainer.max_epoch=1", "--compression.prunning.final_sparsity=2"]) == 2
    err = capsys.readouterr().err
    assert "trainer.max_epoch: unknown key" in err and "compression.prunning: unknown key" in err
    assert "did you mean 'pruning'" in err and "Traceback" not in err


def test_a_trial_run_exactly_as_wandb_agent_runs_it_records_the_metric_in_its_wandb_run(tmp_path):
    # `wandb agent` runs the sweep's `command` with its macros replaced (${env}: /usr/bin/env, ${program}: the
    # sweep's `program`, ${args}: the parameters as --key=value) and WANDB_SWEEP_ID / WANDB_RUN_ID set. Before:
    # the recipes have no `logger:` and no W&B run was written, so the sweep never saw `val/acc`.
    import os

    import yaml

    from tests.helpers import wandb_logged

    sweep = yaml.safe_load((Path(QUICKSTART).parents[1] / "sweeps" / "digits_sparsity.yaml").read_text())
    assert sweep["program"] == "lightning-compress"
    args = ["--compression.pruning.final_sparsity=0.9", "--trainer.max_epochs=1", "--compression.pruning.end_epoch=1"]
    macros = {"${env}": ["/usr/bin/env"], "${program}": [sweep["program"]], "${args}": args,
              "recipes/digits/quickstart.yaml": [QUICKSTART]}  # fmt: skip
    command = [part for item in sweep["command"] for part in macros.get(item, [item])]
    assert command[:3] == ["/usr/bin/env", "lightning-compress", "fit"]
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the agent's activated env
    agent = {"PATH": path, "WANDB_SWEEP_ID": "sw1", "WANDB_RUN_ID": "trial1", "WANDB_PROJECT": "lc-sweep",
             "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ,
                          **agent})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'pruning/sparsity': 0.9" in done.stdout
    run_files = list(tmp_path.rglob("run-trial1.wandb"))
    assert len(run_files) == 1, sorted(str(p) for p in tmp_path.rglob("*"))[:20]
    logged = wandb_logged(run_files[0])
    assert sweep["metric"]["name"] in logged and 0 < logged["val/acc"] <= 1, sorted(logged)
    assert logged["pruning/sparsity"] == pytest.approx(0.9)


def test_sweep_command(tmp_path, capsys):
    import yaml

    sweep = yaml.safe_load((Path(QUICKSTART).parents[1] / "sweeps" / "digits_sparsity.yaml").read_text())
    sweep["command"] = [QUICKSTART if c.endswith(".yaml") else c for c in sweep["command"]]
    sweep["parameters"].update({"trainer.max_epochs": {"value": 1}, "compression.pruning.end_epoch": {"value": 1}})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--count", "1", "--out", str(tmp_path / "out")]) == 0
    assert "1 trials; results.csv and pareto.png in" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("method: bayes\n")
    assert main(["sweep", str(tmp_path / "bad.yaml")]) == 2


def test_the_main_job_pipeline_prints_dense_vs_compressed_and_keeps_its_results(tmp_path, capfd, caplog, recwarn):
    import logging

    caplog.set_level(logging.INFO, logger="lightning.pytorch")  # as a user's run: the suite quiets Lightning
    out_dir = tmp_path / "demo-output"
    assert main(["pipeline", "--data", "digits", "--teacher-epochs", "1", "--epochs", "3", "--out", str(out_dir)]) == 0
    captured = capfd.readouterr()
    out = captured.out
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert [line[:5] for line in progress] == ["[1/3]", "[2/3]", "[3/3]"] and "teacher cnn_wide" in progress[0]
    assert {"teacher.onnx", "dense.onnx", "results.md", "compressed"} <= {p.name for p in out_dir.iterdir()}
    assert {"report.md", "before_after.png", "model.int8.onnx"} <= {p.name for p in (out_dir / "compressed").iterdir()}
    assert f"kept in {out_dir}/" in out and "| dense cnn_small |" in (out_dir / "results.md").read_text()
    logged = [record.getMessage() for record in caplog.records]
    assert any("GPU available" in m for m in logged)  # Lightning's own lines still reach the user...
    assert not any("litlogger" in m for m in logged)  # ...less its advertisement and torch's pytree deprecation
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)] and "LeafSpec" not in captured.err
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    dense, compressed = rows["dense cnn_small"], rows["cnn_small: low-rank + GMP 80% + QAT int8 + KD"]
    size = lambda row: float(row[0].strip().replace(",", ""))  # noqa: E731
    assert size(compressed) < 0.25 * size(dense) and float(compressed[2]) > 0.2  # int8 file; ORT accuracy
