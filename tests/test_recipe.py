import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.errors import CompressionConfigError
from lightning_compress.recipe import load_recipe
from tests.helpers import cifar_checksums_off, write_cifar10, write_pngs

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "sweeps")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_is_valid_and_builds_its_callbacks(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative file paths (teachers, export folders) resolve here
    text = path.read_text()
    assert text.startswith("#") and "Run" in text.split("\nseed")[0]  # a header saying how to run it
    recipe = load_recipe(path)
    assert recipe.trainer_kwargs()["max_epochs"] > 0
    if "distillation" in recipe.config["compression"]:  # its teacher comes from another recipe
        teachers = r"runs/(mnist5k-teacher|cifar10-resnet18)/model.ckpt.*no such file"
        with pytest.raises(CompressionConfigError, match=teachers):
            recipe.callbacks()
    else:
        assert recipe.callbacks()


def test_overrides_in_the_wandb_agent_form():
    path = next(p for p in RECIPES if p.name == "prune_quantize_export.yaml")
    recipe = load_recipe(path, ["--compression.pruning.final_sparsity=0.95", "trainer.max_epochs=3"])
    pruning = next(c for c in recipe.callbacks() if isinstance(c, MagnitudePruning))
    assert pruning.final_sparsity == 0.95 and recipe.trainer_kwargs()["max_epochs"] == 3
    assert [type(c).__name__ for c in recipe.callbacks()][:2] == ["MagnitudePruning", "QuantizationAwareTraining"]
    assert any(isinstance(c, QuantizationAwareTraining) for c in recipe.callbacks())


def test_every_problem_is_reported_at_once_with_its_key_path():
    config = {
        "sead": 1,
        "trainer": {"max_epoch": 3},
        "compression": {"pruning": {"final_sparsity": 1.5}, "quantisation": {}, "low_rank": {"rnak": 3}},
        "logger": {"wandbb": {}},
        "model": {"class_path": "os.system"},
    }
    with pytest.raises(CompressionConfigError) as caught:
        load_recipe(config)
    message = str(caught.value)
    assert "sead: unknown key" in message and "did you mean 'seed'" in message
    config.pop("sead")
    with pytest.raises(CompressionConfigError) as caught:
        load_recipe(config)
    message = str(caught.value)
    for expected in (
        "trainer.max_epoch: unknown key", "did you mean 'max_epochs'",
        "compression.pruning: `final_sparsity` must be in [0, 1), got 1.5",
        "compression.quantisation: unknown key", "did you mean 'quantization'",
        "compression.low_rank.rnak: unknown key", "did you mean 'rank'",
        "logger.wandbb: unknown key", "model.class_path: must be the import path of a LightningModule subclass",
    ):  # fmt: skip
        assert expected in message, expected


@pytest.mark.parametrize("path", ["os.system", "builtins.eval", "subprocess.Popen", "no.such.Module", "Trainer"])
def test_class_path_reaches_only_lightning_classes(path):
    with pytest.raises(CompressionConfigError, match="must be the import path of a LightningModule subclass"):
        load_recipe({"model": {"class_path": path}})


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(CompressionConfigError, match="cannot read the recipe"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(CompressionConfigError, match="a recipe must be a mapping of sections"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(CompressionConfigError, match=r"override 'trainer' must look like key.path=VALUE"):
        load_recipe({}, ["trainer"])


def test_a_recipe_trains(tmp_path):
    import lightning.pytorch as pl

    path = next(p for p in RECIPES if p.name == "quickstart.yaml")
    recipe = load_recipe(path, ["trainer.max_epochs=1", "compression.pruning.end_epoch=1"])
    pl.seed_everything(recipe.seed, verbose=False)
    trainer = pl.Trainer(
        callbacks=recipe.callbacks(), logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
        **recipe.trainer_kwargs(),
    )  # fmt: skip
    model = recipe.model()
    trainer.fit(model, datamodule=recipe.datamodule())
    assert 0.75 < float(trainer.callback_metrics["pruning/sparsity"]) < 0.85


def test_loggers_from_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = {
        "seed": 3,
        "logger": {"csv": {"save_dir": str(tmp_path)}, "wandb": {"project": "lc-tests", "save_dir": str(tmp_path),
                                                                  "mode": "offline", "tags": ["recipe"]}},
    }  # fmt: skip
    csv, wandb = load_recipe(config).loggers()
    assert type(csv).__name__ == "CSVLogger" and type(wandb).__name__ == "WandbLogger"
    assert dict(wandb.experiment.config)["seed"] == 3 and list(wandb.experiment.tags) == ["recipe"]
    wandb.experiment.finish()


def test_model_checkpoint_starts_from_trained_weights(tmp_path):
    import torch

    from lightning_compress import ClassificationModule

    trained = ClassificationModule("cnn_tiny", 10, 1)
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "trained.ckpt")
    model = load_recipe({"model": {"model": "cnn_tiny", "checkpoint": str(tmp_path / "trained.ckpt")},
                         "data": {"name": "digits"}}).model()  # fmt: skip
    for key, value in trained.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.slow
def test_teacher_then_full_pipeline_recipes_run_end_to_end(tmp_path, monkeypatch, capsys):
    import json

    from lightning_compress.cli import main

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


def test_a_recipe_run_sends_every_figure_to_wandb(tmp_path, monkeypatch):
    import torch

    from lightning_compress import ClassificationModule
    from lightning_compress.cli import train_recipe

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    teacher = ClassificationModule("cnn_tiny", 10, 1)
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}, "teacher.ckpt")
    overrides = [
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--compression.pruning.end_epoch=1",
        "--compression.low_rank.epoch=1", "--compression.low_rank.include=[model.classifier.1]",
        "--compression.quantization.start_epoch=1", "--compression.distillation.teacher=teacher.ckpt",
        "--compression.export.dirpath=out", "--compression.export.plots=false",
        "--logger.wandb.project=lc-tests", f"--logger.wandb.save_dir={tmp_path}", "--logger.wandb.mode=offline",
    ]  # fmt: skip
    captured = {}
    original = ClassificationModule.on_fit_end

    def keep_logger(self):  # the WandbLogger of this run, to read its summary afterwards
        captured["logger"] = self.logger
        original(self)

    monkeypatch.setattr(ClassificationModule, "on_fit_end", keep_logger)
    figures = train_recipe(str(ROOT / "recipes" / "digits" / "quickstart.yaml"), overrides)
    int8_file = (tmp_path / "out" / "model.int8.onnx").stat().st_size
    assert 0 < figures["model_bytes"] < int8_file  # the exported int8 file, compressed: pruned zeros count
    run = captured["logger"].experiment
    summary = dict(run.summary)
    for key in ("pruning/sparsity", "qat/enabled", "kd/loss", "lowrank/layers", "export/params_ratio", "val/acc"):
        assert key in summary, key
    assert dict(run.config)["compression"]["pruning"]["final_sparsity"] == 0.8  # the resolved recipe
    run.finish()


