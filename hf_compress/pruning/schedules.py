"""Sparsity schedules for gradual pruning: how much of a model should be pruned at each training step.

The schedules know nothing about what is pruned (weights, heads, neurons); a pruning callback asks them for the
target at a step and prunes up to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cubic_sparsity(
    step: int,
    final_sparsity: float,
    initial_sparsity: float = 0.0,
    begin_step: int = 0,
    num_pruning_steps: int = 1,
    frequency: int = 1,
) -> float:
    """Target sparsity at `step` of the cubic schedule of Zhu & Gupta (2017), "To prune, or not to prune".

    Pruning happens at steps `t = t0 + k * dt` for `k = 0, ..., n` (`t0 = begin_step`, `dt = frequency`,
    `n = num_pruning_steps`), where the target is

        s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3

    so it starts at `s_i` at `t0`, rises fast while many redundant weights remain and flattens as it reaches `s_f` at
    `t0 + n * dt`. Between pruning steps the target stays at the last pruning step's value (the result is piecewise
    constant); before `t0` it is 0 (nothing pruned yet); after the last pruning step it is `s_f`.

    Args:
        step: The training step (optimizer updates so far, `TrainerState.global_step`).
        final_sparsity: `s_f`, the sparsity reached at the last pruning step, in [0, 1].
        initial_sparsity: `s_i`, the sparsity applied at the first pruning step, in [0, final_sparsity].
        begin_step: `t0`, the first pruning step (>= 0).
        num_pruning_steps: `n`, the number of pruning steps after the first one (>= 1).
        frequency: `dt`, the steps between two pruning steps (>= 1).

    Returns:
        The target sparsity in [0, 1].

    Example:

    ```python
    >>> schedule = dict(final_sparsity=0.9, begin_step=100, num_pruning_steps=4, frequency=50)
    >>> [round(cubic_sparsity(t, **schedule), 4) for t in (99, 100, 150, 250, 400)]
    [0.0, 0.0, 0.5203, 0.8859, 0.9]
    ```
    """
    _check_schedule(final_sparsity, initial_sparsity, begin_step, num_pruning_steps, frequency)
    if step < begin_step:
        return 0.0
    k = min((step - begin_step) // frequency, num_pruning_steps)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - k / num_pruning_steps) ** 3


def _check_schedule(
    final_sparsity: float, initial_sparsity: float, begin_step: int, num_pruning_steps: int, frequency: int
) -> None:
    if not 0.0 <= final_sparsity <= 1.0:
        raise ValueError(f"`final_sparsity` must be in [0, 1], got {final_sparsity!r}.")
    if not 0.0 <= initial_sparsity <= final_sparsity:
        raise ValueError(
            f"`initial_sparsity` must be in [0, final_sparsity={final_sparsity}], got {initial_sparsity!r}: the "
            "schedule only ever prunes more."
        )
    for name, value, minimum in (
        ("begin_step", begin_step, 0),
        ("num_pruning_steps", num_pruning_steps, 1),
        ("frequency", frequency, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True)
class CubicSparsitySchedule:
    """The arguments of `cubic_sparsity`, checked once, with the pruning steps spelled out.

    Args:
        final_sparsity: Sparsity reached at `end_step`, in [0, 1].
        initial_sparsity: Sparsity applied at `begin_step`, in [0, final_sparsity].
        begin_step: The first pruning step.
        num_pruning_steps: Pruning steps after the first one.
        frequency: Steps between two pruning steps.

    Example:

    ```python
    >>> schedule = CubicSparsitySchedule.from_step_range(0.8, begin_step=10, end_step=40, frequency=10)
    >>> [(step, round(schedule(step), 3)) for step in schedule.pruning_steps]
    [(10, 0.0), (20, 0.563), (30, 0.77), (40, 0.8)]
    ```
    """

    final_sparsity: float
    initial_sparsity: float = 0.0
    begin_step: int = 0
    num_pruning_steps: int = 1
    frequency: int = 1

    def __post_init__(self) -> None:
        _check_schedule(
            self.final_sparsity, self.initial_sparsity, self.begin_step, self.num_pruning_steps, self.frequency
        )

    @classmethod
    def from_step_range(
        cls, final_sparsity: float, begin_step: int, end_step: int, frequency: int, initial_sparsity: float = 0.0
    ) -> CubicSparsitySchedule:
        """Prune every `frequency` steps from `begin_step`, reaching `final_sparsity` at the last pruning step that
        is <= `end_step` (`end_step` itself when `end_step - begin_step` is a multiple of `frequency`)."""
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"`frequency` must be an integer >= 1, got {frequency!r}.")
        if end_step - begin_step < frequency:
            raise ValueError(
                f"Gradual pruning needs end_step - begin_step >= frequency, got begin_step={begin_step}, "
                f"end_step={end_step}, frequency={frequency}. Lower `frequency` or widen the step range."
            )
        return cls(final_sparsity, initial_sparsity, begin_step, (end_step - begin_step) // frequency, frequency)

    @property
    def end_step(self) -> int:
        """The last pruning step, where the target reaches `final_sparsity`."""
        return self.begin_step + self.num_pruning_steps * self.frequency

    @property
    def pruning_steps(self) -> list[int]:
        """Every step at which the target changes (and pruning should happen)."""
        return list(range(self.begin_step, self.end_step + 1, self.frequency))

    def is_pruning_step(self, step: int) -> bool:
        return self.begin_step <= step <= self.end_step and (step - self.begin_step) % self.frequency == 0

    def __call__(self, step: int) -> float:
        """The target sparsity at `step` (see `cubic_sparsity`)."""
        return cubic_sparsity(
            step, self.final_sparsity, self.initial_sparsity, self.begin_step, self.num_pruning_steps, self.frequency
        )


def resolve_step(value: float, max_steps: int) -> int:
    """A step given as `TrainingArguments.warmup_steps` gives it: a value >= 1 is a step, one below 1 a fraction of
    `max_steps` (rounded up)."""
    return int(value) if value >= 1 else math.ceil(max_steps * value)


def validate_step_range(begin_step: float, end_step: float, frequency: int) -> None:
    """Check the step arguments a gradual pruning callback takes, before training starts.

    Args:
        begin_step: First pruning step: a step (>= 1) or a fraction of training in [0, 1) (see `resolve_step`).
        end_step: Step at which pruning ends, in the same convention.
        frequency: Steps between two pruning steps, an integer >= 1.

    Raises:
        ValueError: Naming the first bad argument, its value and the valid range.

    Example:

    ```python
    >>> validate_step_range(begin_step=0.1, end_step=0.75, frequency=0)
    Traceback (most recent call last):
    ValueError: frequency=0 must be an integer >= 1 (steps between pruning steps).
    ```
    """
    for name, value in (("begin_step", begin_step), ("end_step", end_step)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name}={value!r} must be a step (>= 1) or a fraction of training in [0, 1).")
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
        raise ValueError(f"frequency={frequency!r} must be an integer >= 1 (steps between pruning steps).")
    # Two steps, or two fractions, compare now; a step against a fraction only once the training length is known.
    if (begin_step >= 1) == (end_step >= 1) and end_step <= begin_step:
        raise ValueError(
            f"end_step={end_step!r} must come after begin_step={begin_step!r}: pruning runs from begin_step to "
            "end_step."
        )


def resolve_step_range(begin_step: float, end_step: float, frequency: int, max_steps: int) -> tuple[int, int, int]:
    """Resolve a gradual pruning callback's step range against the training length, refusing a range that training
    cannot complete.

    Fractions are resolved against `max_steps` (see `resolve_step`), so they always fit; a step given as an absolute
    number can lie beyond the end of training, where pruning would silently stop short of its target (or never
    start). Both are errors here, raised when training begins and before any step runs.

    Args:
        begin_step: First pruning step, a step (>= 1) or a fraction of training in [0, 1).
        end_step: Step at which pruning ends, in the same convention.
        frequency: Steps between two pruning steps, as the user passed it.
        max_steps: The training steps (`TrainerState.max_steps`).

    Returns:
        `(begin, end, frequency)` in steps; `frequency` is lowered to `end - begin` when the range is shorter than it
        (pruning then happens once, at `end`).

    Raises:
        ValueError: Naming the values as passed, as resolved, and the fix.

    Example:

    ```python
    >>> resolve_step_range(0.1, 0.75, frequency=10, max_steps=400)
    (40, 300, 10)
    ```
    """
    begin, end = resolve_step(begin_step, max_steps), resolve_step(end_step, max_steps)
    if begin >= max_steps:
        raise ValueError(
            f"begin_step={begin_step!r} (step {begin}) is not before the end of training (max_steps={max_steps}): "
            f"nothing would be pruned. Pass a begin_step below {max_steps} (or a fraction of training, e.g. "
            "begin_step=0.1), or train for more steps."
        )
    if end > max_steps:
        raise ValueError(
            f"end_step={end_step!r} (step {end}) is beyond the end of training (max_steps={max_steps}): training "
            f"would stop before the pruning budget is reached. Pass an end_step <= {max_steps} (or a "
            "fraction of training, e.g. end_step=0.75, which leaves a quarter of training to recover), or train for "
            f"at least {end} steps."
        )
    if end <= begin:
        raise ValueError(
            f"end_step={end_step!r} (step {end}) must come after begin_step={begin_step!r} (step {begin}) with "
            f"max_steps={max_steps} (frequency={frequency}): widen the step range."
        )
    return begin, end, min(frequency, end - begin)
