"""Every failure of `lightning-compress` is exit 2 with one paragraph (bad input) or exit 1 (a run that
failed), never a traceback (#15)."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_compress.app.cli import main
from tests import helpers

QUICKSTART = str(Path(__file__).resolve().parents[2] / "recipes" / "digits" / "quickstart.yaml")


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A cnn_tiny trained one epoch on digits (8x8), saved the Lightning way."""
    return helpers.digits_checkpoint(tmp_path_factory.mktemp("ckpt") / "digits.ckpt", "cnn_tiny", 1)


def failure(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code, capsys.readouterr()
    err = capsys.readouterr().err
    assert err.startswith("lightning-compress: ") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 6, err  # a paragraph, not a dump
    return err


def test_lightnings_own_refusal_of_a_trainer_value_is_exit_2(capsys):
    # MisconfigurationException is not a ValueError: it escaped as a traceback
    assert "max_epochs" in failure(capsys, ["validate", QUICKSTART, "--trainer.max_epochs=-3"])


@pytest.mark.parametrize(
    ("logger", "named"),
    [
        ("{csv: {sav_dir: logs}}", "logger.csv.sav_dir: unknown key"),
        ("{wandb: {projcet: x, mode: offline}}", "logger.wandb.projcet: unknown key"),
        ("{wandb: {mode: offline, log_model: true}}", "logger.wandb.log_model"),
        ("{csv: {flush_logs_every_n_steps: often}}", "logger.csv.flush_logs_every_n_steps: must be int"),
    ],
)
def test_a_logger_section_validate_accepted_but_fit_crashed_on_is_exit_2(logger, named, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(f"trainer: {{max_epochs: 1}}\nlogger: {logger}\n")
    err = failure(capsys, ["validate", str(tmp_path / "r.yaml")])
    assert named in err, err


def test_export_to_a_folder_that_cannot_be_written_is_exit_2(digits_checkpoint, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    err = failure(capsys, ["export", str(digits_checkpoint), "--out", str(tmp_path / "file" / "out")])
    assert "`dirpath` must be a folder this process can write" in err


@pytest.mark.parametrize(
    ("hparams", "named"),
    [({"colour": "red"}, "hyper_parameters.colour: unknown key"), ({"num_classes": "ten"}, "num_classes: must be int")],
)
def test_checkpoint_hyper_parameters_that_do_not_fit_are_exit_2(hparams, named, digits_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    checkpoint["hyper_parameters"].update(hparams)
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    assert named in failure(capsys, ["export", str(tmp_path / "odd.ckpt"), "--out", str(tmp_path / "out")])


def test_a_crafted_factorised_key_is_exit_2_naming_the_layer(digits_checkpoint, tmp_path, capsys):
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    state = checkpoint["state_dict"]
    del state["model.classifier.1.weight"]
    state["model.classifier.1.0.weight"] = torch.randn(4, 256)
    state["model.classifier.1.1.weight"] = torch.randn(31, 4)  # not the layer's 32 outputs: a raw RuntimeError
    torch.save(checkpoint, tmp_path / "crafted.ckpt")
    err = failure(capsys, ["export", str(tmp_path / "crafted.ckpt"), "--out", str(tmp_path / "out")])
    assert "'model.classifier.1'" in err and "do not factorise" in err


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this should never run",))


def test_a_checkpoint_that_would_run_code_is_refused_naming_the_global(tmp_path, capsys):
    with open(tmp_path / "evil.ckpt", "wb") as handle:
        pickle.dump({"state_dict": {}, "payload": RunsCode()}, handle)
    err = failure(capsys, ["export", str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "out")])
    assert "posix.system" in err and "names code to run" in err  # before: cut before the refused global's name
    assert not (tmp_path / "out").exists()


def test_export_uses_the_data_the_checkpoint_records_and_refuses_another(digits_checkpoint, tmp_path, capsys):
    # before: the default --data mnist5k ran a digits model on 28x28 images: "14% accuracy", exit 0
    err = failure(capsys, ["export", str(digits_checkpoint), "--out", str(tmp_path / "a"), "--data", "mnist5k"])
    assert "trained on 'digits'" in err and "--data digits" in err
    assert main(["export", str(digits_checkpoint), "--out", str(tmp_path / "b"), "--formats", "onnx"]) == 0
    accuracy = float(capsys.readouterr().out.rsplit("top-1", 1)[1].strip().rstrip("%"))
    assert accuracy > 50, accuracy  # digits, as trained (one epoch of cnn_tiny)


def test_a_run_that_fails_is_exit_1_with_one_paragraph(digits_checkpoint, tmp_path, capsys, monkeypatch):
    import lightning_compress.deploy.bundle as bundle

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bundle.torch, "save", full)
    err = failure(capsys, ["export", str(digits_checkpoint), "--out", str(tmp_path / "out")], code=1)
    assert "the run failed: OSError" in err and "No space left on device" in err and "LIGHTNING_COMPRESS_DEBUG" in err


METADATA = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["cnn_tiny", "resnet18", "no_such_model", "sgd", "adam", "DEFAULT", ""]), st.text(max_size=8),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.sampled_from(["a", "b"]), st.integers(), max_size=2),
)  # fmt: skip
HPARAM_KEYS = st.sampled_from(["model", "num_classes", "in_channels", "lr", "optimizer", "weight_decay", "cosine",
                               "weights", "colour", "trained_on"])  # fmt: skip


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(key=HPARAM_KEYS, value=METADATA, where=st.sampled_from(["hyper_parameters", "trained_on"]))
def test_any_checkpoint_metadata_exits_0_or_2_never_a_traceback(key, value, where, digits_checkpoint, tmp_path_factory,
                                                                capsys):  # fmt: skip
    checkpoint = torch.load(digits_checkpoint, weights_only=True)
    if where == "trained_on":
        checkpoint["trained_on"] = {"data": value} if key == "model" else {"input_shape": value}
    else:
        checkpoint["hyper_parameters"][key] = value
    folder = tmp_path_factory.mktemp("meta")
    torch.save(checkpoint, folder / "m.ckpt")
    code = main(["export", str(folder / "m.ckpt"), "--out", str(folder / "out"), "--formats", "checkpoint",
                 "--no-verify"])  # fmt: skip
    err = capsys.readouterr().err
    event(f"exit {code}")
    assert code in (0, 2) and "Traceback" not in err, (where, key, value, err[-800:])
