"""``lightning-compress quantize``: post-training quantisation of a checkpoint or a trained recipe (#18)."""

import json
from pathlib import Path

import pytest
import yaml

from lightning_compress.app.cli import main
from tests.app.test_cli import QUICKSTART
from tests.helpers import digits_checkpoint


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory) -> Path:
    """cnn_small (BatchNorm, ReLU) trained two epochs on digits, saved the Lightning way."""
    return digits_checkpoint(tmp_path_factory.mktemp("ckpt") / "float.ckpt", "cnn_small", 2, lr=0.003)


def test_a_checkpoint_calibrates_into_a_verified_int8_bundle_that_export_restores(float_checkpoint, tmp_path, capsys):
    out = tmp_path / "q"
    argv = ["quantize", str(float_checkpoint), "--calib-batches", "4", "--equalize", "--bias-correction"]
    argv += ["--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "wrote checkpoint, onnx, onnx_int8 and report.json" in printed and "(fp32 " in printed
    report = json.loads((out / "report.json").read_text())
    assert all(check["passed"] for check in report["verification"].values())
    calibration = report["calibration"]
    assert calibration["batches"] == 4 and calibration["samples"] == 4 * 64 and calibration["scales"] == "observed"
    assert calibration["equalized_pairs"] and calibration["equalization_max_change"] < 1e-4
    assert set(calibration["bias_corrected"]) == {row["name"] for row in report["layers"]}
    assert all(row["scales"] == "observed" and row["observed_batches"] == 4 for row in report["layers"])
    assert report["baseline"]["source"] == "fp32"
    fp32, int8 = report["baseline"]["ort_accuracy"], report["after"]["int8_ort_accuracy"]
    assert int8 >= fp32 - 0.02, (fp32, int8)  # int8 PTQ of a small CNN: within 2 points of its float model
    assert (out / "model.int8.onnx").stat().st_size < 0.35 * (out / "model.onnx").stat().st_size
    assert "Post-training quantisation: ranges observed on 4 batches" in (out / "report.md").read_text()
    # the bundle's checkpoint is an ordinary compressed checkpoint: `export` rebuilds it, int8 as calibrated
    again = tmp_path / "again"
    assert main(["export", str(out / "model.ckpt"), "--out", str(again)]) == 0, capsys.readouterr().err
    exported = json.loads((again / "report.json").read_text())
    assert exported["after"]["int8_ort_accuracy"] == pytest.approx(int8, abs=1e-9)
    capsys.readouterr()
    assert main(["quantize", str(out / "model.ckpt"), "--out", str(tmp_path / "twice")]) == 2
    assert "already carries fake quantisation" in capsys.readouterr().err


def test_four_bit_weights_are_packed_verified_and_stored_as_int8_on_request(float_checkpoint, tmp_path, capsys):
    bundles = {}
    for name, extra in (("packed", []), ("int8", ["--no-pack"])):
        argv = ["quantize", str(float_checkpoint), "--calib-batches", "2", "--weight-bits", "4"]
        assert main([*argv, *extra, "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        bundles[name] = json.loads((tmp_path / name / "report.json").read_text())
    packed, plain = bundles["packed"], bundles["int8"]
    assert packed["verification"]["onnx_int8"]["passed"] and plain["verification"]["onnx_int8"]["passed"]
    storage = packed["files"]["onnx_int8"]["storage"]
    assert storage["int8_storage_reason"] is None and set(storage["packed"].values()) == {4}
    assert plain["files"]["onnx_int8"]["storage"] is None
    rows = {row["name"]: row["stored_bits"] for row in packed["layers"]}
    assert rows == {name: storage["packed"].get(name, 8) for name in rows} and 4 in rows.values()
    assert all(row["stored_bits"] is None for row in plain["layers"])  # the file says nothing of its storage
    # the same integers: ONNX Runtime computes the same logits from either file
    assert packed["after"]["int8_ort_accuracy"] == plain["after"]["int8_ort_accuracy"]
    sizes = {name: bundle["files"]["onnx_int8"]["bytes"] for name, bundle in bundles.items()}
    assert sizes["packed"] < 0.65 * sizes["int8"], sizes
    assert "| 4, packed |" in (tmp_path / "packed" / "report.md").read_text()


def test_a_recipe_is_trained_then_calibrated(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "q"
    argv = ["quantize", QUICKSTART, "--calib-batches", "2", "--out", str(out), "--trainer.max_epochs=2",
            "--compression.pruning.end_epoch=1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["batches"] == 2 and report["calibration"]["equalized_pairs"] is None
    assert report["verification"]["onnx_int8"]["passed"]
    assert max(row["sparsity"] for row in report["layers"]) >= 0.8  # the recipe's global pruning ran first


def test_bad_input_exits_2_naming_it(float_checkpoint, tmp_path, capsys):
    assert main(["quantize", str(float_checkpoint), "--calib-batches", "0"]) == 2
    assert "`--calib-batches` must be a positive number of training batches, got 0" in capsys.readouterr().err
    assert main(["quantize", str(float_checkpoint), "--calib-batches", "100000"]) == 2
    assert "`--calib-batches` must be at most the" in capsys.readouterr().err
    assert main(["quantize", str(float_checkpoint), "--weight-bits", "9"]) == 2
    assert "`--weight-bits` must be an integer from 2 to 8, got 9" in capsys.readouterr().err
    recipe = yaml.safe_load(Path(QUICKSTART).read_text())
    recipe["compression"]["quantization"] = {"start_epoch": 1}
    (tmp_path / "qat.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["quantize", str(tmp_path / "qat.yaml")]) == 2
    err = capsys.readouterr().err
    assert "`compression.quantization` section (QAT): `quantize` is post-training" in err and "Traceback" not in err
