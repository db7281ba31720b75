"""The layering in each subpackage's docstring, enforced from the code's imports (read with ``ast``).

Nothing of the package is imported here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_compress"
SUBPACKAGES = ("core", "deploy", "vision", "integrations", "callbacks", "config", "app")
NO_LIGHTNING = ("core", "deploy", "integrations")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
INTERNAL = {m: {i for i in imports(p) if i in MODULES} for m, p in MODULES.items()}


def layer(module: str) -> str:
    """``core``, ``deploy``, ... for a module of a subpackage; ``errors`` or ``root`` for the rest."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    return "errors" if module == "lightning_compress.errors" else "root"


def allowed(subpackage: str) -> set[str]:
    """The layers a subpackage's ``__init__`` docstring says it may import (its ``May import:`` paragraph)."""
    doc = ast.get_docstring(ast.parse((PACKAGE / subpackage / "__init__.py").read_text())) or ""
    match = re.search(r"May import:(.*?)[;.](?=\s|$)", doc, re.S)  # the sentence, up to "; never ..."
    assert match, f"lightning_compress/{subpackage}/__init__.py's docstring has no 'May import:' paragraph"
    named = set(re.findall(r"``(?:lightning_compress\.)?(\w+)``", match.group(1)))
    return (named & {*SUBPACKAGES, "errors"}) | {subpackage, "errors"}


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_layer_imports_only_what_its_docstring_allows(subpackage):
    permitted = allowed(subpackage)
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in INTERNAL.items() if layer(module) == subpackage
        for target in targets if layer(target) not in permitted and target != "lightning_compress"
    )  # fmt: skip
    assert not wrong, f"{subpackage} may import {sorted(permitted)}: " + "; ".join(wrong)


def test_the_docstrings_state_the_layering():
    assert allowed("core") == {"core", "errors"}
    assert allowed("deploy") == {"deploy", "core", "errors"}
    assert allowed("callbacks") == {"callbacks", "deploy", "core", "vision", "integrations", "errors"}
    assert {"config", "app"} & allowed("callbacks") == set()
    assert allowed("app") >= {"config", "callbacks", "deploy", "core", "vision"}


def test_every_internal_import_names_a_module_that_exists():
    missing = sorted(
        f"{module} imports {target}"
        for module, path in MODULES.items()
        for target in imports(path)
        if target.startswith("lightning_compress.")
        and target not in MODULES
        and target.rpartition(".")[0] not in MODULES
    )
    assert not missing, "; ".join(missing)


def test_errors_and_lower_layers_never_import_upward():
    assert INTERNAL["lightning_compress.errors"] == set()
    for subpackage in SUBPACKAGES:
        for module, targets in INTERNAL.items():
            if layer(module) == subpackage:
                assert "lightning_compress" not in targets, f"{module} imports the package root (a cycle through it)"


def test_no_import_cycle_between_modules():
    graph = {m: {t for t in targets if MODULES[t].name != "__init__.py"} for m, targets in INTERNAL.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in graph:
        if module not in state and MODULES[module].name != "__init__.py":
            visit(module, [module])


@pytest.mark.parametrize("subpackage", NO_LIGHTNING)
def test_cores_and_deployment_never_import_lightning(subpackage):
    for module, path in MODULES.items():
        if layer(module) == subpackage:
            lightning = {i for i in imports(path) if i.split(".")[0] in ("lightning", "pytorch_lightning")}
            assert not lightning, f"{module} imports {sorted(lightning)}"


def test_only_the_integrations_import_wandb():
    users = sorted(m for m, p in MODULES.items() if any(i.split(".")[0] == "wandb" for i in imports(p)))
    assert users == ["lightning_compress.integrations.wandb"]


def test_the_shared_import_check_finds_no_problem():
    import subprocess
    import sys

    script = PACKAGE.parents[1] / "shared" / "tools" / "import_check.py"
    if not script.exists():
        pytest.skip("../shared/tools/import_check.py is not beside this checkout")
    done = subprocess.run([sys.executable, str(script), str(PACKAGE.parent)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
