"""An export folder replaced as a whole: the previous complete bundle or the new complete one, never a mix.

A bundle is written into a staging folder beside its destination (``<parent>/.<name>.export-<pid>-*``) and
swapped in with one ``rename``: on Linux an exchange of the two folders (``renameat2(RENAME_EXCHANGE)``),
so that at every moment the destination holds one complete bundle; the old one is deleted after. Where
the exchange is not available (other systems, file systems without it), the old folder is renamed aside
first (``.<name>.old-<pid>-*``) and put back by the next export if a crash came between the two renames.
Staging and old folders of processes that are no longer running are removed by the next export.

The destination must be empty, missing, or a bundle (it holds ``report.json``): a folder with other files
is refused (:func:`check_replaceable`) rather than deleted. Folders and files get the user's umask.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lightning_compress.errors import CompressionConfigError

MARKER = "report.json"  # what makes a folder a bundle this package may replace
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def umask() -> int:
    """The process's umask (read without changing it for long)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a path, when an export may replace it: missing, empty, or a bundle; and its parent
    writable.

    Raises:
        CompressionConfigError: the folder holds files that are not a bundle's (named), is a file, or its
            parent cannot be written.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CompressionConfigError(f"`dirpath` {str(folder)!r} is a file: the export needs a folder")
    if folder.is_dir() and not (folder / MARKER).exists():
        entries = sorted(p.name for p in folder.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise CompressionConfigError(
                f"`dirpath` {str(folder)!r} holds files that are not an export bundle ({shown}); an export replaces "
                "its folder as a whole. HINT: export into a folder of its own (empty, new, or an earlier export)"
            )
    parent = folder.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent, prefix=f".{folder.name}.write-test-"):
            pass
    except OSError as error:
        raise CompressionConfigError(
            f"`dirpath` must be a folder this process can write, got {str(folder)!r}: the export writes its "
            f"bundle beside it, in {str(parent)!r}, which cannot be written ({error})"
        ) from None
    return folder


@contextlib.contextmanager
def replaced(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without an exception, swap it in for ``folder``.

    On an exception the staging folder is removed and ``folder`` is left as it was.
    """
    folder = Path(folder).resolve()
    check_replaceable(folder)
    clean_stale(folder)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.export-{os.getpid()}-"))
    try:
        yield staging
        _give_modes(staging)
        swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the old bundle after an exchange, or the failed new one


def swap_in(staging: Path, folder: Path) -> None:
    """Put ``staging`` at ``folder`` in one step; what was at ``folder`` ends at ``staging``."""
    if not folder.exists():
        os.rename(staging, folder)
        return
    if _exchange(staging, folder):
        return
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-{os.getpid()}-"))
    os.rename(folder, aside / "bundle")
    os.rename(staging, folder)  # a crash between the two renames: the next export puts `aside` back
    os.rename(aside / "bundle", staging)
    aside.rmdir()


def clean_stale(folder: Path) -> None:
    """Remove the staging and old folders of exports into ``folder`` whose process is gone; put a bundle
    renamed aside back if ``folder`` is missing (a crash between the fallback's two renames)."""
    for path in sorted(folder.parent.glob(f".{glob.escape(folder.name)}.*-*")):
        kind, _, rest = path.name[len(folder.name) + 2 :].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("export", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and (path / "bundle").is_dir() and not folder.exists():
            os.rename(path / "bundle", folder)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); ``False`` where the system cannot."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    try:
        renameat2 = ctypes.CDLL(libc_name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # EINVAL / ENOSYS / EOPNOTSUPP: not on this system or file system
    raise OSError(error, os.strerror(error), str(b))


def _give_modes(staging: Path) -> None:
    """The modes ``open`` would give under the user's umask (``mkdtemp`` / ``mkstemp`` make 0700 / 0600)."""
    mask = umask()
    staging.chmod(0o777 & ~mask)
    for path in staging.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
