"""What a recipe may run: the trust model of ``class_path``.

- A recipe imports only the modules its author named in a ``class_path`` (``model`` / ``data``), and only
  from the installed environment or from folders listed explicitly: the recipe's ``python_path`` (relative
  to the recipe's folder) or ``--python-path`` on the command line. The current folder is not searched by
  accident: ``python -m lightning_compress`` drops it from ``sys.path`` (:func:`drop_current_folder`).
- Before anything runs, the named module is found and its source read as text (:func:`locate_class`, no
  import, no code executed): it must define (or import by name) a class of that name. ``validate``-time
  checks and ``--print-config`` stop there; building the recipe then imports that one module and checks
  the class's base.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning_compress.errors import CompressionConfigError, brief

EXAMPLE = "e.g. my_package.models.MyModule"


def drop_current_folder() -> None:
    """Remove the current folder that ``python -m`` puts first on ``sys.path`` (unless ``-P`` already did)."""
    if sys.path and not sys.flags.safe_path and sys.path[0] in ("", os.getcwd()):
        sys.path.pop(0)


def search_folders(config: dict[str, Any], recipe_path: Path | None, extra: Sequence[str] = ()) -> list[Path]:
    """The folders a recipe's ``class_path`` may come from besides the installed environment: its
    ``python_path`` entries (relative to the recipe's folder) and ``extra`` (``--python-path``)."""
    listed = config.get("python_path") or []
    listed = [listed] if isinstance(listed, str) else listed if isinstance(listed, list) else []
    base = recipe_path.parent if recipe_path is not None else Path.cwd()
    folders = [(base / str(p)).resolve() for p in listed]
    return folders + [Path(p).resolve() for p in extra]


def locate_class(path: Any, key: str, base: str, folders: Sequence[Path] = ()) -> Path | None:
    """The source file that defines the class ``path`` (``module.Class``) names, found without importing it;
    ``None`` for a module without Python source (compiled, built-in), which only its import can check.

    A module that is already imported is checked all the way (the class and its Lightning ``base``): that
    runs nothing more.

    Raises:
        CompressionConfigError: not a dotted name, no such module on the search path, a module whose source
            binds no class of that name, or (already imported) not a subclass of ``base``.
    """
    text = str(path)
    module_name, _, name = text.rpartition(".")
    refused = f"{key}: must be the import path of a {base} subclass ({EXAMPLE}), got {brief(path)}"
    if not isinstance(path, str) or not module_name or not all(p.isidentifier() for p in text.split(".")):
        raise CompressionConfigError(refused)
    if module_name in sys.modules:
        _check_base(getattr(sys.modules[module_name], name, None), refused, base)
    spec = _find_spec(module_name, folders)
    if spec is None:
        where = ", ".join(str(f) for f in folders) or "none listed"
        raise CompressionConfigError(
            f"{refused}: no module {module_name!r} in the installed environment or the recipe's folders ({where}). "
            "HINT: install your package, or list its folder under `python_path:` in the recipe (or --python-path)"
        )
    source = getattr(spec.loader_state, "filename", None) if spec.origin == "frozen" else spec.origin
    origin = Path(source) if source and source != "built-in" else None
    if origin is None or origin.suffix != ".py" or not origin.is_file():
        return None
    tree = ast.parse(origin.read_text(encoding="utf-8", errors="replace"), filename=str(origin))
    if name not in _class_bindings(tree):
        raise CompressionConfigError(
            f"{refused}: {module_name!r} ({origin}) defines no class {name!r}; refused without importing it. "
            "HINT: name the module that defines the class"
        )
    return origin


def import_class(path: Any, key: str, base: str, folders: Sequence[Path] = ()) -> Any:
    """The class ``path`` names, a subclass of Lightning's ``base``: located first (:func:`locate_class`),
    then its one module imported with ``folders`` searched before the environment."""
    locate_class(path, key, base, folders)
    module_name, _, name = str(path).rpartition(".")
    with _searching(folders):
        try:
            found = getattr(importlib.import_module(module_name), name, None)
        except ImportError as error:
            raise CompressionConfigError(f"{key}: importing {module_name!r} failed: {error}") from None
    return _check_base(found, f"{key}: must be the import path of a {base} subclass ({EXAMPLE}), got {path!r}", base)


def _check_base(found: Any, refused: str, base: str) -> Any:
    import lightning.pytorch as pl

    if not (isinstance(found, type) and issubclass(found, getattr(pl, base))):
        what = f"a class that is not a {base}" if isinstance(found, type) else f"a {type(found).__name__}"
        raise CompressionConfigError(f"{refused}: it is {what if found is not None else 'not there'}")
    return found


def _find_spec(module_name: str, folders: Sequence[Path]) -> Any:
    """``ModuleSpec`` of a dotted module found by walking the path finders; no package's code runs."""
    search: list[str] | None = [str(f) for f in folders] + sys.path
    spec = None
    for i, part in enumerate(module_name.split(".")):
        qualified = ".".join(module_name.split(".")[: i + 1])
        if qualified in sys.modules and getattr(sys.modules[qualified], "__spec__", None) is not None:
            spec = sys.modules[qualified].__spec__  # already imported: it runs nothing more
        else:
            spec = importlib.machinery.PathFinder.find_spec(qualified, search)
            if spec is None and i == 0:  # the environment's own finders (editable installs, built-ins): a
                spec = importlib.util.find_spec(part)  # top-level name is found without running anything
        if spec is None:
            return None
        search = list(spec.submodule_search_locations or [])
    return spec


def _class_bindings(tree: ast.Module) -> set[str]:
    """Names a module's top level binds to something that may be a class: ``class`` statements, imports by
    name and plain assignments (``MyModule = Other``); star imports bind nothing this can see."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):
            names |= _class_bindings(ast.Module(body=[*node.body, *getattr(node, "orelse", [])], type_ignores=[]))
    return names


@contextlib.contextmanager
def _searching(folders: Sequence[Path]) -> Iterator[None]:
    added = [str(f) for f in folders if str(f) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)
