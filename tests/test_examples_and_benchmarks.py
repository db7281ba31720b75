"""The example and the benchmark scripts run (tiny settings); their figures are sane, not timed."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_prune_your_model_example():
    example = runpy.run_path(str(ROOT / "examples" / "prune_your_model.py"), run_name="example")
    figures = example["main"](["--epochs", "2", "--sparsity", "0.8"])
    assert figures["nonzero"] < 0.3 * figures["params"]
    assert figures["val_acc"] > 0.5


def test_distill_to_lightweight_example():
    example = runpy.run_path(str(ROOT / "examples" / "distill_to_lightweight.py"), run_name="example")
    args = ["--data", "digits", "--teacher", "cnn_small", "--teacher-epochs", "2", "--epochs", "2"]
    figures = example["main"](args)
    assert figures["student_params"] < 0.1 * figures["teacher_params"]
    assert figures["teacher_acc"] > 0.5 and figures["student_acc"] > 0.2 and figures["kd_loss"] > 0


def run_benchmark(script: str, args: list[str], tmp_path: Path) -> str:
    """Run ``benchmarks/<script>`` with ``args`` (results into ``tmp_path``); return its stdout."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_distillation_benchmark_smoke(tmp_path):
    args = ["--data", "digits", "--teacher-epochs", "1", "--epochs", "1", "--seeds", "1"]
    stdout = run_benchmark("distillation.py", args, tmp_path)
    assert "| response + feature KD |" in stdout and "epoch time ratio" in stdout
    saved = json.loads((tmp_path / "distillation.json").read_text())
    assert set(saved["runs"][0]) == {"alone", "response KD", "response + feature KD"}


@pytest.mark.slow
def test_budget_benchmark_smoke(tmp_path):
    args = ["--data", "digits", "--model", "cnn_small", "--targets", "0.8", "--epochs", "1", "--seeds", "0",
            "--runs", "3", "--techniques", "channel"]  # fmt: skip
    stdout = run_benchmark("budget.py", args, tmp_path)
    assert "| 0.8 | planned |" in stdout and "| 0.8 | MACs-aware |" in stdout and "planned - uniform" in stdout
    saved = json.loads((tmp_path / "budget.cnn_small.json").read_text())["results"]["0.8"]
    assert len(saved["accuracy"]["planned"]) == 1 and saved["uniform"]["fraction"] > 0
    assert saved["planned"]["measured"]["latency"] > 0 and (tmp_path / "budget.cnn_small.latency.json").is_file()


@pytest.mark.slow
def test_low_rank_benchmark_smoke(tmp_path):
    args = ["--data", "digits", "--model", "cnn_small", "--epochs", "2", "--at", "1", "--ratios", "0.5"]
    stdout = run_benchmark("low_rank.py", [*args, "--rounds", "1", "--runs", "3", "--self-distill"], tmp_path)
    assert "| ours r=0.5 |" in stdout and "| post-hoc r=0.5 |" in stdout and "| ours + self-KD r=0.5 |" in stdout
    figures = json.loads((tmp_path / "low_rank.json").read_text())["figures"]
    assert figures["ours r=0.5"]["params"] < 0.6 * figures["dense"]["params"]
    assert figures["ours r=0.5"]["params"] == figures["post-hoc r=0.5"]["params"]
    assert figures["ours + self-KD r=0.5"]["params"] == figures["ours r=0.5"]["params"]  # the copy is not exported


@pytest.mark.slow
def test_criteria_benchmark_smoke(tmp_path):
    stdout = run_benchmark("criteria.py", ["--data", "digits", "--epochs", "1", "--seeds", "1"], tmp_path)
    assert "| 50% channels, slimming |" in stdout and "| 98% weights, movement |" in stdout
    accuracy = json.loads((tmp_path / "criteria.json").read_text())["accuracy"]
    assert len(accuracy) == 8 and all(len(values) == 1 and 0 < values[0] <= 1 for values in accuracy.values())


