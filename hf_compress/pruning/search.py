"""Choose which heads and FFN neurons to keep under a FLOPs / parameter / latency budget or explicit fractions kept.

The cost model counts, per token, what removing a unit saves (a multiply-add is 2 FLOPs), with hidden size `D`,
head dimension `d` and sequence length `S`:

- one attention head: q, k, v and output projections `8 * D * d` FLOPs plus the attention scores and their weighted
  sum `4 * S * d` FLOPs; `4 * D * d + 3 * d` parameters (weights and q/k/v biases);
- one FFN neuron: up and down projections `4 * D` FLOPs; `2 * D + 1` parameters.

For a budget the search follows Kwon et al. 2022: heads and neurons are ranked by importance, and for every number of
kept heads `h` the remaining budget is filled with the most important neurons; the `h` whose kept units have the
largest total importance wins, and any unit that still fits is added greedily. With `round_to > 1`, neurons are
taken in blocks of `round_to` (a layer's least important neurons form a smaller last block), so kept widths are
multiples of `round_to` or unchanged.

A latency budget (`target="latency"`) is not a sum of per-unit costs; `select_units` hands it to
`hf_compress.pruning.latency_search`, which picks one shape per layer from a measured latency table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from ..architectures import get_spec
from ..structure import ModelStructure
from .config import PruningConfig
from .latency_search import select_latency

if TYPE_CHECKING:
    from .latency_table import LatencyTable

# Scores whose heads and neurons are not on one scale (see `balance_kinds`); Fisher scores estimate the loss increase
# of removing a unit and are compared as they are.
BALANCED_METHODS = ("magnitude", "taylor")


@dataclass(frozen=True)
class UnitCosts:
    """What one attention head and one FFN neuron cost (FLOPs per token or parameters)."""

    head: float
    neuron: float


def unit_costs(model: PreTrainedModel, target: str = "flops", seq_len: int = 128) -> UnitCosts:
    """Cost of one head and one neuron of `model`: FLOPs per token at `seq_len` (`target="flops"`) or parameters."""
    spec = get_spec(model)
    hidden, head_dim = spec.hidden_size(model.config), spec.head_dim(model.config)
    if target == "params":
        return UnitCosts(head=4 * hidden * head_dim + 3 * head_dim, neuron=2 * hidden + 1)
    return UnitCosts(head=8 * hidden * head_dim + 4 * seq_len * head_dim, neuron=4 * hidden)


def structure_cost(heads: list[int], ffn: list[int], costs: UnitCosts) -> float:
    """Total prunable cost of layers with `heads[i]` heads and `ffn[i]` neurons."""
    return sum(h * costs.head + f * costs.neuron for h, f in zip(heads, ffn, strict=True))


def balance_kinds(
    head_scores: list[torch.Tensor], ffn_scores: list[torch.Tensor], costs: UnitCosts
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Put head and neuron scores that share no scale (weight norms) on one.

    Each kind is scaled so that its mean importance per unit of cost is 1: neither kind is cheaper to remove as a
    whole, and the search trades heads against neurons by how they rank within their kind.
    """
    heads, ffn = torch.cat(head_scores).double(), torch.cat(ffn_scores).double()
    head_scale = costs.head / heads.mean().clamp(min=1e-30) if heads.numel() else 1.0
    ffn_scale = costs.neuron / ffn.mean().clamp(min=1e-30) if ffn.numel() else 1.0
    return [s.double() * head_scale for s in head_scores], [s.double() * ffn_scale for s in ffn_scores]


