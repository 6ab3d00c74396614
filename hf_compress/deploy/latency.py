"""Measure a model's forward latency the same way everywhere: warm-up, synchronised timing, median of repeats.

To compare models (a teacher and its student, PyTorch and ONNX Runtime), time them together with
`hf_compress.deploy.latency_compare.compare_latency`, which interleaves them: timed one after the other, a change in
machine load lands on one model only. `measure_latency` times one model.

A single timing of a forward pass is noisy (first-call allocations, lazy kernel selection, other processes on the
cores), so `measure_latency` discards warm-up calls, times each repeat between CUDA synchronisations when the model is
on a GPU, and reports the median beside the spread. The torch thread count is part of the result because CPU numbers
are meaningless without it.

Example:
    ```python
    from hf_compress.deploy.latency import measure_latency

    batch = tokenizer(sentences, padding="max_length", max_length=128, truncation=True, return_tensors="pt")
    result = measure_latency(model, batch, warmup=3, repeats=20, threads=2)
    result["median_ms"]
    ```
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from ..devices import device_name


def measure_latency(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
) -> dict[str, float | int | str]:
    """Time `model(**inputs)` under `torch.inference_mode()`.

    The model is put in eval mode for the measurement and returned to its previous mode; the inputs are moved to the
    model's device. With `threads`, torch's intra-op thread count is set for the measurement and restored afterwards.

    Args:
        model: The model to time.
        inputs: Keyword arguments of its forward (e.g. a tokenizer's `BatchEncoding`); tensors of shape
            (batch, sequence) for a text model.
        warmup: Untimed calls first (at least 0).
        repeats: Timed calls (at least 1); the median is reported.
        threads: torch intra-op threads to use; `None` keeps the current setting.

    Returns:
        A dict with `median_ms`, `mean_ms`, `min_ms`, `max_ms`, `stdev_ms` (per forward call), `repeats`, `warmup`,
        `device` (e.g. `"cpu"`, `"cuda:0"`), `device_name` (`device_name(device)`: the GPU's name, or the CPU's model
        name such as `"AMD EPYC 7R13 Processor"`), `torch_threads`, and
        `batch_size`/`sequence_length` when `input_ids` is among the inputs.

    Raises:
        ValueError: for a negative `warmup`, `repeats` < 1, or `threads` < 1.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"Need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} is not a thread count; pass a positive integer or None.")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    previous_threads, was_training = torch.get_num_threads(), model.training
    if threads is not None:
        torch.set_num_threads(threads)
    model.eval()
    timings_ms = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(**inputs)
            synchronize()
            for _ in range(repeats):
                start = time.perf_counter()
                model(**inputs)
                # CUDA kernels run asynchronously: without this the clock stops when they are queued, not done.
                synchronize()
                timings_ms.append((time.perf_counter() - start) * 1000)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)

    result: dict[str, float | int | str] = {
        "median_ms": statistics.median(timings_ms),
        "mean_ms": statistics.fmean(timings_ms),
        "min_ms": min(timings_ms),
        "max_ms": max(timings_ms),
        "stdev_ms": statistics.stdev(timings_ms) if len(timings_ms) > 1 else 0.0,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": used_threads,
    }
    input_ids = inputs.get("input_ids")
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        result["batch_size"], result["sequence_length"] = input_ids.shape
    return result
