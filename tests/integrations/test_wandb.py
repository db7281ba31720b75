import json


def test_export_extras_log_the_files_as_an_artifact_and_the_layers_as_a_table(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from lightning_compress.integrations.wandb import log_export

    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "report.json").write_text(json.dumps({"after": {}}))
    report = {
        "after": {"params": 10.0},
        "files": {"onnx": {"path": str(tmp_path / "model.onnx"), "bytes": 4}},
        "layers": [{"name": "conv1", "sparsity": 0.5, "rank": None, "weight_bits": 8}],
    }
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lc-test")
    logged = []
    run = logger.experiment
    monkeypatch.setattr(run, "log_artifact", lambda artifact: logged.append(artifact))
    log_export(logger, report, tmp_path)
    models = [a for a in logged if a.type == "model"]
    assert len(models) == 1 and models[0].name.startswith("compressed-")
    assert sorted(models[0].manifest.entries) == ["model.onnx", "report.json"]
    assert run.summary["export/layers"]["_type"] == "table-file"  # the per-layer rows, as a wandb.Table
    run.finish()
