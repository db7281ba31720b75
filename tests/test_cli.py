import subprocess
import sys

from lightning_compress.cli import main


def test_demo_prints_the_dense_vs_pruned_table(capsys):
    assert main(["demo", "--model", "cnn_tiny", "--data", "digits", "--epochs", "2", "--sparsity", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "| run | params | nonzero |" in out
    dense, pruned = (line for line in out.splitlines() if line.startswith(("| dense", "| GMP 80%")))
    nonzero = lambda row: int(row.split("|")[3].strip().replace(",", ""))  # noqa: E731
    assert nonzero(pruned) < 0.35 * nonzero(dense)


def test_bad_input_exits_2_with_a_message(capsys):
    assert main(["demo", "--model", "cnn_smal", "--data", "digits", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "`model` must be one of" in err and "did you mean 'cnn_small'" in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "lightning_compress", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout
