"""Choose what to keep under a measured latency budget: one knapsack over the shape of every layer (ZipLM-style).

Latency is not a sum of per-unit costs: a layer's time is a measured, non-linear function of its head count and FFN
width (`LatencyTable.layer_latency`), part of it is only saved when the layer goes entirely, and some widths run
faster than narrower ones. So instead of ranking single units, the search picks one *shape* per layer:

- for layer `i`, every `(h, w)` with `h` of its heads (its `h` most important) and `w` of its neurons (its `w` most
  important), `w` one of the widths the table measured (`LatencyTable.candidate_widths`: multiples of `round_to`, and
  the layer's own width). Its value is the importance kept, its cost the table's time for that shape; `(0, 0)` costs
  nothing, as the layer is then removed (depth and width in one search). Shapes that cost at least as much as one
  that keeps more are dropped, which is how the table rounds widths: a width measured slower than a wider one is
  never chosen;
- a multiple-choice knapsack over the layers (dynamic programming on the budget cut into `BINS` steps, every cost
  rounded *up*, so the budget is never exceeded) maximises the importance kept, with at least one layer kept.

The budget is `keep` times the model's predicted latency (the table's `rest_ms` plus its layers), and the layers get
what the rest leaves. Scores must be on one scale across heads and neurons (Fisher scores are; `balance_kinds` puts
others on one with the table's mean cost per head and per neuron).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from .latency_table import LatencyTable

# Steps the layers' budget is cut into: each layer may lose at most one step of it to rounding.
BINS = 8192


class _Shape(NamedTuple):
    cost: float  # predicted ms of the layer in this shape (0 when it is removed)
    value: float  # importance of the units it keeps
    heads: int
    width: int
    stays: bool  # False: the layer is removed


def minimum_latency(
    table: LatencyTable,
    heads: Sequence[int],
    ffn: Sequence[int],
    dropped: Sequence[int] = (),
    uniform: bool = False,
    drop_empty_layers: bool = True,
) -> float:
    """The smallest predicted latency a search can reach from layers of `heads[i]` heads and `ffn[i]` neurons.

    With `drop_empty_layers`, all layers but one can go and that one can be emptied; without, every layer that is not
    in `dropped` stays (empty at best); with `uniform` they also keep all their heads.
    """
    live = [i for i in range(len(heads)) if i not in set(dropped)]
    if uniform:
        return table.rest_ms + sum(table.layer_latency(heads[i], 0) for i in live)
    if drop_empty_layers:
        return table.rest_ms + table.empty_layer_ms
    return table.rest_ms + len(live) * table.empty_layer_ms


def check_latency_budget(
    table: LatencyTable,
    heads: Sequence[int],
    ffn: Sequence[int],
    keep: float,
    reference_ms: float | None = None,
    dropped: Sequence[int] = (),
    uniform: bool = False,
    drop_empty_layers: bool = True,
) -> float:
    """The budget `keep * reference_ms` in milliseconds, once checked to be reachable.

    Args:
        table: The latency table.
        heads, ffn: Heads and neurons of each layer now.
        keep: Fraction of the reference latency to keep.
        reference_ms: The latency `keep` is a fraction of (unset: the model's now).
        dropped, uniform, drop_empty_layers: As for `minimum_latency`.

    Raises:
        ValueError: when the budget is below the smallest reachable latency, naming it and the smallest `keep`.
    """
    reference_ms = table.model_latency(heads, ffn) if reference_ms is None else reference_ms
    budget = keep * reference_ms
    minimum = minimum_latency(table, heads, ffn, dropped, uniform, drop_empty_layers)
    if budget < minimum * (1 - 1e-9):
        if uniform:
            floor = "every layer with all its heads and no FFN neurons"
        elif drop_empty_layers:
            floor = "one empty layer"
        else:
            floor = "every layer kept, empty"
        raise ValueError(
            f"keep={keep:g} asks for {budget:.2f} ms per call ({table.key.describe()}), but the fastest this model "
            f"can get is {minimum:.2f} ms: {table.rest_ms:.2f} ms outside the layers (embeddings, task head) and "
            f"{minimum - table.rest_ms:.2f} ms for {floor}. Use keep >= {minimum / reference_ms:.4f} "
            f"(a speed-up of at most {reference_ms / minimum:.2f}x)."
        )
    return budget


def select_latency(
    head_scores: list[torch.Tensor],
    ffn_scores: list[torch.Tensor],
    table: LatencyTable,
    keep: float,
    round_to: int = 1,
    dropped: Sequence[int] = (),
    uniform: bool = False,
    drop_empty_layers: bool = True,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Kept heads and neurons of every layer, and the removed layers, under `keep` of the predicted latency.

    Args:
        head_scores: Importance per layer, shape `(num_heads_in_layer,)`; higher is more important.
        ffn_scores: Importance per layer, shape `(ffn_neurons_in_layer,)`.
        table: The latency table of this model and setting.
        keep: Fraction of the model's predicted latency (with every layer, `dropped` ones included) to keep.
        round_to: Kept FFN widths are multiples of this (or the layer's width).
        dropped: Layers removed already; their time counts as saved.
        uniform: Keep every head and one FFN width in all remaining layers.
        drop_empty_layers: Remove a layer left with no heads and no neurons (saving its whole time); otherwise it
            stays, empty, and costs `table.empty_layer_ms`.

    Returns:
        `(heads, ffn, layers)`: ascending kept indices per layer (empty for removed layers) and the removed layers.

    Raises:
        ValueError: when the budget is below the smallest reachable latency.
    """
    num_layers = len(head_scores)
    counts = ([len(s) for s in head_scores], [len(s) for s in ffn_scores])
    dropped = sorted(set(dropped))
    live = [i for i in range(num_layers) if i not in dropped]
    budget = check_latency_budget(table, *counts, keep, None, dropped, uniform, drop_empty_layers)
    if keep >= 1:  # nothing to remove (and no rounding of the budget to remove something anyway)
        shapes = {i: (counts[0][i], counts[1][i], True) for i in live}
    elif uniform:
        shapes = _uniform_shapes(table, counts, live, round_to, budget)
    else:
        options = [_layer_options(head_scores[i], ffn_scores[i], table, round_to, drop_empty_layers) for i in live]
        chosen = _knapsack(options, budget - table.rest_ms)
        shapes = {i: (shape.heads, shape.width, shape.stays) for i, shape in zip(live, chosen, strict=True)}
    heads: list[list[int]] = [[] for _ in range(num_layers)]
    ffn: list[list[int]] = [[] for _ in range(num_layers)]
    removed = list(dropped)
    for layer, (h, w, stays) in shapes.items():
        if not stays:
            removed.append(layer)
            continue
        heads[layer] = _top_k(head_scores[layer], h)
        ffn[layer] = _top_k(ffn_scores[layer], w)
    return heads, ffn, sorted(removed)


def _top_k(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(scores.double().argsort(descending=True, stable=True)[:k].tolist())


def _uniform_shapes(
    table: LatencyTable, counts: tuple[list[int], list[int]], live: list[int], round_to: int, budget: float
) -> dict[int, tuple[int, int, bool]]:
    """All heads and the widest measured width that fits, the same in every live layer."""
    heads, ffn = counts
    limit = min(ffn[i] for i in live)
    for width in reversed(table.candidate_widths(limit, round_to)):
        if table.rest_ms + sum(table.layer_latency(heads[i], width) for i in live) <= budget:
            return {i: (heads[i], width, True) for i in live}
    return {i: (heads[i], 0, True) for i in live}  # unreachable: check_latency_budget admits width 0


def _layer_options(
    head_scores: torch.Tensor, ffn_scores: torch.Tensor, table: LatencyTable, round_to: int, drop_empty: bool
) -> list[_Shape]:
    """Every shape worth considering for one layer, by increasing cost.

    A shape is left out when another costs no more and keeps at least as much importance.
    """
    head_prefix = torch.cat([torch.zeros(1), head_scores.double().sort(descending=True).values.cumsum(0)]).tolist()
    ffn_prefix = torch.cat([torch.zeros(1), ffn_scores.double().sort(descending=True).values.cumsum(0)]).tolist()
    widths = table.candidate_widths(len(ffn_scores), round_to)
    shapes = [
        _Shape(table.layer_latency(h, w), head_prefix[h] + ffn_prefix[w], h, w, True)
        for h in range(len(head_scores) + 1)
        for w in widths
    ]
    shapes.sort(key=lambda shape: (shape.cost, -shape.value))
    frontier, best = [], -math.inf
    for shape in shapes:
        if shape.value > best:
            frontier.append(shape)
            best = shape.value
    # Removing the layer costs nothing; the empty layer that stays is still an option (one layer must stay).
    return [_Shape(0.0, 0.0, 0, 0, False), *frontier] if drop_empty else frontier


def _knapsack(options: list[list[_Shape]], capacity: float) -> list[_Shape]:
    """One shape per layer, the most importance in all within `capacity` ms, at least one layer kept.

    `value[kept][c]` is the most importance with discretised cost exactly `c`, `kept` whether a layer stays so far.
    """
    unit = max(capacity, 1e-12) / BINS
    value = np.full((2, BINS + 1), -np.inf)
    value[0, 0] = 0.0
    choices = []  # per layer: (option, previous kept flag) for every state
    for layer_options in options:
        new = np.full((2, BINS + 1), -np.inf)
        option_of = np.full((2, BINS + 1), -1, dtype=np.int32)
        came_from = np.zeros((2, BINS + 1), dtype=np.int8)
        for index, shape in enumerate(layer_options):
            steps = _steps(shape.cost, unit)
            if steps > BINS:
                break  # options are by increasing cost
            kept = int(shape.stays)
            for flag in (0, 1):
                candidate = value[flag, : BINS + 1 - steps] + shape.value
                target = new[flag | kept, steps:]
                better = candidate > target
                target[better] = candidate[better]
                option_of[flag | kept, steps:][better] = index
                came_from[flag | kept, steps:][better] = flag
        value = new
        choices.append((option_of, came_from))
    if not np.isfinite(value[1]).any():
        raise ValueError(
            "No shape of the layers fits the latency budget; raise keep (check_latency_budget names the smallest)."
        )
    steps_used = int(np.argmax(value[1]))  # the most importance; on a tie, the fastest
    flag, shapes = 1, []
    for layer_options, (option_of, came_from) in zip(reversed(options), reversed(choices), strict=True):
        shape = layer_options[int(option_of[flag, steps_used])]
        shapes.append(shape)
        flag, steps_used = int(came_from[flag, steps_used]), steps_used - _steps(shape.cost, unit)
    return shapes[::-1]


def _steps(cost: float, unit: float) -> int:
    """`cost` in budget steps, rounded up, so the discretised costs' sum bounds the real one: the budget holds."""
    return math.ceil(cost / unit - 1e-9) if cost > 0 else 0
