"""Packaged like a plugin (#16): ranges for users, the exact versions of these machines in a constraints file,
optional extras that name themselves, a wheel that installs beside a torch already there."""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

import lightning_compress

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_ranges_for_users_exact_versions_only_in_the_constraints_the_makefile_uses():
    dependencies = {d.split(">")[0].split("<")[0].split("=")[0]: d for d in PYPROJECT["project"]["dependencies"]}
    assert "==" not in " ".join(dependencies.values()), dependencies  # before: torch==2.14.1, torchvision==0.29.1
    assert dependencies["torch"] == "torch>=2.6,<2.15" and dependencies["torchvision"] == "torchvision>=0.21,<0.30"
    constraints = (ROOT / "constraints.txt").read_text()
    assert "torch==2.14.1" in constraints and "torchvision==0.29.1" in constraints
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"export", "wandb", "data", "plots", "all"} <= set(extras)
    assert not {"wandb", "onnx", "onnxruntime", "matplotlib", "scikit-learn", "mlxtend"} & set(dependencies)


def test_one_version_everywhere(capsys):
    from lightning_compress.app.cli import main

    assert lightning_compress.__version__ == PYPROJECT["project"]["version"]
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"lightning-compress {lightning_compress.__version__}"
    assert f"## {lightning_compress.__version__}" in (ROOT / "CHANGELOG.md").read_text()


EXTRAS = ("onnx", "onnxruntime", "onnxscript", "matplotlib", "sklearn", "scikit_learn", "mlxtend", "wandb")
MISSING = """
import sys
import lightning_compress
from lightning_compress import CompressionConfigError, CompressionExport, get_datamodule, export_onnx
import torch
from tests.helpers import TinyModule, trainer, loaders
messages = []
try:
    trainer(callbacks=[CompressionExport(sys.argv[1])], max_epochs=1).fit(TinyModule(), *loaders())
except CompressionConfigError as error:
    messages.append(str(error))
try:
    get_datamodule("digits").setup()
except CompressionConfigError as error:
    messages.append(str(error))
try:
    export_onnx(TinyModule().net, torch.zeros(1, 1, 8, 8), sys.argv[1] + "/m.onnx")
except CompressionConfigError as error:
    messages.append(str(error))
print("\\n".join(messages))
"""


def environment_without_the_extras(tmp_path: Path) -> Path:
    """A fresh venv that sees this one's packages except the extras' (links to each other entry)."""
    site = tmp_path / "site"
    site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower().replace("-", "_")
        if not name.startswith(EXTRAS) and not name.endswith(".pth") and not name.startswith("__editable__"):
            (site / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True, timeout=300)
    python = tmp_path / "env" / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(purelib, "without_extras.pth").write_text(f"{ROOT}\n{site}\n")
    return python


def test_without_the_extras_the_package_imports_and_each_feature_names_its_extra(tmp_path):
    python = environment_without_the_extras(tmp_path)
    hidden = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('onnx'), "
                             "u.find_spec('matplotlib'), u.find_spec('sklearn'))"], capture_output=True, text=True)
    assert hidden.stdout.split() == ["None", "None", "None"], hidden.stdout + hidden.stderr  # really not there
    done = subprocess.run([str(python), "-c", MISSING, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 3, done.stdout
    assert "CompressionExport needs `onnx`" in lines[0] and "lightning-compress[export]" in lines[0]
    assert "the digits data set needs `sklearn`" in lines[1] and "lightning-compress[data]" in lines[1]
    assert "lightning-compress[export]" in lines[2]


def test_the_wheel_installs_beside_the_torch_a_project_has_without_touching_it(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w",
                    str(wheels)], check=True, capture_output=True, timeout=300)  # fmt: skip
    wheel = next(wheels.glob("lightning_compress-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "project")], check=True, timeout=300)
    python = tmp_path / "project" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "existing_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # a project with torch in it
    report = tmp_path / "report.json"
    done = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report),
                           f"{wheel}[all]"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    installs = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert "lightning-compress" in installs
    assert not installs & {"torch", "torchvision", "lightning", "nvidia-cudnn-cu12"}, installs  # torch stays
