import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.config import load_recipe
from lightning_compress.errors import CompressionConfigError

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "sweeps")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_is_valid_and_builds_its_callbacks(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative file paths (teachers, export folders) resolve here
    text = path.read_text()
    assert text.startswith("#") and "Run" in text.split("\nseed")[0]  # a header saying how to run it
    recipe = load_recipe(path)
    assert recipe.trainer_kwargs()["max_epochs"] > 0
    if recipe.config["compression"].get("distillation", {}).get("teacher", "self") != "self":  # another recipe's
        teachers = r"runs/(mnist5k-teacher|cifar10-resnet18)/model.ckpt.*no such file"
        with pytest.raises(CompressionConfigError, match=teachers):
            recipe.callbacks()
    else:
        assert recipe.callbacks()


def test_overrides_in_the_wandb_agent_form():
    path = next(p for p in RECIPES if p.name == "prune_quantize_export.yaml")
    recipe = load_recipe(path, ["--compression.pruning.final_sparsity=0.95", "trainer.max_epochs=3"])
    pruning = next(c for c in recipe.callbacks() if isinstance(c, MagnitudePruning))
    assert pruning.final_sparsity == 0.95 and recipe.trainer_kwargs()["max_epochs"] == 3
    assert [type(c).__name__ for c in recipe.callbacks()][:2] == ["MagnitudePruning", "QuantizationAwareTraining"]
    assert any(isinstance(c, QuantizationAwareTraining) for c in recipe.callbacks())






def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(CompressionConfigError, match="cannot read the recipe"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(CompressionConfigError, match="a recipe must be a mapping of sections"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(CompressionConfigError, match=r"override 'trainer' must look like key.path=VALUE"):
        load_recipe({}, ["trainer"])



















# -- property-based: mutated shipped recipes end in a clear error, never a traceback ------------------------------
SHIPPED = {p.relative_to(ROOT / "recipes").as_posix(): yaml.safe_load(p.read_text()) for p in RECIPES}
WRONG = st.one_of(  # values no shipped key accepts in place of a scalar
    st.dictionaries(st.sampled_from(["a", "b", "x"]), st.integers(), min_size=1, max_size=2),
)
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3), WRONG,
)  # fmt: skip
KEY = st.from_regex(r"[a-z][a-z_]{0,11}", fullmatch=True)


def _leaves(config: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(config, dict) and config:
        return [path for key, value in config.items() for path in _leaves(value, (*prefix, key))]
    return [prefix] if prefix else []


def _sections(config: Any, prefix: tuple = ()) -> list[tuple]:
    if not isinstance(config, dict):
        return []
    return [prefix] + [p for key, value in config.items() for p in _sections(value, (*prefix, key))]


def _set(config: dict, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        config = config[key]
    config[path[-1]] = value


def _get(config: dict, path: tuple) -> Any:
    for key in path:
        config = config[key]
    return config


@st.composite
def mutated(draw: Any) -> tuple[dict, str, str | None]:
    """(config, what was done, the key path the error must name or None when the result may be valid)."""
    name = draw(st.sampled_from(sorted(SHIPPED)))
    config = copy.deepcopy(SHIPPED[name])
    kind = draw(st.sampled_from(["wrong_type", "any_value", "unknown_key", "drop_section", "out_of_range"]))
    if kind == "wrong_type":  # a mapping where a scalar or list belongs: always invalid
        path = draw(st.sampled_from(_leaves(config)))
        _set(config, path, draw(WRONG))
        return config, f"{name}: {kind} {path}", ".".join(map(str, path))
    if kind == "any_value":
        path = draw(st.sampled_from(_leaves(config)))
        _set(config, path, draw(ANY_VALUE))
        return config, f"{name}: {kind} {path}", None
    if kind == "unknown_key":  # a misspelt key in any section (top level included): always invalid
        path = draw(st.sampled_from([p for p in _sections(config) if p[:1] not in (("seed",),)]))
        key = draw(KEY.filter(lambda k: k not in _get(config, path)))
        if path == () and key in ("model", "data", "trainer", "compression", "logger", "seed", "python_path"):
            key += "_x"
        _get(config, path)[key] = draw(ANY_VALUE)
        return config, f"{name}: {kind} {path}.{key}", ".".join(map(str, (*path, key)))
    if kind == "drop_section":
        section = draw(st.sampled_from(sorted(config)))
        del config[section]
        return config, f"{name}: {kind} {section}", None
    numbers = [p for p in _leaves(config) if isinstance(_get(config, p), (int, float))
               and not isinstance(_get(config, p), bool) and p != ("seed",)]  # fmt: skip
    path = draw(st.sampled_from(numbers))
    _set(config, path, draw(st.sampled_from([-1, -0.5, 1e9, float("nan"), float("inf")])))
    return config, f"{name}: {kind} {path}", None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_recipes_fail_with_a_config_error_naming_the_key(case):
    config, what, key = case
    try:
        recipe = load_recipe(config)
    except CompressionConfigError as error:
        event("refused by validation")
        assert key is None or key in str(error), (what, str(error))
        return
    event("valid")
    assert key is None, f"{what}: accepted"
    with contextlib.suppress(CompressionConfigError):  # a teacher or export folder that is not there
        recipe.callbacks()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=mutated())
def test_mutated_recipes_through_the_command_exit_0_or_2_never_a_traceback(case, tmp_path_factory, capsys):
    from lightning_compress.app.cli import main

    config, what, key = case
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    code = main(["validate", str(path)])
    err = capsys.readouterr().err
    event(f"exit {code}")
    assert code in (0, 2), what
    assert "Traceback" not in err, what
    if code == 2:
        assert err.startswith("lightning-compress: error: "), what
    if key is not None:
        assert code == 2 and key in err, (what, err)


# -- the same property for what the command line gets besides the recipe: overrides and logger sections (#15) ----
RAW = st.one_of(
    st.sampled_from(["[1,", "{", "2:4", "-3", "1e-3", "&a [*a]", "!!python/object/apply:os.system [ls]", "null", "~",
                     "'", '"', "", "1:30:00", "[[[[[[[[", "*x", "0x1F", ".nan", "yes"]),
    st.text(max_size=10),
)  # fmt: skip
LOGGER_KEYS = st.sampled_from(["wandb", "csv"]).flatmap(
    lambda name: st.sampled_from(["project", "mode", "offline", "log_model", "save_dir", "name", "tags", "projcet",
                                  "flush_logs_every_n_steps", "version"]).map(lambda key: f"logger.{name}.{key}")
)  # fmt: skip


@st.composite
def overridden(draw: Any) -> tuple[Path, str]:
    path = draw(st.sampled_from(RECIPES))
    leaves = [".".join(map(str, p)) for p in _leaves(SHIPPED[path.relative_to(ROOT / "recipes").as_posix()])]
    key = draw(st.one_of(st.sampled_from(leaves), LOGGER_KEYS, KEY))
    return path, f"--{key}={draw(RAW)}"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overridden())
def test_any_override_through_the_command_exits_0_or_2_never_a_traceback(case):
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from lightning_compress.app.cli import main

    path, override = case
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = main(["validate", str(path), override])
    event(f"exit {code}")
    assert code in (0, 2), (override, err.getvalue()[-800:])
    assert "Traceback" not in err.getvalue(), override
    if code == 2:
        assert "lightning-compress: error: " in err.getvalue(), override


def test_per_layer_settings_from_a_recipe_and_from_overrides():
    from lightning_compress import LowRankFactorization

    path = next(p for p in RECIPES if p.name == "prune_quantize_export.yaml")
    overrides = [
        "compression.pruning.layer_sparsity={model.classifier.1: 0.95, 'model.features.*': 0.5}",
        "compression.quantization.layer_bits={model.classifier.*: 4}",
        "compression.low_rank.ranks={model.classifier.1: 16}",
    ]
    callbacks = {type(c).__name__: c for c in load_recipe(path, overrides).callbacks()}
    assert callbacks["MagnitudePruning"].layer_sparsity == {"model.classifier.1": 0.95, "model.features.*": 0.5}
    assert callbacks["QuantizationAwareTraining"].layer_bits == {"model.classifier.*": 4}
    assert isinstance(callbacks["LowRankFactorization"], LowRankFactorization)
    assert callbacks["LowRankFactorization"].ranks == {"model.classifier.1": 16}
    with pytest.raises(CompressionConfigError, match=r"layer_bits\['model.fc'\]` must be an integer from 2 to 8"):
        load_recipe(path, ["compression.quantization.layer_bits={model.fc: 16}"]).callbacks()
    with pytest.raises(CompressionConfigError, match=r"compression.pruning.layer_sparsity: .*dict"):
        load_recipe(path, ["compression.pruning.layer_sparsity=0.5"])
