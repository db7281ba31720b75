"""Bounded YAML 1.2 reading of recipes, sweeps and overrides (#15: base-60 `2:4`, alias bombs, long values)."""

import pytest

from lightning_compress.app.cli import main
from lightning_compress.config import load_recipe
from lightning_compress.config.reading import MAX_BYTES, MAX_VALUES, parse
from lightning_compress.errors import BRIEF, CompressionConfigError

PRUNE_2_4 = "compression:\n  pruning: {pattern: %s, final_sparsity: 0.5}\n"


def laughs(levels: int = 8) -> str:
    """600-odd bytes that expand to 10**levels values once aliases are followed."""
    lines = ["l0: &l0 [ha, ha, ha, ha, ha, ha, ha, ha, ha, ha]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel: {{lr: *l{levels - 1}}}\n"


@pytest.mark.parametrize("text", ["2:4", "'2:4'"])
def test_2_4_stays_the_pattern_in_files_and_overrides(text, tmp_path):
    # YAML 1.1 (PyYAML's default) reads `2:4` as the base-60 integer 124: the pattern became 124
    (tmp_path / "r.yaml").write_text(PRUNE_2_4 % text)
    assert load_recipe(tmp_path / "r.yaml").config["compression"]["pruning"]["pattern"] == "2:4"
    recipe = load_recipe({}, ["--compression.pruning.pattern=2:4", "--compression.pruning.final_sparsity=0.5"])
    assert recipe.config["compression"]["pruning"]["pattern"] == "2:4"


def test_numbers_read_as_yaml_1_2():
    numbers = [parse(t, "x") for t in ("1e-3", "10", "0.5", "-3", "1_000", ".inf")]
    assert numbers == [1e-3, 10, 0.5, -3, 1000, float("inf")]
    assert [parse(t, "x") for t in ("1:30", "2:4", "1:30:00")] == ["1:30", "2:4", "1:30:00"]


def test_an_override_typed_where_a_string_goes_stays_a_string():
    recipe = load_recipe({}, ["--compression.export.dirpath=2024", "--trainer.max_epochs=3"])
    assert recipe.config["compression"]["export"]["dirpath"] == "2024" and recipe.config["trainer"]["max_epochs"] == 3


def test_an_alias_bomb_is_refused_before_anything_expands_it(tmp_path):
    text = laughs()
    assert len(text) < 700
    (tmp_path / "bomb.yaml").write_text(text)
    with pytest.raises(CompressionConfigError, match=f"expands to more than {MAX_VALUES:,} values"):
        load_recipe(tmp_path / "bomb.yaml")
    assert main(["validate", str(tmp_path / "bomb.yaml")]) == 2
    assert main(["validate", str(tmp_path / "bomb.yaml"), "--print-config"]) == 2
    # before: the type error formatted the value and `validate` died with MemoryError after ~30 s
    (tmp_path / "big.yaml").write_text("# " + "x" * MAX_BYTES + "\n")
    with pytest.raises(CompressionConfigError, match="larger than"):
        load_recipe(tmp_path / "big.yaml")


def test_overrides_that_are_not_yaml_exit_2_with_the_key(capsys, tmp_path):
    (tmp_path / "r.yaml").write_text("trainer: {max_epochs: 1}\n")
    assert main(["validate", str(tmp_path / "r.yaml"), "--trainer.max_epochs=[1,"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-compress: error:") and "trainer.max_epochs" in err and "Traceback" not in err


def test_messages_never_show_a_value_unbounded(tmp_path):
    (tmp_path / "r.yaml").write_text("compression:\n  pruning: {scope: " + "x" * 20000 + "}\n")
    with pytest.raises(CompressionConfigError) as error:
        load_recipe(tmp_path / "r.yaml")
    assert "compression.pruning" in str(error.value) and len(str(error.value)) < 40 * BRIEF
