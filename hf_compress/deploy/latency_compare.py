"""Compare the latency of several models (PyTorch, ONNX Runtime, anything callable) in one interleaved run.

Timing models one after the other lets a change in machine load (another process, thermal throttling, a frequency
change) land on one model and not the other, and shows up as a speed-up that is not there. `compare_latency` times
them round-robin instead, so every round holds one call of each model made within milliseconds of each other, and
reports the spread and a per-round interval beside each number, plus a warning when the spread is too large for the
numbers to mean much.

Example:
    ```python
    from hf_compress.deploy.latency_compare import compare_latency
    from hf_compress import OnnxModel

    batch = tokenizer(sentences, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    models = {
        "pytorch": model,
        "onnx": OnnxModel("out", threads=2),
        "onnx-int8": OnnxModel("out", "model_int8_dynamic.onnx", threads=2),
    }
    result = compare_latency(models, batch, rounds=30, threads=2)
    print(result)  # a table: median, IQR, speed-up vs pytorch with its 10-90% interval, and a warning if noisy
    result.speedups["onnx-int8"].median
    ```
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEFAULT_MAX_RELATIVE_IQR = 0.2


@dataclass
class LatencyStats:
    """One model's timings (milliseconds per call).

    Args:
        median_ms: Median over the rounds: the latency to quote.
        q25_ms, q75_ms: First and third quartiles.
        iqr_ms: Interquartile range, `q75_ms - q25_ms`: the spread of the middle half of the rounds.
        relative_iqr: `iqr_ms / median_ms`; above the comparison's threshold the model is flagged as noisy.
        min_ms, mean_ms, max_ms: For reference (the mean and max are pulled by outliers; the median is not).
        timings_ms: Every round's timing, in round order.
    """

    median_ms: float
    q25_ms: float
    q75_ms: float
    iqr_ms: float
    relative_iqr: float
    min_ms: float
    mean_ms: float
    max_ms: float
    timings_ms: list[float] = field(repr=False, default_factory=list)


@dataclass
class Speedup:
    """How much faster a model is than the reference: `reference time / model time` (above 1: faster).

    Args:
        median: Median of the per-round ratios (each round's reference call over the same round's model call).
        low, high: 10% and 90% quantiles of the per-round ratios: the range 80% of the rounds fall in.
        ratio_of_medians: `reference median / model median`, for comparison with the per-round median.
    """

    median: float
    low: float
    high: float
    ratio_of_medians: float


@dataclass
class LatencyComparison:
    """The result of `compare_latency`.

    Args:
        reference: Name of the model the speed-ups are relative to.
        stats: Per model, its `LatencyStats`.
        speedups: Per model, its `Speedup` over the reference (the reference's own is 1).
        rounds, warmup: Timed and untimed rounds.
        max_relative_iqr: The noise threshold used.
        noisy: Whether any model's relative IQR exceeded it: then the medians and speed-ups are not to be trusted.
        warnings: Plain-language explanations of why the run is noisy (empty when it is not).
        torch_threads: torch intra-op threads during the run.
    """

    reference: str
    stats: dict[str, LatencyStats]
    speedups: dict[str, Speedup]
    rounds: int
    warmup: int
    max_relative_iqr: float
    noisy: bool
    warnings: list[str]
    torch_threads: int

    def to_dict(self, timings: bool = False) -> dict[str, Any]:
        """Plain data; the per-round timings only with `timings=True`."""
        data = asdict(self)
        if not timings:
            for stats in data["stats"].values():
                stats.pop("timings_ms")
        return data

    def format(self) -> str:
        """A plain-text table, with the warnings below it."""
        header = ["model", "median ms", "IQR ms", "rel. IQR", f"speed-up vs {self.reference} [10%-90%]"]
        rows = [header]
        for name, stats in self.stats.items():
            speedup = self.speedups[name]
            rows.append(
                [
                    name,
                    f"{stats.median_ms:.3f}",
                    f"{stats.iqr_ms:.3f}",
                    f"{stats.relative_iqr:.0%}",
                    f"{speedup.median:.2f}x [{speedup.low:.2f}-{speedup.high:.2f}]",
                ]
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        lines.insert(1, "  ".join("-" * width for width in widths))
        lines.append(
            f"{self.rounds} interleaved rounds after {self.warmup} warm-up rounds; {self.torch_threads} torch threads."
        )
        lines.extend(f"WARNING: {message}" for message in self.warnings)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _is_onnxruntime_session(model: Any) -> bool:
    return type(model).__name__ == "InferenceSession" and hasattr(model, "run") and hasattr(model, "get_inputs")


def _bind(model: Any, inputs: Mapping[str, Any]) -> tuple[Callable[[], Any], Callable[[], None]]:
    """A zero-argument call of `model` on `inputs` (converted once, outside the timing) and its synchronisation."""
    from .onnx_runtime import OnnxModel, onnx_feed

    no_sync = lambda: None  # noqa: E731
    if isinstance(model, nn.Module):
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        # CUDA kernels run asynchronously: without a sync the clock stops when they are queued, not done.
        sync = torch.cuda.synchronize if device.type == "cuda" else no_sync
        return (lambda: model(**moved)), sync
    if isinstance(model, OnnxModel):
        feed = model.feed(inputs)
        return (lambda: model.session.run(None, feed)), no_sync
    if _is_onnxruntime_session(model):
        feed = onnx_feed(inputs, [node.name for node in model.get_inputs()])
        return (lambda: model.run(None, feed)), no_sync
    if callable(model):
        return (lambda: model(**inputs)), no_sync
    raise ValueError(
        f"compare_latency times nn.Modules, onnxruntime InferenceSessions, OnnxModels and callables taking the "
        f"inputs as keyword arguments; got a {type(model).__name__}."
    )


def _quantile(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q))


def compare_latency(
    models: Mapping[str, nn.Module | Callable[..., Any]],
    inputs: Mapping[str, Any],
    rounds: int = 30,
    warmup: int = 3,
    reference: str | None = None,
    max_relative_iqr: float = DEFAULT_MAX_RELATIVE_IQR,
    threads: int | None = None,
) -> LatencyComparison:
    """Time several models on the same inputs, interleaved, with medians, spreads and speed-up intervals.

    How it measures: each round calls every model once, round-robin (A B C, then B C A, then C A B, ...: the order
    rotates so no model always runs right after the same neighbour, e.g. one that leaves the caches cold), timing each
    call with `time.perf_counter` (and a CUDA synchronisation for a PyTorch model on a GPU). `warmup` untimed rounds
    come first (first-call allocations, lazy initialisation). Inputs are converted for each model once, before the
    timing: moved to a PyTorch model's device, turned into int64 numpy arrays for ONNX Runtime.

    The statistics:
    - Per model, the **median** latency over the rounds (robust to the occasional slow call, unlike the mean) and the
      **interquartile range** (IQR, 75th minus 25th percentile), also relative to the median.
    - Per model, the **speed-up** over `reference`, computed per round (the reference's call over the model's call in
      the same round, so slow phases of the machine cancel out) and summarised by the **median of the per-round
      ratios** and their **10% and 90% quantiles**: 80% of the rounds saw a ratio in that interval. With fewer than
      10 rounds these quantiles are close to the min and max.
    - The run is **noisy** when any model's relative IQR exceeds `max_relative_iqr` (default 20%): the middle half of
      its rounds then spans more than a fifth of its median, and differences of that order between models cannot be
      told from noise. A warning is logged and kept in the result; rerun on an idle machine, with more rounds, or
      with larger inputs.

    Args:
        models: Name -> model: a PyTorch `nn.Module` (called as `model(**inputs)` in eval mode under
            `torch.inference_mode()`), an `onnxruntime.InferenceSession`, an `OnnxModel`, or any callable taking the
            inputs as keyword arguments. Thread counts of ONNX Runtime sessions are set when they are created
            (`OnnxModel(..., threads=n)`).
        inputs: Keyword inputs (e.g. a tokenizer's output with `return_tensors="pt"`).
        rounds: Timed rounds (at least 2).
        warmup: Untimed rounds first (at least 0).
        reference: The model speed-ups are relative to; the first one by default.
        max_relative_iqr: Relative IQR above which the run is flagged as noisy.
        threads: torch intra-op threads for the run (restored afterwards); `None` keeps the current setting.

    Returns:
        A `LatencyComparison`; `print(result)` shows a table.

    Raises:
        ValueError: for no models, an unknown `reference`, `rounds` < 2, a negative `warmup`, or a model that is not
            callable.
    """
    if not models:
        raise ValueError("compare_latency needs at least one model, e.g. {'pytorch': model, 'onnx': onnx_model}.")
    if rounds < 2 or warmup < 0:
        raise ValueError(f"Need rounds >= 2 and warmup >= 0, got rounds={rounds}, warmup={warmup}.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} is not a thread count; pass a positive integer or None.")
    names = list(models)
    reference = names[0] if reference is None else reference
    if reference not in models:
        raise ValueError(f"reference={reference!r} is not one of the models: {names}.")

    modules = [model for model in models.values() if isinstance(model, nn.Module)]
    was_training = [module.training for module in modules]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    timings = {name: [] for name in names}
    try:
        for module in modules:
            module.eval()
        bound = {name: _bind(model, inputs) for name, model in models.items()}
        with torch.inference_mode():
            for round_index in range(warmup + rounds):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    call, sync = bound[name]
                    start = time.perf_counter()
                    call()
                    sync()
                    elapsed_ms = (time.perf_counter() - start) * 1000
                    if round_index >= warmup:
                        timings[name].append(elapsed_ms)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        for module, training in zip(modules, was_training, strict=True):
            module.train(training)

    stats = {}
    for name, values in timings.items():
        array = np.asarray(values)
        median, q25, q75 = (_quantile(array, q) for q in (0.5, 0.25, 0.75))
        stats[name] = LatencyStats(
            median_ms=median,
            q25_ms=q25,
            q75_ms=q75,
            iqr_ms=q75 - q25,
            relative_iqr=(q75 - q25) / median if median > 0 else float("inf"),
            min_ms=float(array.min()),
            mean_ms=float(array.mean()),
            max_ms=float(array.max()),
            timings_ms=values,
        )
    reference_times = np.asarray(timings[reference])
    speedups = {}
    for name in names:
        ratios = reference_times / np.asarray(timings[name])
        speedups[name] = Speedup(
            median=_quantile(ratios, 0.5),
            low=_quantile(ratios, 0.1),
            high=_quantile(ratios, 0.9),
            ratio_of_medians=stats[reference].median_ms / stats[name].median_ms,
        )

    messages = [
        f"{name!r} is too noisy to trust: the middle half of its {rounds} rounds spans {s.iqr_ms:.3g} ms, "
        f"{s.relative_iqr:.0%} of its {s.median_ms:.3g} ms median (threshold {max_relative_iqr:.0%}). Differences "
        "between models smaller than that are noise; rerun on an idle machine, with more rounds or larger inputs."
        for name, s in stats.items()
        if s.relative_iqr > max_relative_iqr
    ]
    for message in messages:
        logger.warning(message)
    return LatencyComparison(
        reference=reference,
        stats=stats,
        speedups=speedups,
        rounds=rounds,
        warmup=warmup,
        max_relative_iqr=max_relative_iqr,
        noisy=bool(messages),
        warnings=messages,
        torch_threads=used_threads,
    )
