"""`prune`: one call from a budget to a smaller dense model, and the JSON plan that replays it on another copy.

```python
from hf_compress import PruningConfig, prune

report = prune(model, PruningConfig(target="flops", keep=0.6, importance="fisher"), dataloader=calibration)
print(report)
# Three times faster on this machine at batch 32 x 128 and 2 threads (the table is measured once, then reused):
config = PruningConfig(target="latency", keep=1 / 3, latency_threads=2, latency_table="latency_table.json")
report = prune(model, config, dataloader=calibration)
```

The steps: with `target="latency"`, read or measure the latency table and refuse a budget below the fastest
reachable model (`latency_table.py`, `latency_search.py`); remove the layers `config.layers` asks for, score every
head and FFN neuron on the calibration batches
(`importance.py`), choose what to keep under the budget (`search.py`), fit least-squares scales of the kept units
so each layer reproduces the unpruned model's output (`rescale.py`), and finally apply the plan with the structured
pruning functions, folding the scales into the output projections. Everything before the last step only reads the
model, so a call that fails leaves it as it was.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from ..architectures import get_layers, get_spec
from ..report import CompressionReport, ModelSummary, summarize
from ..structure import ModelStructure, get_structure
from .calibration import prepare_batch
from .config import PruningConfig
from .importance import ImportanceScores, compute_importance, compute_layer_importance
from .latency_search import check_latency_budget
from .latency_table import LatencyTable, latency_table_for
from .rescale import fit_rescale
from .search import BALANCED_METHODS, Selection, balance_kinds, select_units, unit_costs
from .structured import drop_layers, prune_ffn_neurons, prune_heads

logger = logging.get_logger(__name__)

PLAN_FORMAT = "hf-compress-pruning-plan"
PLAN_VERSION = 1


@dataclass
class PruningReport:
    """What `prune` did.

    Args:
        plan: The JSON-serialisable plan; `apply_plan(fresh_copy, report.plan)` gives identical weights.
        removed_heads: Layer index -> removed head indices (layer and head indices of the model before pruning).
        removed_ffn: Layer index -> removed FFN neuron indices.
        removed_layers: Indices of the removed layers.
        before: Size and FLOPs per token of the model before pruning (`hf_compress.report.ModelSummary`).
        after: The same after pruning.
        config: The `PruningConfig` used.
        seconds: Wall time of the call.
        scores: The importance scores used (not part of `to_dict`; save them with `scores.save`).
        latency: With `target="latency"`: the predicted milliseconds per call `before` and `after`, the `budget`,
            the `predicted_speedup`, and the table's `key` (`None` for other targets).
        latency_table: With `target="latency"`: the `LatencyTable` used (not part of `to_dict`; save it with
            `report.latency_table.save(folder / "latency_table.json")` to reuse it).
    """

    plan: dict[str, Any]
    removed_heads: dict[int, list[int]]
    removed_ffn: dict[int, list[int]]
    removed_layers: list[int]
    before: ModelSummary
    after: ModelSummary
    config: PruningConfig
    seconds: float
    scores: ImportanceScores | None = field(default=None, repr=False)
    latency: dict[str, Any] | None = None
    latency_table: LatencyTable | None = field(default=None, repr=False)

    @property
    def flops_ratio(self) -> float:
        """Encoder FLOPs per token after / before (at `config.seq_len`)."""
        return self.after.flops_per_token / self.before.flops_per_token

    @property
    def params_ratio(self) -> float:
        """All parameters (embeddings and task head included) after / before."""
        return self.after.parameters / self.before.parameters

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serialisable data (with a `"latency"` entry for `target="latency"`)."""
        latency = {} if self.latency is None else {"latency": self.latency}
        return {
            **latency,
            "config": self.config.to_dict(),
            "seconds": round(self.seconds, 3),
            "removed": {
                "heads": {str(k): v for k, v in self.removed_heads.items()},
                "ffn_neurons": {str(k): len(v) for k, v in self.removed_ffn.items()},
                "layers": self.removed_layers,
            },
            "before": _summary_dict(self.before),
            "after": _summary_dict(self.after),
            "flops_ratio": self.flops_ratio,
            "params_ratio": self.params_ratio,
            "plan": self.plan,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write `to_dict()` as indented JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    def __str__(self) -> str:
        return "\n".join([self.summary(), "", str(CompressionReport(self.after, self.before, self.config.seq_len))])

    def summary(self) -> str:
        """One line: what was removed, the FLOPs ratio and the time taken."""
        layers = f" {self.removed_layers}" if self.removed_layers else ""
        latency = ""
        if self.latency is not None:
            latency = (
                f", predicted latency {self.latency['before_ms']:.1f} -> {self.latency['after_ms']:.1f} ms "
                f"({self.latency['predicted_speedup']:.2f}x faster)"
            )
        return (
            f"Removed {sum(map(len, self.removed_heads.values()))} heads, "
            f"{sum(map(len, self.removed_ffn.values()))} FFN neurons and {len(self.removed_layers)} layers{layers}: "
            f"{self.flops_ratio:.1%} of the encoder FLOPs remain{latency} ({self.seconds:.1f}s)."
        )


def _summary_dict(summary: ModelSummary) -> dict[str, Any]:
    # JSON has no tuples: lists, so that the dict equals what reading the saved report back gives.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in summary.to_dict().items()}


def save_plan(plan: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a pruning plan as indented JSON (see `apply_plan`)."""
    with open(path, "w") as f:
        json.dump(plan, f, indent=2, sort_keys=True)


def load_plan(path: str | os.PathLike) -> dict[str, Any]:
    """Read a pruning plan written by `save_plan` (or `hf-compress prune`)."""
    with open(path) as f:
        plan = json.load(f)
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"{path} is not an hf-compress pruning plan (no 'format': '{PLAN_FORMAT}').")
    return plan


def make_plan(
    model: PreTrainedModel,
    selection: Selection,
    head_scales: list[list[float] | None] | None = None,
    ffn_scales: list[list[float] | None] | None = None,
) -> dict[str, Any]:
    """The JSON plan that turns `model` into its `selection` (and folds in the scales, if any).

    Indices are those of `model` as it is; heads and neurons of removed layers are not listed (the layer goes).
    """
    structure = get_structure(model)
    dropped = set(selection.layers)
    live = [i for i in range(structure.num_layers) if i not in dropped]
    remove_heads, remove_ffn = selection.removed(structure)

    def scales(values: list[list[float] | None] | None) -> dict[str, list[float]]:
        return {str(i): values[i] for i in live if values is not None and values[i] is not None}

    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "model_type": model.config.model_type,
        "structure": {"heads": list(structure.heads), "ffn": list(structure.ffn)},
        "remove": {  # JSON object keys are strings
            "heads": {str(layer): indices for layer, indices in remove_heads.items()},
            "ffn": {str(layer): indices for layer, indices in remove_ffn.items()},
            "layers": sorted(dropped),
        },
        "scales": {"heads": scales(head_scales), "ffn": scales(ffn_scales)},
    }


# (path of keys, type) of every field of a plan that `_check_plan` reads.
_PLAN_FIELDS = (
    (("model_type",), str),
    (("structure", "heads"), list),
    (("structure", "ffn"), list),
    (("remove", "heads"), Mapping),
    (("remove", "ffn"), Mapping),
    (("remove", "layers"), list),
    (("scales", "heads"), Mapping),
    (("scales", "ffn"), Mapping),
)
_KIND_NAMES = {str: "string", list: "list", Mapping: "dict (JSON object)"}


def _int_keys(mapping: Mapping[str, Any], what: str, num_layers: int) -> dict[int, Any]:
    result = {}
    for key, value in mapping.items():
        if not str(key).isdigit() or not 0 <= int(key) < num_layers:
            raise ValueError(f"The plan's {what} names layer {key!r}; valid layers are 0..{num_layers - 1}.")
        result[int(key)] = value
    return result


def _check_plan(model: PreTrainedModel, plan: Mapping[str, Any]):
    """Validate the whole plan against `model` before anything is changed; return it with integer layer keys."""
    if not isinstance(plan, Mapping):
        raise ValueError(f"A pruning plan is a dict (a JSON object), not {type(plan).__name__}.")
    if plan.get("format") != PLAN_FORMAT or plan.get("version") != PLAN_VERSION:
        raise ValueError(
            f"Not an hf-compress pruning plan of version {PLAN_VERSION} (format={plan.get('format')!r}, "
            f"version={plan.get('version')!r}); make one with `prune` or `make_plan`."
        )
    for keys, kind in _PLAN_FIELDS:
        value = plan
        for key in keys:
            value = value.get(key) if isinstance(value, Mapping) else None
        if not isinstance(value, kind):
            raise ValueError(
                f"The plan's {'.'.join(keys)} is missing or not a {_KIND_NAMES[kind]}; the plan is damaged. Make it "
                "again with `prune` or `make_plan`."
            )
    structure = get_structure(model)
    expected = {"heads": list(structure.heads), "ffn": list(structure.ffn)}
    if plan["model_type"] != model.config.model_type or plan["structure"] != expected:
        raise ValueError(
            f"The plan was made for a {plan['model_type']} model with heads {plan['structure']['heads']} and FFN "
            f"widths {plan['structure']['ffn']} per layer, but this {model.config.model_type} model has heads "
            f"{expected['heads']} and FFN widths {expected['ffn']}. Apply it to a copy of the model it was made for."
        )
    num_layers = structure.num_layers
    remove = {kind: _int_keys(plan["remove"][kind], f"remove.{kind}", num_layers) for kind in ("heads", "ffn")}
    scales = {kind: _int_keys(plan["scales"][kind], f"scales.{kind}", num_layers) for kind in ("heads", "ffn")}
    counts = {"heads": structure.heads, "ffn": structure.ffn}
    for kind in ("heads", "ffn"):
        for layer, indices in remove[kind].items():
            if (
                not isinstance(indices, (list, tuple))
                or len(set(indices)) != len(indices)
                or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < counts[kind][layer] for i in indices
                )
            ):
                raise ValueError(
                    f"The plan removes {kind} {indices} from layer {layer}, which has {counts[kind][layer]} "
                    f"(valid indices 0..{counts[kind][layer] - 1}, each once)."
                )
        for layer, values in scales[kind].items():
            kept = counts[kind][layer] - len(remove[kind].get(layer, []))
            if not isinstance(values, (list, tuple)) or not all(
                isinstance(v, Real) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(
                    f"The plan's {kind} scales for layer {layer} must be a list of numbers, not {values!r}."
                )
            if len(values) != kept:
                raise ValueError(
                    f"The plan has {len(values)} {kind} scales for layer {layer}, which keeps {kept}; one per kept unit."
                )
    layers = plan["remove"]["layers"]
    if len(set(layers)) != len(layers) or not all(isinstance(i, int) and 0 <= i < num_layers for i in layers):
        raise ValueError(f"The plan removes layers {layers}; valid layers are 0..{num_layers - 1}, each once.")
    if len(layers) == num_layers:
        raise ValueError(f"The plan removes all {num_layers} layers; at least one must stay.")
    return remove, scales, layers


def apply_plan(model: PreTrainedModel, plan: Mapping[str, Any] | str | os.PathLike) -> None:
    """Apply a pruning plan (from `prune`'s report, or a JSON file) to `model`, in place.

    Applying the plan of `prune(model_a, ...)` to an unmodified copy `model_b` of `model_a` gives weights identical to
    `model_a`'s after `prune`.

    Args:
        model: A model with exactly the structure the plan was made for.
        plan: The plan dict (`report.plan`) or the path of its JSON file.

    Raises:
        ValueError: when the plan is malformed or made for another structure; the model is then left untouched.

    Example:
    ```python
    report = prune(model, PruningConfig(keep=0.6), dataloader=calibration)
    save_plan(report.plan, "plan.json")
    apply_plan(AutoModelForSequenceClassification.from_pretrained(checkpoint), "plan.json")
    ```
    """
    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(plan)
    remove, scales, dropped = _check_plan(model, plan)
    spec = get_spec(model)
    head_dim = get_structure(model).head_dim
    prune_heads(model, remove["heads"])
    prune_ffn_neurons(model, remove["ffn"])
    layers = get_layers(model)
    with torch.no_grad():
        for kind, path, unit in (("heads", spec.attention_output, head_dim), ("ffn", spec.ffn_out, 1)):
            for layer, values in scales[kind].items():
                weight = layers[layer].get_submodule(path).weight  # (hidden, kept units * unit)
                factors = torch.tensor(values, dtype=torch.float32).repeat_interleave(unit)
                weight.mul_(factors.to(device=weight.device, dtype=weight.dtype))
    if dropped:
        drop_layers(model, dropped)


def _drop_candidates(model: PreTrainedModel, config: PruningConfig, batches: list[dict], show_progress: bool):
    num_layers = get_structure(model).num_layers
    if config.layers is None or config.layers == 0:
        return []
    if isinstance(config.layers, int):
        if config.layers >= num_layers:
            raise ValueError(f"layers={config.layers} would remove every layer of this {num_layers}-layer model.")
        scores = compute_layer_importance(model, batches, config.layer_importance, show_progress=show_progress)
        return sorted(scores.argsort()[: config.layers].tolist())
    if config.layers[-1] >= num_layers or len(config.layers) >= num_layers:
        raise ValueError(
            f"layers={config.layers}: this model has {num_layers} layers (indices 0..{num_layers - 1}); at least one "
            "must stay."
        )
    return list(config.layers)


def _check_scores(scores: ImportanceScores, model: PreTrainedModel) -> None:
    structure = get_structure(model)
    shapes = ([len(t) for t in scores.heads], [len(t) for t in scores.ffn])
    if shapes != (list(structure.heads), list(structure.ffn)):
        raise ValueError(
            f"The scores are for heads {shapes[0]} and FFN widths {shapes[1]} per layer, but the model has "
            f"{list(structure.heads)} and {list(structure.ffn)}; score this model with `compute_importance`."
        )


def prune(
    model: PreTrainedModel,
    config: PruningConfig | None = None,
    dataloader: Iterable[Mapping] | None = None,
    scores: ImportanceScores | None = None,
    show_progress: bool = True,
) -> PruningReport:
    """Prune `model` in place to the budget of `config`, choosing what to remove from its calibration data.

    Args:
        model: A model of a registered architecture, possibly already pruned.
        config: The budget and method (`PruningConfig()` keeps 60% of the encoder FLOPs with Fisher scores and
            least-squares rescaling).
        dataloader: Calibration batches (dicts of model inputs; `labels` optional, see `compute_importance`). Needed
            unless `importance="magnitude"` (or `scores` are given), `rescale=False` and `layers` is not a number.
            The first `config.num_batches` batches are read once and reused by every step.
        scores: Precomputed importance scores for this model (skips scoring).
        show_progress: Show tqdm progress bars (scoring, rescaling, and measuring a latency table, with its ETA).

    Returns:
        A `PruningReport` (what was removed, FLOPs and parameters before / after, and `report.plan`; for
        `target="latency"` the predicted latencies in `report.latency` and the table in `report.latency_table`).

    Raises:
        ValueError: for missing calibration data, scores of another model, a budget `uniform=True` cannot meet, a
            latency table of another device / thread count / shape / architecture, or a latency budget below the
            fastest this model can get (checked before any scoring); the model is then left untouched.

    Example:
    ```python
    calibration = DataLoader(train_dataset.select(range(256)), batch_size=32, collate_fn=DataCollatorWithPadding(tok))
    report = prune(model, PruningConfig(target="flops", keep=0.6), dataloader=calibration)
    print(report)
    model.save_pretrained("pruned")
    ```
    """
    start = time.perf_counter()
    config = PruningConfig() if config is None else config
    if not isinstance(config, PruningConfig):
        raise ValueError(f"config must be a PruningConfig, got {type(config).__name__}.")
    get_spec(model)  # an unsupported architecture fails here, with the list of supported ones
    needs_data = (
        (scores is None and config.importance != "magnitude")
        or config.rescale
        or (isinstance(config.layers, int) and config.layers > 0)
    )
    device = next(model.parameters()).device
    batches = []
    if dataloader is not None:
        batches = [prepare_batch(batch, device) for batch in itertools.islice(dataloader, config.num_batches)]
    if needs_data and not batches:
        raise ValueError(
            "This PruningConfig needs calibration data (importance scores, rescaling or layer scores): pass "
            "dataloader=... with a few hundred examples, or use importance='magnitude', rescale=False."
        )
    if scores is not None:
        _check_scores(scores, model)
    table = None
    if config.target == "latency":
        table = latency_table_for(model, config, show_progress=show_progress)
        structure = get_structure(model)
        listed = config.layers if isinstance(config.layers, list) else []
        check_latency_budget(table, structure.heads, structure.ffn, config.keep, None, listed, config.uniform)
    before = summarize(model, config.seq_len)
    dropped = _drop_candidates(model, config, batches, show_progress)
    if scores is None:
        scores = compute_importance(
            model, batches, config.importance, show_progress=show_progress, skip_layers=dropped
        )
    head_scores, ffn_scores = scores.heads, scores.ffn
    if table is not None:
        costs = table.unit_costs()
    else:
        costs = unit_costs(model, "params" if config.target == "params" else "flops", config.seq_len)
    if scores.method in BALANCED_METHODS:
        head_scores, ffn_scores = balance_kinds(head_scores, ffn_scores, costs)
    selection = select_units(head_scores, ffn_scores, config, costs, dropped=dropped, latency_table=table)
    head_scales = ffn_scales = None
    if config.rescale:
        head_scales, ffn_scales = fit_rescale(model, batches, selection, config.rescale_damping, show_progress)
    plan = make_plan(model, selection, head_scales, ffn_scales)
    apply_plan(model, plan)
    latency = None
    if table is not None:
        latency = _latency_summary(table, config, before.structure, get_structure(model))
    report = PruningReport(
        plan=plan,
        removed_heads={int(k): v for k, v in plan["remove"]["heads"].items()},
        removed_ffn={int(k): v for k, v in plan["remove"]["ffn"].items()},
        removed_layers=plan["remove"]["layers"],
        before=before,
        after=summarize(model, config.seq_len),
        config=config,
        seconds=time.perf_counter() - start,
        scores=scores,
        latency=latency,
        latency_table=table,
    )
    logger.info(report.summary())
    return report


def _latency_summary(
    table: LatencyTable, config: PruningConfig, before: ModelStructure, after: ModelStructure
) -> dict[str, Any]:
    """The report's `latency` entry: predicted milliseconds per call before and after, against the budget."""
    before_ms = table.model_latency(before.heads, before.ffn)
    after_ms = table.model_latency(after.heads, after.ffn)
    return {
        "before_ms": before_ms,
        "after_ms": after_ms,
        "budget_ms": config.keep * before_ms,
        "predicted_speedup": before_ms / after_ms,
        "table": table.to_dict()["key"],
        "table_path": config.latency_table,
    }
