from pathlib import Path

import pytest

from lightning_compress.config import load_recipe
from tests.helpers import cifar_checksums_off, wandb_config, wandb_logged, wandb_records, write_cifar10, write_pngs

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "recipes" / "digits" / "quickstart.yaml"
QUICK = ["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
QUICK += ["--compression.pruning.start_epoch=0", "--compression.pruning.end_epoch=1"]
QUICK += ["--compression.quantization.start_epoch=1", "--compression.export.plots=false"]


def test_a_recipe_trains(tmp_path):
    import lightning.pytorch as pl

    path = QUICKSTART
    recipe = load_recipe(path, ["trainer.max_epochs=1", "compression.pruning.end_epoch=1"])
    pl.seed_everything(recipe.seed, verbose=False)
    trainer = pl.Trainer(
        callbacks=recipe.callbacks(), logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
        **recipe.trainer_kwargs(),
    )  # fmt: skip
    model = recipe.model()
    trainer.fit(model, datamodule=recipe.datamodule())
    assert 0.75 < float(trainer.callback_metrics["pruning/sparsity"]) < 0.85


@pytest.mark.slow
def test_teacher_then_full_pipeline_recipes_run_end_to_end(tmp_path, monkeypatch, capsys):
    import json

    from lightning_compress.app.cli import main

    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.enable_progress_bar=false", "--data.name=digits"]
    teacher = str(ROOT / "recipes" / "mnist5k" / "teacher_dense.yaml")
    assert main(["fit", teacher, "--trainer.max_epochs=1", *quick]) == 0
    full = str(ROOT / "recipes" / "mnist5k" / "full_pipeline.yaml")
    overrides = ["--trainer.max_epochs=3", "--compression.pruning.end_epoch=2"]
    overrides += ["--compression.quantization.start_epoch=2"]
    assert main(["fit", full, *overrides, *quick]) == 0
    report = json.loads((tmp_path / "runs" / "mnist5k-full" / "report.json").read_text())
    assert set(report["files"]) == {"checkpoint", "onnx", "onnx_int8"}
    assert all(check["passed"] for check in report["verification"].values())
    assert report["after"]["nonzero_params"] < 0.35 * report["before"]["params"]
    assert "kd/response_loss" in capsys.readouterr().out


@pytest.mark.slow
def test_the_self_distillation_recipe_runs_end_to_end(tmp_path, monkeypatch, capsys, caplog):
    import json
    import re

    from lightning_compress.app.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes" / "mnist5k" / "self_distill.yaml")
    overrides = ["--trainer.enable_progress_bar=false", "--data.name=digits", "--trainer.max_epochs=4",
                 "--compression.pruning.start_epoch=1", "--compression.pruning.end_epoch=2",
                 "--compression.quantization.start_epoch=3"]  # fmt: skip
    assert main(["fit", recipe, *overrides]) == 0
    report = json.loads((tmp_path / "runs" / "mnist5k-self-distilled" / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values()) and "onnx_int8" in report["files"]
    assert report["baseline"]["source"] == "teacher"  # the dense copy: what compression cost
    assert "kd/response_loss" in capsys.readouterr().out
    assert re.search(r"teacher='self' is a frozen dense float copy of the model at step \d+ \(epoch 1\), before "
                     "MagnitudePruning", caplog.text)  # fmt: skip


def test_a_recipe_run_sends_every_figure_to_wandb(tmp_path, monkeypatch):
    import torch

    from lightning_compress import ClassificationModule
    from lightning_compress.app.run import train_recipe

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    teacher = ClassificationModule("cnn_tiny", 10, 1)
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, "teacher.ckpt")
    overrides = [
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--compression.pruning.end_epoch=1",
        "--compression.low_rank.epoch=1", "--compression.low_rank.include=[model.classifier.1]",
        "--compression.quantization.start_epoch=1", "--compression.distillation.teacher=teacher.ckpt",
        "--compression.export.dirpath=out",
        "--logger.wandb.project=lc-tests", f"--logger.wandb.save_dir={tmp_path}", "--logger.wandb.mode=offline",
    ]  # fmt: skip
    figures = train_recipe(str(ROOT / "recipes" / "digits" / "quickstart.yaml"), overrides)
    int8_file = (tmp_path / "out" / "model.int8.onnx").stat().st_size
    assert 0 < figures["model_bytes"] < int8_file  # the exported int8 file, compressed: pruned zeros count
    (run_file,) = tmp_path.rglob("run-*.wandb")  # one run, finished when the fit ended
    summary = wandb_logged(run_file)
    for key in ("pruning/sparsity", "qat/enabled", "kd/loss", "lowrank/layers", "export/params_ratio", "val/acc"):
        assert key in summary, key
    config = wandb_config(run_file)
    assert config["recipe"]["compression"]["pruning"]["final_sparsity"] == 0.8  # the resolved recipe
    # intact beside the module's hyper-parameters, which Lightning logs at the top level (before: the recipe's
    # `model` section was overwritten by the hyper-parameter `model: cnn_tiny`)
    assert config["recipe"]["model"] == {"model": "cnn_tiny", "lr": 0.002} and config["model"] == "cnn_tiny"
    assert summary["export/baseline_accuracy"] > 0  # the teacher's: the recipe distils
    assert summary["export/plots/before_after/_type"] == "image-file"  # the plots, as images
    assert summary["export/layers/_type"] == "table-file"
    artifacts = [r.artifact for r in wandb_records(run_file) if r.HasField("artifact")]
    assert [a.name for a in artifacts if a.type == "model"] == ["compressed-quickstart"]  # one name per recipe


@pytest.mark.slow
def test_cifar10_recipes_train_on_files_on_disk_and_chain_teacher_to_student(tmp_path, monkeypatch):
    import json

    from lightning_compress.app.cli import main

    monkeypatch.chdir(tmp_path)
    cifar_checksums_off(monkeypatch)
    write_cifar10(tmp_path / "data" / "cifar10", per_file=8)
    small = [*QUICK, "--data.batch_size=16", "--data.num_workers=0"]
    assert main(["fit", str(ROOT / "recipes" / "cifar10" / "resnet18.yaml"), *small]) == 0
    report = json.loads((tmp_path / "runs" / "cifar10-resnet18" / "report.json").read_text())
    assert report["structure"]["physical"] and report["after"]["params"] < 0.3 * report["before"]["params"]
    assert report["files"]["onnx_int8"]["bytes"] < 0.4 * report["files"]["onnx"]["bytes"]  # int8: smaller too
    assert all(check["passed"] for check in report["verification"].values())
    # the student recipe's teacher is the file the first recipe exported
    assert main(["fit", str(ROOT / "recipes" / "cifar10" / "mobilenet_v3_small.yaml"), *small]) == 0
    report = json.loads((tmp_path / "runs" / "cifar10-mobilenet_v3_small" / "report.json").read_text())
    assert set(report["files"]) == {"checkpoint", "onnx", "onnx_int8"}


def test_cifar10_recipe_without_the_data_is_exit_2_with_the_folder_named(tmp_path, monkeypatch, capsys):
    from lightning_compress.app.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit", str(ROOT / "recipes" / "cifar10" / "resnet18.yaml"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "CIFAR10 is not under `root` 'data/cifar10'" in err and "data/cifar10/cifar-10-batches-py" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_imagefolder_recipe_trains_on_a_folder_of_images(tmp_path, monkeypatch):
    import json

    from lightning_compress.app.cli import main

    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "images", classes=("a", "b", "c"), per_class=6, size=40)
    recipe = str(ROOT / "recipes" / "imagefolder" / "prune_quantize.yaml")
    assert main(["fit", recipe, *QUICK, "--data.root=images", "--data.image_size=32", "--data.batch_size=8"]) == 0
    report = json.loads((tmp_path / "runs" / "imagefolder-mobilenet_v2" / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values())
