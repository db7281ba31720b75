import json

import pytest


def test_export_extras_log_the_files_plots_and_report_as_one_named_artifact_the_layers_as_a_table(tmp_path,
                                                                                                  monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from lightning_compress.integrations.wandb import log_export

    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "report.json").write_text(json.dumps({"after": {}}))
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure().savefig(tmp_path / "before_after.png")
    report = {
        "after": {"params": 10.0},
        "files": {"onnx": {"path": str(tmp_path / "model.onnx"), "bytes": 4}},
        "layers": [{"name": "conv1", "sparsity": 0.5, "rank": None, "weight_bits": 8}],
    }
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lc-test")
    logged = []
    run = logger.experiment
    monkeypatch.setattr(run, "log_artifact", lambda artifact: logged.append(artifact))
    log_export(logger, report, tmp_path, "compressed-quickstart")
    models = [a for a in logged if a.type == "model"]
    assert len(models) == 1 and models[0].name == "compressed-quickstart"  # the same every run: versions accumulate
    assert sorted(models[0].manifest.entries) == ["before_after.png", "model.onnx", "report.json"]
    assert run.summary["export/layers"]["_type"] == "table-file"  # the per-layer rows, as a wandb.Table
    assert run.summary["export/plots/before_after"]["_type"] == "image-file"  # the plots, as images
    run.finish()