@pytest.mark.slow
def test_structured_export_benchmark_smoke(tmp_path):
    args = ["--data", "digits", "--epochs", "2", "--ramp-end", "1", "--rounds", "1", "--runs", "3", "--skip-resnet"]
    stdout = run_benchmark("structured_export.py", args, tmp_path)
    assert "| cnn_wide: ours (CompressionExport) |" in stdout and "Torch-Pruning one-shot + FT" in stdout
    assert "| cnn_wide: ours, slimming |" in stdout and "| cnn_wide: ours, slimming + self-KD |" in stdout
    saved = json.loads((tmp_path / "structured_export.json").read_text())["cnn_wide"]
    assert saved["params"]["ours (CompressionExport)"] < 0.35 * saved["params"]["dense"]
    assert saved["params"]["ours, slimming + self-KD"] < 0.35 * saved["params"]["dense"]
    assert all(check["passed"] for check in saved["verification"].values())


@pytest.mark.slow
def test_pruning_benchmark_smoke(tmp_path):
    args = ["--model", "cnn_tiny", "--data", "digits", "--epochs", "1", "--seeds", "1", "--targets", "0.5"]
    args += ["--timing-rounds", "1", "--arms", "ModelPruning (LTH)", "ours", "ours (LAMP)"]
    stdout = run_benchmark("pruning_vs_modelpruning.py", args, tmp_path)
    assert "| ours |" in stdout and "| ModelPruning (LTH) |" in stdout and "| ours (LAMP) |" in stdout
    assert "| one-shot + FT |" not in stdout  # --arms: only those
    assert "Interleaved timing at target 0.5" in stdout
    saved = json.loads((tmp_path / "pruning_vs_modelpruning.json").read_text())
    assert saved["runs"][0]["0.5/ours"]["sparsity"] > 0.49


@pytest.mark.slow
def test_gpu_benchmark_says_so_without_cuda_and_its_plumbing_runs_on_cpu(tmp_path):
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA device here" in run_benchmark("gpu.py", [], tmp_path)
    args = ["--accelerator", "cpu", "--precision", "32-true", "--size", "32", "--batch", "4"]
    args += ["--steps", "2", "--warmup", "1", "--rounds", "1", "--arms", "plain", "all"]  # `all` has every callback
    stdout = run_benchmark("gpu.py", args, tmp_path)
    assert "| all |" in stdout and "| plain |" in stdout
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert set(saved["times"]) == {"plain", "all"}


def test_zoo_benchmark_smoke(tmp_path):
    args = ["--models", "squeezenet1_1", "--size", "32", "--batches", "2", "--techniques", "channel"]
    out = run_benchmark("zoo.py", args, tmp_path)
    rows = json.loads((tmp_path / "zoo.json").read_text())
    assert rows[0]["model"] == "squeezenet1_1" and rows[0]["params"] < 0.5 and rows[0]["int8_bytes"] < 0.2
    assert "| squeezenet1_1 | channel |" in out


def test_zoo_defaults_benchmark_smoke(tmp_path):
    args = ["--models", "cnn_tiny", "--data", "digits", "--dense", "1", "--tune", "1"]
    out = run_benchmark("zoo_defaults.py", args, tmp_path)
    rows = json.loads((tmp_path / "zoo_defaults.json").read_text())
    assert {(r["setting"], r["arm"]) for r in rows} >= {("channel 50%", "raw L1, no floor"), ("low-rank 0.5", "ours")}
    assert all(0.0 <= r["acc"] <= 1.0 for r in rows) and "| cnn_tiny | unstructured 95% | ours |" in out


