import pytest

from lightning_compress.core.schedules import SparsitySchedule, get_schedule
from lightning_compress.errors import CompressionConfigError


def test_cubic_matches_zhu_gupta_formula():
    s_i, s_f, t0, n_dt = 0.1, 0.9, 10, 80
    schedule = SparsitySchedule(s_i, s_f, t0, t0 + n_dt, frequency=8)
    for t in range(t0, t0 + n_dt + 1):
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / n_dt) ** 3
        assert schedule.target(t) == pytest.approx(expected)
    assert schedule.target(t0 - 1) == 0.0
    assert schedule.target(t0 + n_dt + 50) == pytest.approx(s_f)


def test_linear_and_constant():
    linear = SparsitySchedule(0.0, 0.8, 0, 100, 10, "linear")
    assert linear.target(25) == pytest.approx(0.2)
    constant = SparsitySchedule(0.0, 0.8, 5, 100, 10, "constant")
    assert constant.target(5) == pytest.approx(0.8)
    assert constant.target(4) == 0.0


def test_update_steps_every_frequency_and_at_the_end():
    schedule = SparsitySchedule(0.0, 0.9, 3, 20, frequency=5)
    assert [t for t in range(30) if schedule.is_update_step(t)] == [3, 8, 13, 18, 20]


def test_one_shot_when_start_equals_end():
    schedule = SparsitySchedule(0.0, 0.9, 7, 7, frequency=5)
    assert schedule.target(7) == pytest.approx(0.9)
    assert [t for t in range(20) if schedule.is_update_step(t)] == [7]


def test_bad_schedule_name_lists_known_ones():
    with pytest.raises(CompressionConfigError, match=r"`schedule` must be one of 'cubic', 'linear', 'constant'"):
        get_schedule("cubik")


def test_end_before_start_is_refused():
    with pytest.raises(CompressionConfigError, match=r"`end_step` must be >= start_step \(5\), got 2"):
        SparsitySchedule(0.0, 0.9, 5, 2, 1)


def test_frequency_must_be_positive():
    with pytest.raises(CompressionConfigError, match="`frequency` must be a positive number of steps, got 0"):
        SparsitySchedule(0.0, 0.9, 0, 10, 0)
