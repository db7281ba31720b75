"""The trust model of `class_path` (#15): a recipe imports only the module its author named, only from the
installed environment or folders it lists, and only after its source shows a class of that name."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_compress.app.cli import main
from lightning_compress.config import load_recipe
from lightning_compress.config.trust import locate_class
from lightning_compress.errors import CompressionConfigError

USER_MODULE = '''
from pathlib import Path
Path(__file__).with_name("imported.marker").write_text("top-level code ran")

from lightning_compress import ClassificationModule


class MyModule(ClassificationModule):
    """A user's LightningModule."""


def not_a_class():
    return 1
'''


def project(tmp_path: Path, class_path: str, python_path: str | None = "src") -> Path:
    """A user's project: ``src/mymodels.py`` and a recipe naming ``class_path`` (with ``python_path``)."""
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "mymodels.py").write_text(USER_MODULE)
    lines = [f"python_path: [{python_path}]"] if python_path else []
    lines += [f"model: {{class_path: {class_path}, init_args: {{model: cnn_tiny}}}}", "data: {name: digits}",
              "trainer: {max_epochs: 1}"]  # fmt: skip
    (tmp_path / "recipe.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path / "src" / "imported.marker"


def test_a_name_that_is_not_a_class_runs_no_code(tmp_path, capsys):
    # before: `class_path: this.X` imported `this` in validate and --print-config: the Zen of Python printed
    (tmp_path / "r.yaml").write_text("model: {class_path: this.X}\n")
    imported_before = "this" in sys.modules
    for argv in (["validate", str(tmp_path / "r.yaml")], ["fit", str(tmp_path / "r.yaml"), "--print-config"]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert "Beautiful is better than ugly" not in out + err and "defines no class 'X'" in err, err
    assert ("this" in sys.modules) == imported_before
    marker = project(tmp_path, "mymodels.not_a_class")
    assert main(["validate", str(tmp_path / "recipe.yaml")]) == 2
    assert "defines no class 'not_a_class'" in capsys.readouterr().err and not marker.exists()


def test_print_config_reads_the_source_and_imports_nothing(tmp_path, capsys):
    marker = project(tmp_path, "mymodels.MyModule")
    assert main(["fit", str(tmp_path / "recipe.yaml"), "--print-config"]) == 0
    assert "class_path: mymodels.MyModule" in capsys.readouterr().out and not marker.exists()
    assert main(["validate", str(tmp_path / "recipe.yaml")]) == 0  # builds the model: the named module runs
    assert marker.exists()
    sys.modules.pop("mymodels", None)


def test_the_current_folder_is_not_searched_by_accident(tmp_path):
    # before: `python -m lightning_compress` put the current folder first on the import path
    marker = project(tmp_path, "mymodels.MyModule", python_path=None)
    in_cwd = USER_MODULE.replace('with_name("imported.marker")', 'with_name("cwd.marker")')
    (tmp_path / "mymodels.py").write_text(in_cwd)
    done = subprocess.run([sys.executable, "-m", "lightning_compress", "validate", "recipe.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "no module 'mymodels'" in done.stderr and "python_path" in done.stderr, done.stderr
    assert not (tmp_path / "cwd.marker").exists() and not marker.exists()
    listed = subprocess.run([sys.executable, "-m", "lightning_compress", "validate", "recipe.yaml", "--python-path",
                             "src"], cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert marker.exists() and not (tmp_path / "cwd.marker").exists()  # the listed folder, not the current one


def test_a_folder_the_recipe_lists_is_searched_relative_to_the_recipe(tmp_path, monkeypatch):
    project(tmp_path, "mymodels.MyModule")
    monkeypatch.chdir("/")
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert recipe.folders == [(tmp_path / "src").resolve()]
    assert type(recipe.model()).__name__ == "MyModule"
    sys.modules.pop("mymodels", None)
    (tmp_path / "recipe.yaml").write_text((tmp_path / "recipe.yaml").read_text().replace("[src]", "[nowhere]"))
    with pytest.raises(CompressionConfigError, match="python_path: no such folder"):
        load_recipe(tmp_path / "recipe.yaml")


@pytest.mark.parametrize("path", ["os.system", "json", "a b.C", 3, "no_such_module_anywhere.X"])
def test_names_that_are_not_classes_of_a_findable_module_are_refused(path):
    with pytest.raises(CompressionConfigError, match=r"model\.class_path"):
        locate_class(path, "model.class_path", "LightningModule")


def test_a_package_installed_editable_is_found_by_the_environments_own_finder(tmp_path, monkeypatch):
    # `pip install -e .` installs a finder on sys.meta_path, not a folder on sys.path: the source check must
    # find the package through it (without importing it)
    import importlib.util

    (tmp_path / "editable_pkg").mkdir()
    (tmp_path / "editable_pkg" / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (tmp_path / "editable_pkg" / "models.py").write_text(USER_MODULE)

    class EditableFinder:  # what setuptools' editable finder does: map a top-level name to a folder
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name != "editable_pkg":
                return None
            package = tmp_path / "editable_pkg"
            return importlib.util.spec_from_file_location(
                name, package / "__init__.py", submodule_search_locations=[str(package)]
            )

    monkeypatch.setattr(sys, "meta_path", [EditableFinder, *sys.meta_path])
    found = locate_class("editable_pkg.models.MyModule", "model.class_path", "LightningModule")
    assert found == tmp_path / "editable_pkg" / "models.py" and "editable_pkg" not in sys.modules
