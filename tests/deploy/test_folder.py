"""The export folder is replaced as a whole (#15): the previous complete bundle or the new one, never a mix.

Kills a real exporting process (SIGKILL from this one) at several moments, fails the swap, fills a real
(small tmpfs) or injected full disk, and checks the folder each time.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from lightning_compress.deploy import bundle, folder
from lightning_compress.deploy.bundle import write_bundle
from lightning_compress.deploy.onnx import float_copy
from lightning_compress.errors import CompressionConfigError
from tests.helpers import TinyNet, quantised

ROOT = Path(__file__).resolve().parents[2]
CHILD = """
import sys, torch
from lightning_compress.deploy.bundle import write_bundle
from lightning_compress.deploy.onnx import float_copy
from tests.deploy.test_folder import labelled
out, x = sys.argv[1], torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
for label in range(1, 1000):
    model = labelled(label)
    print("start", label, flush=True)
    write_bundle(model, float_copy(model), out, x[:2], [(x, torch.zeros(8, dtype=torch.long))],
                 ("onnx", "checkpoint"), {"label": label, "pad": "x" * label}, plots=label % 2 == 0)
"""


def labelled(label: int) -> TinyNet:
    """The same weights every time, with ``label`` in the last bias: which export a file came from."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():
        model.fc2.bias.fill_(float(label))
    return model


def label_of_complete_bundle(path: Path) -> int:
    """The label of the one bundle ``path`` holds; fails on a mix of two exports or a missing file."""
    report = json.loads((path / "report.json").read_text())
    names = {p.name for p in path.iterdir()}
    plots = {n for n in names if n.endswith(".png")}
    assert names == {"report.json", "report.md", *(e["path"] for e in report["files"].values()), *plots}, names
    for entry in report["files"].values():
        assert (path / entry["path"]).stat().st_size == entry["bytes"], entry  # written by the same export
    label = torch.load(path / "model.ckpt", weights_only=True)["label"]
    assert bool(plots) == (label % 2 == 0), (label, plots)  # no plot of another export beside this one
    assert len(torch.load(path / "model.ckpt", weights_only=True)["pad"]) == label
    session = ort.InferenceSession(str(path / "model.onnx"))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = labelled(label)(x).numpy()
    assert abs(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0] - expected).max() < 1e-4
    return label


def stale(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_a_sigkill_at_any_moment_leaves_one_complete_bundle(tmp_path):
    out = tmp_path / "bundle"
    labels = []
    for delay in (0.1, 0.5, 1.0):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert child.stdout.readline().split()[0] == "start"
        assert child.stdout.readline().split() == ["start", "2"]  # one bundle is complete
        time.sleep(delay)  # somewhere inside the next exports: tracing, verifying, plotting, swapping
        child.send_signal(signal.SIGKILL)
        child.wait()
        labels.append(label_of_complete_bundle(out))
    assert min(labels) >= 1
    write_bundle(labelled(0), float_copy(TinyNet()), out, torch.randn(2, 1, 8, 8), [], ("checkpoint",), plots=False)
    assert stale(out) == []  # the killed processes' staging folders are cleaned by the next export
    assert sorted(p.name for p in out.iterdir()) == ["model.ckpt", "report.json", "report.md"]


def bundle_of(label: int, out: Path, formats=("onnx", "checkpoint"), **kwargs) -> dict:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = labelled(label)
    return write_bundle(model, float_copy(model), out, x[:2], [(x, torch.zeros(4, dtype=torch.long))], formats,
                        {"label": label, "pad": "x" * label}, plots=label % 2 == 0, **kwargs)  # fmt: skip


def test_an_export_without_int8_after_one_with_it_leaves_no_int8_file(tmp_path):
    # before: files were renamed one at a time into the folder, and the earlier export's were never removed
    model, x = quantised()
    val = [(x, torch.zeros(len(x), dtype=torch.long))]
    write_bundle(model, float_copy(TinyNet()), tmp_path / "out", x[:2], val, bundle.FORMATS, plots=False)
    assert (tmp_path / "out" / "model.int8.onnx").exists()
    bundle_of(2, tmp_path / "out")
    assert "model.int8.onnx" not in {p.name for p in (tmp_path / "out").iterdir()}
    assert label_of_complete_bundle(tmp_path / "out") == 2


def test_a_failed_swap_or_a_full_disk_leaves_the_previous_bundle(tmp_path, monkeypatch):
    out = tmp_path / "out"
    bundle_of(2, out)

    def fail(*args):
        raise OSError(errno.EIO, "injected", str(out))

    with monkeypatch.context() as patch:
        patch.setattr(folder, "_exchange", fail)  # the one rename that swaps the bundles
        with pytest.raises(OSError, match="injected"):
            bundle_of(4, out)
    assert label_of_complete_bundle(out) == 2 and stale(out) == []

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(bundle.torch, "save", full)
        with pytest.raises(OSError, match="No space left"):
            bundle_of(4, out)
    assert label_of_complete_bundle(out) == 2 and stale(out) == []


def test_a_really_full_disk_leaves_the_previous_bundle(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    bundle_of(2, tmp_path / "sizing")
    size = sum(p.stat().st_size for p in (tmp_path / "sizing").iterdir())
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.6) // 4096 * 4096 + 4096}", "tmpfs",
                              str(disk)], capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): the injected case covers it")
    try:
        bundle_of(2, disk / "out")
        with pytest.raises(OSError) as error:
            bundle_of(4, disk / "out", ("onnx", "checkpoint"))  # the padded checkpoint no longer fits beside it
        assert error.value.errno == errno.ENOSPC or "space" in str(error.value).lower()
        assert label_of_complete_bundle(disk / "out") == 2 and stale(disk / "out") == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_without_an_exchange_a_crash_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(folder, "_exchange", lambda a, b: False)  # a system without renameat2
    bundle_of(2, out)
    bundle_of(3, out)
    assert label_of_complete_bundle(out) == 3 and stale(out) == []
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the crashed exporter
    aside = tmp_path / f".out.old-{dead.pid}-x"
    aside.mkdir()
    os.rename(out, aside / "bundle")  # it crashed after moving the old bundle aside, before the new one came
    bundle_of(4, out)
    assert label_of_complete_bundle(out) == 4 and stale(out) == []


def test_files_get_the_users_umask_and_a_foreign_folder_is_refused(tmp_path):
    previous = os.umask(0o022)
    try:
        bundle_of(2, tmp_path / "out")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    # before: model.onnx was 0600 (mkstemp), unlike the rest of the bundle
    assert {"model.ckpt", "model.onnx", "report.json"} <= set(modes) and set(modes.values()) == {0o644}, modes
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(CompressionConfigError, match=r"holds files that are not an export bundle \(notes.txt\)"):
        bundle_of(2, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"
