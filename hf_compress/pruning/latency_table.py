"""Latency tables: how long one encoder layer takes for each head count and FFN width, measured once per device.

`PruningConfig(target="latency")` budgets the model's measured forward time. FLOPs do not predict it well on a CPU:
a layer with no heads still pays for its layer norms and residual adds, the embeddings and task head do not shrink at
all, and GEMMs of some widths run faster than narrower ones. So the budget comes from measurements of *this* model's
layer on *this* device, thread count, runtime and input shape, stored as a `LatencyTable`:

- `layer_ms[i][j]`: the median time of one layer with `heads[i]` heads and `widths[j]` FFN neurons (a coarse grid:
  heads 0, 1, 2, 4, ... and all of them; widths 0, 1/8, 1/4, 1/2, 3/4 and all of the FFN);
- `fine_ms[k]`: the same with no heads and `fine_widths[k]` neurons, every `width_step` neurons from 0 to the full
  width, so the table knows which widths are fast (`width_step` is `round_to` doubled until there are at most 64);
- `rest_ms`: everything outside the layers (embeddings, attention-mask preparation, the task head). Removing a layer
  saves its whole time, `layer_ms(0, 0)` more than emptying it.

A layer of `h` heads and `w` neurons is predicted (`LatencyTable.layer_latency`) by bilinear interpolation on the
coarse grid plus the fine scan's departure from a straight line at `w`, and the model as `rest_ms` plus its layers.
Measurements are noisy, and a search that picks the shapes that happened to be measured fast would promise a
speed-up it does not deliver. So the prediction is the larger of that one and of its trend: at every head count, each
measured width's time replaced by the median of it and its neighbours', then a least-squares fit that never takes
less time for more heads or neurons (isotonic regression). A shape measured *slower* than the trend is believed (e.g.
widths the GEMMs handle badly, which the search then avoids); one measured faster than its neighbours is not.

How it is measured (`measure_latency_table`): a one-layer copy of the model (the same class, task head and attention
implementation, random weights, on the model's device and dtype) is built once, and a pruned copy of its layer
(`prune_heads` / `prune_ffn_neurons`) for every grid point. The copies are timed *interleaved*: each round runs every
shape once, in a rotating order, so a change in machine load spreads over all of them; the layer is timed by hooks
around it inside the full forward pass of the one-layer model (real inputs, attention mask and all), the rest as the
difference. Medians over the rounds are stored.

The table is keyed (`LatencyKey`) by device, thread count, runtime, batch size, sequence length, architecture and
width. A table is only used for a model and setting of the same key (and widths it covers); anything else is refused
with the difference named (`LatencyTable.check`), never silently reused.

Example:
```python
from hf_compress.pruning.latency_table import LatencyTable, measure_latency_table

table = measure_latency_table(model, batch_size=32, seq_len=128, threads=2)
table.save("latency_table.json")
table = LatencyTable.load("latency_table.json")
table.model_latency([12, 8, 0], [1536, 768, 0])  # predicted ms for a 3-layer model of these shapes
```
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers.utils import logging

from ..architectures import get_layers, get_spec
from ..devices import device_name
from ..remote_code import modeling_hf_compress as remote
from ..structure import get_structure, stock_class
from .config import PruningConfig
from .search import UnitCosts, round_width
from .structured import prune_ffn_neurons, prune_heads

logger = logging.get_logger(__name__)

TABLE_FORMAT = "hf-compress-latency-table"
TABLE_VERSION = 1
# At most this many FFN widths are measured (a full scan of `round_to` steps would take minutes on large FFNs).
MAX_FINE_WIDTHS = 64
# Layer copies held at once while measuring: shapes are measured interleaved within groups of at most this many bytes.
_MAX_GROUP_BYTES = 512 * 2**20
# Coarse grid of FFN widths, as fractions of the full width (0 and 1 are always in).
_COARSE_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 3 / 4)


@dataclass(frozen=True)
class LatencyKey:
    """What a latency table was measured for; a table is used only where every field agrees.

    Args:
        device: `"cpu"` or `"cuda"`.
        device_name: The CPU model or GPU name (`hf_compress.devices.device_name`).
        threads: torch intra-op threads (CPU); `None` on a GPU.
        runtime: What ran the model (`"pytorch"`).
        torch_version: The torch version (kernels change between versions).
        dtype: The model's parameter dtype, e.g. `"float32"`.
        attn_implementation: The attention implementation, e.g. `"sdpa"` or `"eager"`.
        batch_size, seq_len: The input shape (sequences per call, tokens per sequence).
        model_type: The architecture (`config.model_type`).
        model_class: The stock model class (its task head is part of the rest of the model).
        hidden_size, head_dim, max_heads: The layer's width and its full head count.
    """

    device: str
    device_name: str
    threads: int | None
    runtime: str
    torch_version: str
    dtype: str
    attn_implementation: str
    batch_size: int
    seq_len: int
    model_type: str
    model_class: str
    hidden_size: int
    head_dim: int
    max_heads: int

    def describe(self) -> str:
        """One line for logs and errors: `"bert 384 wide on AMD EPYC 7R13 Processor, 2 threads, batch 32 x 128"`."""
        threads = f"{self.threads} threads" if self.threads is not None else self.device
        return (
            f"{self.model_type} {self.hidden_size} wide on {self.device_name}, {threads}, batch {self.batch_size} x "
            f"{self.seq_len}"
        )


def latency_key(model: PreTrainedModel, batch_size: int, seq_len: int, threads: int | None = None) -> LatencyKey:
    """The `LatencyKey` of `model` at `batch_size` x `seq_len` with `threads` (unset: torch's current setting)."""
    spec = get_spec(model)
    structure = get_structure(model)
    parameter = next(model.parameters())
    device = parameter.device
    return LatencyKey(
        device=device.type,
        device_name=device_name(device),
        threads=(threads or torch.get_num_threads()) if device.type == "cpu" else None,
        runtime="pytorch",
        torch_version=torch.__version__,
        dtype=str(parameter.dtype).removeprefix("torch."),
        attn_implementation=str(getattr(model.config, "_attn_implementation", None) or "eager"),
        batch_size=int(batch_size),
        seq_len=int(seq_len),
        model_type=model.config.model_type,
        model_class=stock_class(type(model)).__name__,
        hidden_size=spec.hidden_size(model.config),
        head_dim=structure.head_dim,
        max_heads=structure.max_heads,
    )


@dataclass
class LatencyTable:
    """Measured latency of one encoder layer by head count and FFN width, and of the rest of the model.

    Args:
        key: What the table was measured for (`LatencyKey`).
        max_ffn: The widest FFN measured; the table covers layers up to this width.
        rest_ms: Milliseconds per forward call outside the layers (embeddings, mask preparation, task head).
        heads: Head counts of the coarse grid, ascending, from 0 to `key.max_heads`.
        widths: FFN widths of the coarse grid, ascending, from 0 to `max_ffn`.
        layer_ms: `layer_ms[i][j]`: milliseconds of one layer with `heads[i]` heads and `widths[j]` neurons.
        width_step: Spacing of the fine scan of FFN widths.
        fine_widths: FFN widths of the fine scan, ascending, from 0 to `max_ffn`.
        fine_ms: Milliseconds of one layer with no heads and `fine_widths[k]` neurons.
        repeats, warmup: Timed and untimed rounds of the measurement.
        seconds: How long measuring took.
        created: When it was measured (ISO 8601, UTC).
    """

    key: LatencyKey
    max_ffn: int
    rest_ms: float
    heads: list[int]
    widths: list[int]
    layer_ms: list[list[float]]
    width_step: int
    fine_widths: list[int]
    fine_ms: list[float]
    repeats: int = 0
    warmup: int = 0
    seconds: float = 0.0
    created: str = ""
    _arrays: dict = field(default=None, init=False, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_grid()
        raw = {
            "heads": np.asarray(self.heads, dtype=np.float64),
            "widths": np.asarray(self.widths, dtype=np.float64),
            "layer_ms": np.asarray(self.layer_ms, dtype=np.float64),
            "fine_widths": np.asarray(self.fine_widths, dtype=np.float64),
            "fine_ms": np.asarray(self.fine_ms, dtype=np.float64),
        }
        # The raw prediction at every head count and measured width, and its trend (see the module docstring).
        raw_grid = [[_interpolate(raw, h, w) for w in self.fine_widths] for h in range(self.key.max_heads + 1)]
        trend = _isotonic_grid(_median_of_neighbours(np.asarray(raw_grid, dtype=np.float64)))
        self._arrays = {"raw": raw, "trend": trend}

    def _check_grid(self) -> None:
        problems = []
        for name, values, top in (
            ("heads", self.heads, self.key.max_heads),
            ("widths", self.widths, self.max_ffn),
            ("fine_widths", self.fine_widths, self.max_ffn),
        ):
            if not values or values[0] != 0 or values[-1] != top or any(b <= a for a, b in itertools.pairwise(values)):
                problems.append(f"{name} must ascend strictly from 0 to {top}, not {values}")
        if len(self.layer_ms) != len(self.heads) or any(len(row) != len(self.widths) for row in self.layer_ms):
            problems.append(f"layer_ms must be {len(self.heads)} x {len(self.widths)} (heads x widths)")
        if len(self.fine_ms) != len(self.fine_widths):
            problems.append("fine_ms needs one value per fine width")
        values = [self.rest_ms, *np.ravel(self.layer_ms), *self.fine_ms] if not problems else []
        if not all(isinstance(v, (int, float, np.floating)) and math.isfinite(v) and v >= 0 for v in values):
            problems.append("every time must be a finite number >= 0")
        if problems:
            raise ValueError(
                f"Not a valid latency table: {'; '.join(problems)}. Measure one with `measure_latency_table`."
            )

    #### Predictions

    def layer_latency(self, heads: int, width: int) -> float:
        """Predicted milliseconds of one layer with `heads` heads and `width` FFN neurons (a kept, possibly empty one).

        Bilinear on the coarse grid, plus the fine scan's departure from its own straight line between the coarse
        widths around `width` (how much faster or slower than its neighbours this width runs); the larger of that on
        the measurements and on their trend (see the module docstring).
        """
        if not (0 <= heads <= self.key.max_heads and 0 <= width <= self.max_ffn):
            raise ValueError(
                f"The latency table covers 0..{self.key.max_heads} heads and 0..{self.max_ffn} FFN neurons per layer, "
                f"not {heads} heads and {width} neurons."
            )
        cached = self._cache.get((heads, width))
        if cached is not None:
            return cached
        raw = self._arrays["raw"]
        trend = float(np.interp(width, raw["fine_widths"], self._arrays["trend"][heads]))
        self._cache[(heads, width)] = latency = max(_interpolate(raw, heads, width), trend, 0.0)
        return latency

    @property
    def empty_layer_ms(self) -> float:
        """A layer with no heads and no neurons (layer norms, residual adds): what removing it saves over emptying."""
        return self.layer_latency(0, 0)

    def model_latency(self, heads: list[int] | tuple[int, ...], ffn: list[int] | tuple[int, ...]) -> float:
        """Predicted milliseconds per forward call of a model with `heads[i]` heads and `ffn[i]` neurons in layer i."""
        return self.rest_ms + sum(self.layer_latency(h, f) for h, f in zip(heads, ffn, strict=True))

    def unit_costs(self) -> UnitCosts:
        """Mean milliseconds of one head and of one neuron: a linear view of the table, to scale unscaled scores."""
        empty = self.empty_layer_ms
        head = (self.layer_latency(self.key.max_heads, 0) - empty) / max(self.key.max_heads, 1)
        neuron = (self.layer_latency(0, self.max_ffn) - empty) / max(self.max_ffn, 1)
        return UnitCosts(head=max(head, 1e-9), neuron=max(neuron, 1e-9))

    def candidate_widths(self, limit: int, round_to: int = 1) -> list[int]:
        """FFN widths a layer of `limit` neurons may be cut to: the measured ones below it that are multiples of
        `round_to`, and `limit` itself (a layer that loses nothing keeps its width)."""
        return sorted({w for w in self.fine_widths if w < limit and w % round_to == 0} | {limit})

    #### Keys and files

    def check(self, key: LatencyKey, ffn: list[int] | tuple[int, ...] = (), source: str = "The latency table") -> None:
        """Refuse this table for a model or setting of another `key`, or FFN layers wider than it measured.

        Raises:
            ValueError: naming every field that differs, and the fix (measure a new table, or pass the right one).
        """
        mine, theirs = asdict(self.key), asdict(key)
        differences = [
            f"{name} {mine[name]!r} (this run: {theirs[name]!r})" for name in mine if mine[name] != theirs[name]
        ]
        if ffn and max(ffn) > self.max_ffn:
            differences.append(f"FFN widths up to {self.max_ffn} (this model: {max(ffn)})")
        if differences:
            raise ValueError(
                f"{source} was measured for {self.key.describe()} and does not fit this run: it has "
                f"{'; '.join(differences)}. A latency table holds only for the device, thread count, runtime, input "
                "shape and architecture it was measured with: measure a new one (leave latency_table unset, or point "
                "it to a new file), or pass the table measured for this setting."
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (what `save` writes)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        return {"format": TABLE_FORMAT, "version": TABLE_VERSION, **data, "key": asdict(self.key)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "The data") -> LatencyTable:
        """A table from `to_dict()`'s output.

        Raises:
            ValueError: for data that is not a latency table of this version, or a damaged one.
        """
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or data.get("version") != TABLE_VERSION:
            raise ValueError(
                f"{source} is not an hf-compress latency table of version {TABLE_VERSION}; measure one with "
                "`measure_latency_table` (or PruningConfig(target='latency', latency_table=<new file>))."
            )
        names = {f.name for f in fields(cls) if f.init}
        key_names = {f.name for f in fields(LatencyKey)}
        key = data.get("key")
        if not names <= set(data) or not isinstance(key, dict) or set(key) != key_names:
            raise ValueError(f"{source} is a damaged latency table (fields are missing); measure it again.")
        try:
            return cls(**{**{name: data[name] for name in names}, "key": LatencyKey(**key)})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{source} is a damaged latency table ({error}); measure it again.") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as sorted, indented JSON (the folder is created)."""
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table `save` wrote.

        Raises:
            ValueError: for a file that is not a latency table (or not JSON).
        """
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a latency table (not JSON: {error}); measure it again.") from None
        return cls.from_dict(data, source=os.fspath(path))


def _interpolate(arrays: dict[str, np.ndarray], heads: int, width: int) -> float:
    """Bilinear on the coarse grid plus the fine scan's departure from its straight line between coarse widths."""
    per_width = np.array([np.interp(width, arrays["widths"], row) for row in arrays["layer_ms"]])  # (len(heads),)
    coarse = float(np.interp(heads, arrays["heads"], per_width))
    fine = float(np.interp(width, arrays["fine_widths"], arrays["fine_ms"]))
    at_coarse = np.interp(arrays["widths"], arrays["fine_widths"], arrays["fine_ms"])  # (len(widths),)
    return coarse + fine - float(np.interp(width, arrays["widths"], at_coarse))


def _median_of_neighbours(grid: np.ndarray) -> np.ndarray:
    """Each inner value along the last axis replaced by the median of it and its two neighbours (a single outlier,
    fast or slow, does not move the trend); the first and last kept."""
    if grid.shape[-1] < 3:
        return grid
    stacked = np.stack([grid[..., :-2], grid[..., 1:-1], grid[..., 2:]])  # (3, ..., n - 2)
    return np.concatenate([grid[..., :1], np.median(stacked, axis=0), grid[..., -1:]], axis=-1)


def _isotonic(values: np.ndarray) -> np.ndarray:
    """The least-squares non-decreasing fit of `values` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count] of pooled runs
    for value in values.tolist():
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] > blocks[-1][0] * blocks[-2][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return np.concatenate([np.full(count, total / count) for total, count in blocks])


def _isotonic_grid(grid: np.ndarray) -> np.ndarray:
    """A fit of `grid` non-decreasing along both axes: isotonic rows and columns in turn, then running maxima."""
    for _ in range(20):
        grid = np.apply_along_axis(_isotonic, 1, grid)
        grid = np.apply_along_axis(_isotonic, 0, grid)
        if (np.diff(grid, axis=1) >= 0).all():
            break
    # Guarantees monotonicity should alternating fits not settle (it only ever raises values).
    return np.maximum.accumulate(np.maximum.accumulate(grid, axis=0), axis=1)


#### Measuring


def width_step(max_ffn: int, round_to: int = 1) -> int:
    """Spacing of the fine scan: `round_to` doubled until at most `MAX_FINE_WIDTHS` widths span `max_ffn`."""
    step = max(round_to, 1)
    while math.ceil(max_ffn / step) > MAX_FINE_WIDTHS:
        step *= 2
    return step


def table_grid(max_heads: int, max_ffn: int, round_to: int = 1) -> tuple[list[int], list[int], list[int], int]:
    """The measured grid: `(heads, widths, fine_widths, width_step)` (see the module docstring)."""
    heads = sorted({0, max_heads} | {2**k for k in range(max(max_heads, 1).bit_length()) if 2**k < max_heads})
    step = width_step(max_ffn, round_to)
    widths = sorted({0, max_ffn} | {round_width(max_ffn * f, step, max_ffn) for f in _COARSE_FRACTIONS})
    fine = sorted(set(range(0, max_ffn + 1, step)) | {max_ffn})
    return heads, widths, fine, step


def _one_layer_model(model: PreTrainedModel, max_ffn: int) -> PreTrainedModel:
    """A fresh, unpruned one-layer model of `model`'s class, config and placement (random weights: speed does not
    depend on their values)."""
    spec = get_spec(model)
    config = copy.deepcopy(model.config)
    for name in (remote.CONFIG_KEY, "auto_map"):  # a stock layer of the full width, whatever pruning left
        if hasattr(config, name):
            delattr(config, name)
    setattr(config, spec.num_layers_attr, 1)
    setattr(config, spec.intermediate_size_attr, max_ffn)
    parameter = next(model.parameters())
    return stock_class(type(model))(config).to(device=parameter.device, dtype=parameter.dtype).eval()


def _timing_inputs(model: PreTrainedModel, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(
            f"seq_len={seq_len} is longer than this model's max_position_embeddings={limit}: it cannot run, so its "
            f"latency cannot be measured. Use seq_len <= {limit}."
        )
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(min(5, vocab - 1), vocab, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if seq_len > 1:  # a padded batch, as served: the attention takes its masked path
        attention_mask[-1, -1] = 0
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def _layer_bytes(heads: int, width: int, hidden: int, head_dim: int, element_size: int) -> int:
    return (4 * hidden * heads * head_dim + 2 * hidden * width) * element_size


@torch.no_grad()
def measure_latency_table(
    model: PreTrainedModel,
    batch_size: int = 32,
    seq_len: int = 128,
    threads: int | None = None,
    round_to: int = 8,
    repeats: int = 7,
    warmup: int = 1,
    show_progress: bool = True,
) -> LatencyTable:
    """Measure the latency table of `model`'s architecture and width on its device (see the module docstring).

    `model` itself is not run or changed: a one-layer copy of its class and config is built and timed.

    Args:
        model: A model of a registered architecture (pruned or not: the table covers its widest layer).
        batch_size: Sequences per forward call.
        seq_len: Tokens per sequence.
        threads: torch intra-op threads for the measurement (restored afterwards); unset: the current setting.
        round_to: The fine scan of FFN widths steps by a multiple of this (`width_step`).
        repeats: Timed rounds (each times every shape once); medians are stored.
        warmup: Untimed rounds first.
        show_progress: Show a tqdm progress bar with the time left.

    Returns:
        The `LatencyTable`.

    Example:
    ```python
    table = measure_latency_table(model, batch_size=32, seq_len=128, threads=2)
    table.save("latency_table.json")
    ```
    """
    if repeats < 1 or warmup < 0 or batch_size < 1 or seq_len < 1 or (threads is not None and threads < 1):
        raise ValueError(
            f"Need repeats >= 1, warmup >= 0, batch_size >= 1, seq_len >= 1 and threads >= 1 (or None); got "
            f"repeats={repeats}, warmup={warmup}, batch_size={batch_size}, seq_len={seq_len}, threads={threads}."
        )
    start = time.perf_counter()
    key = latency_key(model, batch_size, seq_len, threads)
    structure = get_structure(model)
    max_heads, max_ffn = structure.max_heads, max(structure.ffn)
    heads_grid, widths, fine, step = table_grid(max_heads, max_ffn, round_to)
    points = list(dict.fromkeys([(h, w) for h in heads_grid for w in widths] + [(0, w) for w in fine]))
    inputs = _timing_inputs(model, batch_size, seq_len)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        shell = _one_layer_model(model, max_ffn)
        layer_times, rest_times = _time_points(shell, points, inputs, key, repeats, warmup, show_progress)
    finally:
        torch.set_num_threads(previous_threads)
    median = {point: statistics.median(times) for point, times in layer_times.items()}
    table = LatencyTable(
        key=key,
        max_ffn=max_ffn,
        rest_ms=statistics.median(rest_times),
        heads=heads_grid,
        widths=widths,
        layer_ms=[[median[(h, w)] for w in widths] for h in heads_grid],
        width_step=step,
        fine_widths=fine,
        fine_ms=[median[(0, w)] for w in fine],
        repeats=repeats,
        warmup=warmup,
        seconds=time.perf_counter() - start,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    logger.info(
        "Measured a latency table for %s in %.0fs: %.2f ms outside the layers, %.2f ms for a full layer, %.2f ms for "
        "an empty one.",
        key.describe(),
        table.seconds,
        table.rest_ms,
        table.layer_latency(max_heads, max_ffn),
        table.empty_layer_ms,
    )
    return table


def _time_points(
    shell: PreTrainedModel,
    points: list[tuple[int, int]],
    inputs: dict[str, torch.Tensor],
    key: LatencyKey,
    repeats: int,
    warmup: int,
    show_progress: bool,
) -> tuple[dict[tuple[int, int], list[float]], list[float]]:
    """Time the one-layer `shell` with its layer cut to each `(heads, width)` of `points`, interleaved.

    Returns the layer's milliseconds per point (one per timed round) and the rest's (one per timed call).
    """
    layers = get_layers(shell)
    full = layers[0]
    max_heads, max_ffn = key.max_heads, get_structure(shell).ffn[0]
    element_size = next(shell.parameters()).element_size()
    device = next(shell.parameters()).device
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    stamps: dict[str, float] = {}

    def before(module, args):
        synchronize()  # the layer's time starts when everything before it has run
        stamps["start"] = time.perf_counter()

    def after(module, args, output):
        synchronize()
        stamps["end"] = time.perf_counter()

    def build(heads: int, width: int) -> nn.Module:
        layer = copy.deepcopy(full)
        layers[0] = layer
        if heads < max_heads:
            prune_heads(shell, {0: list(range(heads, max_heads))})
        if width < max_ffn:
            prune_ffn_neurons(shell, {0: list(range(width, max_ffn))})
        return layers[0]

    groups, group, size = [], [], 0
    for heads, width in points:
        nbytes = _layer_bytes(heads, width, key.hidden_size, key.head_dim, element_size)
        if group and size + nbytes > _MAX_GROUP_BYTES:
            groups.append(group)
            group, size = [], 0
        group.append((heads, width))
        size += nbytes
    groups.append(group)

    layer_times: dict[tuple[int, int], list[float]] = {point: [] for point in points}
    rest_times: list[float] = []
    threads = f"{key.threads} threads" if key.threads is not None else key.device_name
    progress = tqdm(
        total=len(points) * (warmup + repeats),
        desc=f"Measuring layer latency ({key.batch_size}x{key.seq_len}, {threads})",
        unit="call",
        disable=not show_progress,
    )
    try:
        for group in groups:
            modules = {point: build(*point) for point in group}
            handles = [m.register_forward_pre_hook(before) for m in modules.values()]
            handles += [m.register_forward_hook(after) for m in modules.values()]
            try:
                with torch.inference_mode():
                    for round_index in range(warmup + repeats):
                        shift = round_index % len(group)  # rotate, so no shape always follows the same neighbour
                        for point in group[shift:] + group[:shift]:
                            layers[0] = modules[point]
                            synchronize()
                            begin = time.perf_counter()
                            shell(**inputs)
                            synchronize()
                            total_ms = (time.perf_counter() - begin) * 1000
                            if round_index >= warmup:
                                layer_ms = (stamps["end"] - stamps["start"]) * 1000
                                layer_times[point].append(layer_ms)
                                rest_times.append(total_ms - layer_ms)
                            progress.update()
            finally:
                for handle in handles:
                    handle.remove()
            del modules
    finally:
        progress.close()
        layers[0] = full
    return layer_times, rest_times


#### Which table a run uses


def latency_table_for(
    model: PreTrainedModel,
    config: PruningConfig,
    fallback_path: str | os.PathLike | None = None,
    save: bool = True,
    show_progress: bool = True,
) -> LatencyTable:
    """The latency table for pruning `model` with `config` (`target="latency"`): read, or measured and written.

    - `config.latency_table` names an existing file: it is read and must fit (`LatencyTable.check`), else refused.
    - It names a missing file: the table is measured and written there (when `save`).
    - It is unset and `fallback_path` (a run's own `latency_table.json`) exists and fits: that is reused; one that
      does not fit is measured again, with a warning, and replaced. Otherwise the table is measured (and written to
      `fallback_path`, when given and `save`).

    Raises:
        ValueError: for a `config.latency_table` that is not a latency table, or one measured for another device,
            thread count, runtime, input shape, architecture or narrower FFN layers.
    """
    key = latency_key(model, config.latency_batch_size, config.seq_len, config.latency_threads)
    ffn = get_structure(model).ffn
    path = config.latency_table
    if path is not None and os.path.isfile(path):
        table = LatencyTable.load(path)
        table.check(key, ffn, source=f"The latency table {path}")
        logger.info("Using the latency table %s (%s).", path, key.describe())
        return table
    if path is None and fallback_path is not None and os.path.isfile(fallback_path):
        try:
            table = LatencyTable.load(fallback_path)
            table.check(key, ffn, source=f"The latency table {fallback_path}")
        except ValueError as error:
            logger.warning("%s Measuring it again, and replacing %s.", error, fallback_path)
        else:
            logger.info("Reusing the latency table %s (%s).", fallback_path, key.describe())
            return table
    table = measure_latency_table(
        model,
        config.latency_batch_size,
        config.seq_len,
        config.latency_threads,
        round_to=config.round_to,
        show_progress=show_progress,
    )
    target = path if path is not None else fallback_path
    if target is not None and save:
        table.save(target)
        logger.info("Saved the latency table to %s; later runs of this setting reuse it.", target)
    return table