def test_lightning_cli_example_runs_all_five_callbacks_and_refuses_a_bad_choice_at_parse_time(tmp_path):
    # #16: a bad value (`scope: globl`) used to parse and then end in a ~40-line traceback from our constructor;
    # the choices are `Literal` now, so jsonargparse refuses it before anything trains
    import json
    import subprocess
    import sys

    import torch

    from lightning_compress import ClassificationModule

    teacher = ClassificationModule("cnn_tiny", 10, 1)
    dense = {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}
    torch.save(dense, tmp_path / "teacher.ckpt")
    script, config = ROOT / "examples" / "lightning_cli.py", ROOT / "examples" / "lightning_cli.yaml"
    quick = ["--trainer.max_epochs=3", "--trainer.limit_train_batches=3", "--trainer.enable_progress_bar=false"]
    done = subprocess.run([sys.executable, str(script), "fit", "--config", str(config), *quick], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "compressed-cli" / "report.json").read_text())
    assert set(report["verification"]) == {"onnx", "onnx_int8"}
    assert all(check["passed"] for check in report["verification"].values())
    assert "LowRankFactorization at epoch 1" in done.stderr + done.stdout
    (tmp_path / "bad.yaml").write_text(config.read_text().replace("scope: global", "scope: globl"))
    bad = subprocess.run([sys.executable, str(script), "fit", "--config", str(tmp_path / "bad.yaml")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "Expected a typing.Literal['global', 'layer', 'lamp']. Got value: globl" in bad.stderr
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.slow
def test_ptq_benchmark_smoke(tmp_path):
    args = ["--models", "cnn_wide", "--data", "digits", "--epochs", "1", "--calibration", "64"]
    stdout = run_benchmark("ptq.py", [*args, "--runs", "2", "--rounds", "1"], tmp_path)
    assert "| cnn_wide | ORT quantize_static |" in stdout and "| cnn_wide | ours PTQ + CLE + BC |" in stdout
    saved = json.loads((tmp_path / "ptq.json").read_text())["results"]["cnn_wide"]
    assert all(saved[arm]["verified"] for arm in saved if arm.startswith("ours"))
    assert saved["ours PTQ + CLE"]["pairs"] > 0 and saved["ours PTQ + BC"]["corrected"] > 0
    assert saved["ours PTQ"]["bytes"] < 0.3 * saved["fp32"]["bytes"]


@pytest.mark.slow
def test_int4_storage_benchmark_smoke(tmp_path):
    args = ["--models", "cnn_small", "--data", "digits", "--epochs", "1", "--runs", "2", "--rounds", "1"]
    stdout = run_benchmark("int4_storage.py", [*args, "--load-repeats", "1", "--threads", "1"], tmp_path)
    assert "| cnn_small | packed |" in stdout and "| cnn_small | opset21-int4 |" in stdout
    found = json.loads((tmp_path / "int4_storage.json").read_text())["results"]["cnn_small"]
    figures = found["figures"]
    assert found["verified"] and found["storage"]["packed"] and found["int4_rewritten"] > 0
    assert figures["packed"]["bytes"] < 0.7 * figures["int8-stored"]["bytes"]
    assert figures["packed"]["acc"] == figures["int8-stored"]["acc"] == figures["opset21-int4"]["acc"]


@pytest.mark.slow
def test_learned_scales_benchmark_smoke(tmp_path):
    args = ["--models", "cnn_small", "--data", "digits", "--seeds", "0", "--epochs", "2", "--qat-epochs", "1"]
    stdout = run_benchmark("learned_scales.py", [*args, "--threads", "1"], tmp_path)
    assert "| cnn_small | 4-bit |" in stdout and "| cnn_small | 8-bit |" in stdout
    seed = json.loads((tmp_path / "learned_scales.json").read_text())["runs"]["cnn_small"][0]
    assert set(seed) == {"w8a8 observed", "w8a8 learned", "w4a8 observed", "w4a8 learned"}
    assert all(arm["ort_acc"] > 0.5 and arm["epoch_s"] > 0 for arm in seed.values())



@pytest.mark.slow
def test_qat_step_cost_benchmark_smoke(tmp_path):
    args = ["--model", "cnn_small", "--data", "digits", "--rounds", "1", "--steps", "3", "--warmup", "1"]
    stdout = run_benchmark("qat_step_cost.py", args, tmp_path)
    assert "| plain |" in stdout and "| QAT observed, BN frozen |" in stdout and "| QAT learned, BN frozen |" in stdout
    times = json.loads((tmp_path / "qat_step_cost.json").read_text())["step_seconds"]
    assert set(times) == {"plain", "QAT observed", "QAT observed, BN frozen", "QAT learned, BN frozen"}
    assert all(len(runs) == 1 and len(runs[0]) == 3 and min(runs[0]) > 0 for runs in times.values())
