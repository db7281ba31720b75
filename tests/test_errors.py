import pytest

from lightning_compress.errors import CompressionConfigError, config_error, did_you_mean, one_of


def test_message_names_argument_allowed_and_given():
    err = config_error("final_sparsity", "in [0, 1)", 1.2)
    assert isinstance(err, ValueError)
    assert str(err) == "`final_sparsity` must be in [0, 1), got 1.2"


def test_hint_is_appended():
    err = config_error("schedule", one_of(["cubic", "linear"]), "cubc", did_you_mean("cubc", ["cubic", "linear"]))
    assert str(err) == "`schedule` must be one of 'cubic', 'linear', got 'cubc'. HINT: did you mean 'cubic'?"
    with pytest.raises(CompressionConfigError, match="HINT: did you mean 'cubic'"):
        raise err


def test_did_you_mean_stays_quiet_for_unrelated_names():
    assert did_you_mean("zzz", ["cubic", "linear"]) is None