def round_width(width: float, round_to: int, limit: int, *, down: bool = False) -> int:
    """An FFN width rounded to a multiple of `round_to`, no wider than `limit` (rounded down to a multiple).

    The one rounding of FFN widths: `round_ffn_plan` rounds to the nearest multiple, the budgeted search down (it
    meets budgets from below). Callers keep a layer that loses nothing at its width instead of rounding it.

    Args:
        width: The width to round (a mean width may be fractional).
        round_to: The multiple (1: no rounding).
        limit: The widest the result may be (e.g. the layer's current width).
        down: Round down instead of to the nearest multiple.

    Returns:
        A multiple of `round_to`, between 0 and `limit`.

    Example:
    ```python
    >>> round_width(37.5, 8, 64), round_width(37.5, 8, 64, down=True), round_width(70, 8, 64)
    (40, 32, 64)
    ```
    """
    multiples = int(width // round_to) if down else int(width / round_to + 0.5)
    return min(multiples * round_to, limit // round_to * round_to)


@dataclass
class Selection:
    """Kept units: ascending head / neuron indices per layer (empty lists for removed layers), and removed layers."""

    heads: list[list[int]]
    ffn: list[list[int]]
    layers: list[int]

    def removed(self, structure: ModelStructure) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
        """What this selection removes from a model of `structure`: `(heads, ffn)`, each layer -> sorted indices.

        Only layers that stay and lose at least one unit are listed (removed layers go whole), so the result is what
        `prune_heads` and `prune_ffn_neurons` take.
        """
        dropped = set(self.layers)

        def removed(kept: list[list[int]], counts: tuple[int, ...]) -> dict[int, list[int]]:
            gone = {i: sorted(set(range(n)) - set(kept[i])) for i, n in enumerate(counts) if i not in dropped}
            return {layer: indices for layer, indices in gone.items() if indices}

        return removed(self.heads, structure.heads), removed(self.ffn, structure.ffn)


@dataclass
class _Item:
    layer: int
    kind: str  # "heads" or "ffn"
    indices: list[int]
    score: float
    cost: float

    @property
    def density(self) -> float:
        return self.score / self.cost


def _ffn_blocks(layer: int, scores: torch.Tensor, round_to: int, neuron_cost: float) -> list[_Item]:
    """A layer's neurons in blocks of `round_to`, most important first; the last block holds the remainder."""
    order = scores.double().argsort(descending=True, stable=True).tolist()
    blocks, density_cap = [], float("inf")
    for start in range(0, len(order), round_to):
        indices = order[start : start + round_to]
        score = float(scores.double()[indices].sum())
        # Every neuron of a block scores at least as high as any of the next, so densities cannot increase; clamp the
        # float rounding that could break this, as the greedy steps below rely on it to take blocks in order.
        score = min(score, density_cap * len(indices))
        density_cap = score / len(indices)
        blocks.append(_Item(layer, "ffn", indices, score, len(indices) * neuron_cost))
    return blocks


def _knapsack(heads: list[_Item], blocks: list[list[_Item]], budget: float) -> list[_Item]:
    """Kwon et al.'s search: best number of kept heads, the rest of the budget filled with neuron blocks."""
    heads = sorted(heads, key=lambda item: -item.score)
    flat = sorted(
        (block for layer_blocks in blocks for block in layer_blocks),
        key=lambda item: -item.density,
    )
    head_cost = heads[0].cost if heads else 0.0
    head_prefix = torch.tensor([0.0] + [item.score for item in heads], dtype=torch.float64).cumsum(0)
    block_cost = torch.tensor([item.cost for item in flat], dtype=torch.float64).cumsum(0)
    block_prefix = torch.tensor([0.0] + [item.score for item in flat], dtype=torch.float64).cumsum(0)
    num_heads = torch.arange(len(heads) + 1, dtype=torch.float64)
    remaining = budget - num_heads * head_cost
    feasible = remaining >= 0
    num_blocks = torch.searchsorted(block_cost, remaining.clamp(min=0), right=True)
    value = torch.where(feasible, head_prefix + block_prefix[num_blocks], torch.tensor(-1.0, dtype=torch.float64))
    # Among equally important choices prefer the one that uses more of the budget.
    used = num_heads * head_cost + torch.cat([torch.zeros(1, dtype=torch.float64), block_cost])[num_blocks]
    best = _argmax_tiebreak(value, used)  # keeping no head is always feasible, as budgets are >= 0
    kept = heads[:best] + flat[: int(num_blocks[best])]
    return _top_up(kept, heads[best:], flat[int(num_blocks[best]) :], budget - float(used[best]))


def _argmax_tiebreak(value: torch.Tensor, used: torch.Tensor) -> int:
    top = value.max()
    candidates = torch.nonzero(value >= top - 1e-12 * top.abs()).flatten()
    return int(candidates[used[candidates].argmax()])


def _top_up(kept: list[_Item], heads: list[_Item], blocks: list[_Item], slack: float) -> list[_Item]:
    """Add the densest remaining units that still fit; neuron blocks of a layer only in their order."""
    next_block: dict[int, list[_Item]] = {}
    for block in blocks:
        next_block.setdefault(block.layer, []).append(block)
    while True:
        candidates = [heads[0]] if heads else []
        candidates += [queue[0] for queue in next_block.values() if queue]
        candidates = [item for item in candidates if item.cost <= slack]
        if not candidates:
            return kept
        item = max(candidates, key=lambda c: c.density)
        kept.append(item)
        slack -= item.cost
        if item.kind == "heads":
            heads.pop(0)
        else:
            next_block[item.layer].pop(0)


def _from_items(items: list[_Item], num_layers: int, dropped: list[int]) -> Selection:
    heads: list[list[int]] = [[] for _ in range(num_layers)]
    ffn: list[list[int]] = [[] for _ in range(num_layers)]
    for item in items:
        (heads if item.kind == "heads" else ffn)[item.layer].extend(item.indices)
    return Selection([sorted(h) for h in heads], [sorted(f) for f in ffn], sorted(dropped))


def _top_k(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(scores.double().argsort(descending=True, stable=True)[:k].tolist())


def select_units(
    head_scores: list[torch.Tensor],
    ffn_scores: list[torch.Tensor],
    config: PruningConfig,
    costs: UnitCosts,
    dropped: list[int] | None = None,
    keep: float | None = None,
    head_keep: float | None = None,
    ffn_keep: float | None = None,
    latency_table: LatencyTable | None = None,
    drop_empty_layers: bool = True,
) -> Selection:
    """Choose the heads and neurons to keep so the model meets `config`'s budget (or fractions kept).

    Args:
        head_scores: Importance per layer, shape `(num_heads_in_layer,)`; higher is more important.
        ffn_scores: Importance per layer, shape `(ffn_neurons_in_layer,)`.
        config: The budget (`target`, `keep`, `head_keep` / `ffn_keep`, `scope`, `uniform`, `round_to`).
        costs: Cost of one head and one neuron (`unit_costs`; for `target="latency"`, `latency_table.unit_costs()`,
            which the search itself does not use).
        dropped: Layers removed entirely; their cost counts as saved.
        keep: Overrides `config.keep` (the gradual pruning callback walks it down a schedule).
        head_keep: Overrides `config.head_keep` with `target="ratios"` (likewise); 1 keeps every head.
        ffn_keep: Overrides `config.ffn_keep` with `target="ratios"` (likewise); 1 keeps every neuron.
        latency_table: With `target="latency"`: the model's `LatencyTable` (required), whose predicted latency of
            the whole model `keep` is a fraction of (see `hf_compress.pruning.latency_search`).
        drop_empty_layers: With `target="latency"`: a layer left with no heads and no neurons is removed (listed in
            `Selection.layers`), saving its whole time; `False` keeps it, empty (the gradual callback).

    Returns:
        The `Selection` of kept units.

    Raises:
        ValueError: when `uniform=True` and keeping every head already exceeds the budget, when a latency budget is
            below the smallest reachable latency, or for `target="latency"` without a latency table.
    """
    dropped = sorted(dropped or [])
    keep = config.keep if keep is None else keep
    if config.target == "latency":
        if latency_table is None:
            raise ValueError(
                "target='latency' needs the model's latency table: pass latency_table=... (from "
                "hf_compress.pruning.latency_table.latency_table_for or measure_latency_table)."
            )
        heads, ffn, layers = select_latency(
            head_scores,
            ffn_scores,
            latency_table,
            keep,
            config.round_to,
            dropped,
            config.uniform,
            drop_empty_layers,
        )
        return Selection(heads, ffn, layers)
    num_layers = len(head_scores)
    live = [i for i in range(num_layers) if i not in dropped]
    heads = [
        [_Item(i, "heads", [h], float(s), costs.head) for h, s in enumerate(head_scores[i].tolist())] for i in live
    ]
    blocks = [_ffn_blocks(i, ffn_scores[i], config.round_to, costs.neuron) for i in live]
    total = structure_cost([len(s) for s in head_scores], [len(s) for s in ffn_scores], costs)

    head_keep = _or_all(config.head_keep if head_keep is None else head_keep)
    ffn_keep = _or_all(config.ffn_keep if ffn_keep is None else ffn_keep)
    if config.uniform:
        return _select_uniform(head_scores, ffn_scores, config, costs, live, dropped, keep * total, ffn_keep)
    if config.target == "ratios":
        return _select_ratios(heads, blocks, config.scope, head_keep, ffn_keep, num_layers, dropped)

    if config.scope == "layer":
        items: list[_Item] = []
        for layer_heads, layer_blocks in zip(heads, blocks, strict=True):
            layer_cost = sum(item.cost for item in layer_heads) + sum(item.cost for item in layer_blocks)
            items += _knapsack(layer_heads, [layer_blocks], keep * layer_cost)
        return _from_items(items, num_layers, dropped)
    return _from_items(_knapsack([h for layer in heads for h in layer], blocks, keep * total), num_layers, dropped)


def _or_all(fraction: float | None) -> float:
    """A fraction of units kept; unset means all of them."""
    return 1.0 if fraction is None else fraction


def _select_ratios(
    heads: list[list[_Item]],
    blocks: list[list[_Item]],
    scope: str,
    head_keep: float,
    ffn_keep: float,
    num_layers: int,
    dropped: list[int],
) -> Selection:
    if scope == "layer":
        groups = [(layer_heads, [layer_blocks]) for layer_heads, layer_blocks in zip(heads, blocks, strict=True)]
    else:
        groups = [([item for layer_heads in heads for item in layer_heads], blocks)]
    kept: list[_Item] = []
    for group_heads, group_blocks in groups:
        ranked = sorted(group_heads, key=lambda item: -item.score)
        # Counts removed are rounded (not counts kept), as when these were fractions removed: the same units go.
        kept += ranked[: len(ranked) - round((1 - head_keep) * len(ranked))]
        num_neurons = sum(len(block.indices) for layer_blocks in group_blocks for block in layer_blocks)
        kept += _remove_blocks(group_blocks, round((1 - ffn_keep) * num_neurons))
    return _from_items(kept, num_layers, dropped)


def _remove_blocks(blocks: list[list[_Item]], count: int) -> list[_Item]:
    """Remove up to `count` neurons, always the least dense block at the unimportant end of some layer."""
    queues = [list(layer_blocks) for layer_blocks in blocks]
    while True:
        tails = [queue for queue in queues if queue and len(queue[-1].indices) <= count]
        if not tails:
            return [block for queue in queues for block in queue]
        queue = min(tails, key=lambda q: q[-1].density)
        count -= len(queue.pop().indices)


def _select_uniform(
    head_scores: list[torch.Tensor],
    ffn_scores: list[torch.Tensor],
    config: PruningConfig,
    costs: UnitCosts,
    live: list[int],
    dropped: list[int],
    budget: float,
    ffn_keep: float,
) -> Selection:
    """Every head kept; the same FFN width (a multiple of `round_to`) in every remaining layer."""
    num_layers = len(head_scores)
    min_width = min((len(ffn_scores[i]) for i in live), default=0)
    if config.target == "ratios":
        width = round(ffn_keep * min_width)
    else:
        head_cost = sum(len(head_scores[i]) for i in live) * costs.head
        if live and head_cost > budget:
            raise ValueError(
                f"uniform=True keeps every attention head, which alone costs {head_cost:.4g} but the budget is "
                f"{budget:.4g} (keep={config.keep}). Lower the cost with `layers`, raise keep, or set uniform=False."
            )
        width = int((budget - head_cost) // (costs.neuron * max(len(live), 1)))
    width = min(width, min_width)
    if width < min_width:  # a width that loses nothing is kept as it is
        width = round_width(width, config.round_to, min_width, down=True)
    heads = [list(range(len(head_scores[i]))) if i in live else [] for i in range(num_layers)]
    ffn = [_top_k(ffn_scores[i], width) if i in live else [] for i in range(num_layers)]
    return Selection(heads, ffn, dropped)