QUICK = ["--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"]
QUICK += ["--compression.pruning.start_epoch=0", "--compression.pruning.end_epoch=1"]
QUICK += ["--compression.quantization.start_epoch=1", "--compression.export.plots=false"]


@pytest.mark.slow
def test_cifar10_recipes_train_on_files_on_disk_and_chain_teacher_to_student(tmp_path, monkeypatch):
    import json

    from lightning_compress.cli import main

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
    from lightning_compress.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["fit", str(ROOT / "recipes" / "cifar10" / "resnet18.yaml"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "CIFAR10 is not under `root` 'data/cifar10'" in err and "data/cifar10/cifar-10-batches-py" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_imagefolder_recipe_trains_on_a_folder_of_images(tmp_path, monkeypatch):
    import json

    from lightning_compress.cli import main

    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "images", classes=("a", "b", "c"), per_class=6, size=40)
    recipe = str(ROOT / "recipes" / "imagefolder" / "prune_quantize.yaml")
    assert main(["fit", recipe, *QUICK, "--data.root=images", "--data.image_size=32", "--data.batch_size=8"]) == 0
    report = json.loads((tmp_path / "runs" / "imagefolder-mobilenet_v2" / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values())


# -- property-based: mutated shipped recipes end in a clear error, never a traceback ------------------------------
SHIPPED = {p.relative_to(ROOT / "recipes").as_posix(): yaml.safe_load(p.read_text()) for p in RECIPES}
WRONG = st.one_of(  # values no shipped key accepts in place of a scalar
    st.dictionaries(st.sampled_from(["a", "b", "x"]), st.integers(), min_size=1, max_size=2),
)
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3), WRONG,
)  # fmt: skip
KEY = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)


