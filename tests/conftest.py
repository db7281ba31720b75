"""Test set-up: offline W&B, quiet Lightning, and the one shared DDP run."""

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each
    torch.set_num_threads(1)


# Fixtures that train or export once for many tests. pytest-xdist builds a module- or session-scoped
# fixture once per worker that runs one of its tests, so each worker used to build them all (the
# composition matrix twice: 2 x 160 s). `make test` runs with `--dist loadgroup`: the tests sharing one
# go to one worker.
SESSION_SHARED = ("ddp_run", "ddp_learned_run")
MODULE_SHARED = ("matrix", "trained_teacher", "trained", "int8_file", "digits_checkpoint", "teacher")  # costliest first


@pytest.hookimpl(wrapper=True)  # around xdist's own hook, which writes the groups into the test ids it schedules by
def pytest_collection_modifyitems(config, items):
    for item in items:
        names = getattr(item, "fixturenames", ())
        session = next((n for n in SESSION_SHARED if n in names), None)
        shared = next((n for n in MODULE_SHARED if n in names), None)  # the most expensive one it uses
        if session:
            item.add_marker(pytest.mark.xdist_group(session))
        elif shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{shared}"))
    return (yield)


def pytest_configure(config):
    """pytest 9.2's structured test ids silently undo xdist 3.8's groups (it writes them into the legacy
    ``_nodeid``, pytest-xdist#1386): say so rather than build every shared fixture once per worker."""
    if config.getoption("dist", "no") != "loadgroup" or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import inspect

    import xdist.remote

    legacy = "item._nodeid =" in inspect.getsource(xdist.remote)
    version = tuple(int(part) for part in re.findall(r"\d+", pytest.__version__)[:2])
    if legacy and version >= (9, 2):
        config.issue_config_time_warning(pytest.PytestWarning(
            f"pytest {pytest.__version__} with pytest-xdist's --dist loadgroup ignores the groups (pytest-xdist#1386; "
            "constraints.txt pins pytest<9.2): every worker builds the shared fixtures"), stacklevel=2)  # fmt: skip


@pytest.fixture(autouse=True)
def wandb_environment():
    """W&B's variables as each test found them: ``wandb.init`` in a test sets ``WANDB_SERVICE`` (its service's
    socket) and ``WANDB_MODE=dryrun`` for the process, which a later test's subprocess would inherit, logging
    to the first test's service instead of its own folder."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
    yield
    for key in [k for k in os.environ if k.startswith("WANDB_") and k not in saved]:
        del os.environ[key]
    os.environ.update(saved)


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """Both ranks' records from one DDP run of tests/ddp_run.py (every callback, 2 CPU processes)."""
    out = tmp_path_factory.mktemp("ddp")
    script = Path(__file__).parent / "ddp_run.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    done = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.fixture(scope="session")
def ddp_learned_run(tmp_path_factory):
    """Both ranks' records from one DDP run of ``tests/ddp_run.py OUT learned`` (a residual model, pruning and
    QAT with learned step sizes, 2 CPU processes)."""
    out = tmp_path_factory.mktemp("ddp_learned")
    script = Path(__file__).parent / "ddp_run.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    command = [sys.executable, str(script), str(out), "learned"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
