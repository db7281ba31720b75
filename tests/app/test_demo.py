from lightning_compress.app.cli import main


def test_demo_prints_the_dense_vs_pruned_table(capsys):
    assert main(["demo", "--model", "cnn_tiny", "--data", "digits", "--epochs", "2", "--sparsity", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "| run | params | nonzero |" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    dense, pruned, qat = rows["dense"], rows["GMP 80%"], rows["GMP 80% + QAT int8"]
    number = lambda row, i: float(row[i].strip().replace(",", ""))  # noqa: E731
    assert number(pruned, 1) < 0.35 * number(dense, 1)  # non-zeros
    assert number(qat, 1) < 0.35 * number(dense, 1)
    assert number(qat, 3) < 0.5 * number(dense, 3)  # the int8 ONNX file (graph overhead weighs on a 12k model)
    assert number(qat, 6) > 0.3  # its accuracy in ONNX Runtime, 2 epochs on digits (chance: 0.1)
