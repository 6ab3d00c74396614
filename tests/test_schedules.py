import re

import pytest

from hf_compress import GradualMagnitudePruningCallback, GradualStructuredPruningCallback, PruningConfig
from hf_compress.pruning.schedules import CubicSparsitySchedule, cubic_sparsity, validate_step_range


def zhu_gupta(t, s_i, s_f, t0, n, dt):
    """The paper's formula, written out independently of the implementation."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3


def test_cubic_schedule_hits_its_targets_at_the_pruning_steps():
    kwargs = dict(final_sparsity=0.9, initial_sparsity=0.1, begin_step=100, num_pruning_steps=4, frequency=50)
    for t in (100, 150, 200, 250, 300):
        assert cubic_sparsity(t, **kwargs) == pytest.approx(zhu_gupta(t, 0.1, 0.9, 100, 4, 50))
    assert cubic_sparsity(100, **kwargs) == pytest.approx(0.1)  # s_i at t0
    assert cubic_sparsity(300, **kwargs) == pytest.approx(0.9)  # s_f at t0 + n * dt
    assert cubic_sparsity(150, **kwargs) == pytest.approx(0.9 - 0.8 * 0.75**3)


def test_cubic_schedule_is_constant_between_pruning_steps_and_zero_before_the_first():
    kwargs = dict(final_sparsity=0.8, begin_step=10, num_pruning_steps=3, frequency=5)
    assert cubic_sparsity(0, **kwargs) == cubic_sparsity(9, **kwargs) == 0.0
    assert cubic_sparsity(15, **kwargs) == cubic_sparsity(19, **kwargs) > cubic_sparsity(14, **kwargs)
    assert cubic_sparsity(25, **kwargs) == cubic_sparsity(10_000, **kwargs) == pytest.approx(0.8)
    values = [cubic_sparsity(t, **kwargs) for t in range(40)]
    assert values == sorted(values)  # never un-prunes
    assert len(set(values)) == 4  # changes exactly at 10, 15, 20, 25


def test_schedule_object_spells_out_the_pruning_steps():
    schedule = CubicSparsitySchedule.from_step_range(0.8, begin_step=10, end_step=45, frequency=10)
    # 45 - 10 is not a multiple of 10: the last pruning step is 40, where the target is already final.
    assert schedule.num_pruning_steps == 3 and schedule.end_step == 40
    assert schedule.pruning_steps == [10, 20, 30, 40]
    assert [schedule.is_pruning_step(t) for t in (9, 10, 15, 20, 40, 50)] == [False, True, False, True, True, False]
    assert schedule(40) == pytest.approx(0.8)
    assert schedule(20) == pytest.approx(zhu_gupta(20, 0.0, 0.8, 10, 3, 10))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(final_sparsity=1.5), "final_sparsity"),
        (dict(final_sparsity=0.5, initial_sparsity=0.6), "initial_sparsity"),
        (dict(final_sparsity=0.5, begin_step=-1), "begin_step"),
        (dict(final_sparsity=0.5, num_pruning_steps=0), "num_pruning_steps"),
        (dict(final_sparsity=0.5, frequency=0), "frequency"),
        (dict(final_sparsity=0.5, frequency=2.5), "frequency"),
    ],
)
def test_bad_schedule_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cubic_sparsity(0, **kwargs)
    with pytest.raises(ValueError, match=message):
        CubicSparsitySchedule(**kwargs)


def test_step_range_shorter_than_frequency_raises():
    with pytest.raises(ValueError, match="end_step - begin_step >= frequency"):
        CubicSparsitySchedule.from_step_range(0.5, begin_step=10, end_step=15, frequency=10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(begin_step=-1), "begin_step=-1 must be a step (>= 1) or a fraction of training in [0, 1)."),
        (dict(end_step=True), "end_step=True must be a step (>= 1) or a fraction of training in [0, 1)."),
        (dict(end_step="0.5"), "end_step='0.5' must be a step (>= 1) or a fraction of training in [0, 1)."),
        (dict(frequency=0), "frequency=0 must be an integer >= 1 (steps between pruning steps)."),
        (dict(frequency=2.5), "frequency=2.5 must be an integer >= 1 (steps between pruning steps)."),
    ],
)
def test_both_gradual_callbacks_check_their_step_range_alike(kwargs, message):
    steps = {"begin_step": 0.1, "end_step": 0.75, "frequency": 10, **kwargs}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        validate_step_range(**steps)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GradualStructuredPruningCallback(PruningConfig(), **steps)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GradualMagnitudePruningCallback(0.5, **steps)


def test_valid_step_ranges_pass():
    for begin, end in ((0, 0.75), (0.1, 0.9), (10, 200)):
        validate_step_range(begin, end, frequency=1)  # raises on failure