def _leaves(config: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(config, dict) and config:
        return [path for key, value in config.items() for path in _leaves(value, (*prefix, key))]
    return [prefix] if prefix else []


def _sections(config: Any, prefix: tuple = ()) -> list[tuple]:
    if not isinstance(config, dict):
        return []
    return [prefix] + [p for key, value in config.items() for p in _sections(value, (*prefix, key))]


def _set(config: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def _get(config: dict, path: tuple) -> Any:
    for key in path:
        config = config[key]
    return config


@st.composite
def mutated(draw: Any) -> tuple[dict, str, str | None]:
    """(config, what was done, the key path the error must name or None when the result may be valid)."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    config = copy.deepcopy(SHIPPED[name])
    kind = draw(st.sampled_from(["wrong_type", "any_value", "unknown_key", "drop_section", "out_of_range"]))
    if kind == "wrong_type":  # a mapping where a scalar or list belongs: always invalid
        path = draw(st.sampled_from(_leaves(config)))
        _set(config, path, draw(WRONG))
        return config, f"{name}: {kind} {path}", ".".join(map(str, path))
    if kind == "any_value":
        path = draw(st.sampled_from(_leaves(config)))
        _set(config, path, draw(ANY_VALUE))
        return config, f"{name}: {kind} {path}", None
    if kind == "unknown_key":  # a misspelt key in any section (top level included): always invalid
        path = draw(st.sampled_from([p for p in _sections(config) if p[:1] not in (("seed",),)]))
        key = draw(KEY.filter(lambda k: k not in _get(config, path)))
        if path == () and key in ("model", "data", "trainer", "compression", "logger", "seed"):
            key += "_x"
        _get(config, path)[key] = draw(ANY_VALUE)
        return config, f"{name}: {kind} {path}.{key}", ".".join(map(str, (*path, key)))
    if kind == "drop_section":
        section = draw(st.sampled_from(sorted(config)))
        del config[section]
        return config, f"{name}: {kind} {section}", None
    numbers = [p for p in _leaves(config) if isinstance(_get(config, p), (int, float))
               and not isinstance(_get(config, p), bool) and p != ("seed",)]  # fmt: skip
    path = draw(st.sampled_from(numbers))
    _set(config, path, draw(st.sampled_from([-1, -0.5, 1e9, float("nan"), float("inf")])))
    return config, f"{name}: {kind} {path}", None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_recipes_fail_with_a_config_error_naming_the_key(case):
    config, what, key = case
    try:
        recipe = load_recipe(config)
    except CompressionConfigError as error:
        event("refused by validation")
        assert key is None or key in str(error), (what, str(error))
        return
    event("valid")
    assert key is None, f"{what}: accepted"
    with contextlib.suppress(CompressionConfigError):  # a teacher or export folder that is not there
        recipe.callbacks()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=mutated())
def test_mutated_recipes_through_the_command_exit_0_or_2_never_a_traceback(case, tmp_path_factory, capsys):
    from lightning_compress.cli import main

    config, what, key = case
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    event(f"exit {code}")
    assert code in (0, 2), what
    assert "Traceback" not in err, what
    if code == 2:
        assert err.startswith("lightning-compress: error: "), what
    if key is not None:
        assert code == 2 and key in err, (what, err)
