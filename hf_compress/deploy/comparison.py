"""What a comparison of a compressed model with its teacher/original holds: the measuring half of a model card.

`describe_model` gives the numbers of one model, `build_comparison` puts two side by side with their ratios; the result
is the JSON that the example saves as `comparison.json`, that `push_compressed_to_hub` uploads and that
`hf_compress.deploy.model_card.create_model_card` renders. The numbers come from `hf_compress.report.summarize`, the
one model summary, so a card and a `compression_report` of the same model agree to the byte. Latency comes from one
`compare_latency` run of both models (interleaved): `describe_latency` records how it was measured and whether it was
too noisy to trust, and the model's `Speedup` gives `speedup` (median of per-round ratios) and `speedup_interval`.

Example:
    ```python
    from hf_compress import build_comparison, compare_latency, describe_model
    from hf_compress.deploy.comparison import describe_latency

    timing = compare_latency({"teacher": teacher, "student": student}, batch, rounds=30)  # interleaved
    comparison = build_comparison(
        {**describe_model(teacher), "name_or_path": "textattack/bert-base-uncased-SST-2",
         "metrics": {"accuracy": 0.92}, "latency_ms": timing.stats["teacher"].median_ms},
        {**describe_model(student), "metrics": {"accuracy": 0.91}, "latency_ms": timing.stats["student"].median_ms},
        latency=describe_latency(timing, batch),
        speedup=timing.speedups["student"],
    )
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from ..architectures import supported_model_types
from ..report import count_parameters, summarize, weight_bytes
from .latency import device_name
from .latency_compare import LatencyComparison, Speedup

# The file name a comparison is saved under, beside the model (the example, `push_compressed_to_hub`).
COMPARISON_FILE = "comparison.json"


def describe_model(model: PreTrainedModel, measure_size: bool = True) -> dict[str, Any]:
    """Parameters, size of the weights and per-layer structure of a model, for a comparison or a card.

    The numbers are `hf_compress.report.summarize`'s (the ones `compression_report` prints), under the keys that
    `comparison.json` files and model cards have always used.

    Args:
        model: Any `PreTrainedModel`; the per-layer structure needs a registered architecture.
        measure_size: Include `size_bytes`.

    Returns:
        A dict with
        - `class`: the model's class name, e.g. `"BertForSequenceClassification"`;
        - `model_type`: `config.model_type`;
        - `parameters`: the number of parameters, tied weights once (`ModelSummary.parameters`);
        - `size_bytes` (with `measure_size`): bytes of the weights `save_pretrained` writes, tied weights once
          (`ModelSummary.size_bytes`; the few kB of file header and config are left out);
        - `structure` (registered architectures only): `{"layers", "heads_per_layer", "ffn_neurons_per_layer"}`.

    Example:
        ```python
        >>> describe_model(student)["structure"]
        {'layers': 3, 'heads_per_layer': [12, 12, 12], 'ffn_neurons_per_layer': [1536, 1536, 1536]}
        ```
    """
    description: dict[str, Any] = {"class": type(model).__name__, "model_type": model.config.model_type}
    if model.config.model_type not in supported_model_types():
        # No spec, so no per-layer structure; the counts are the same functions `summarize` uses.
        description["parameters"] = count_parameters(model)
        if measure_size:
            description["size_bytes"] = weight_bytes(model)
        return description
    summary = summarize(model)
    description["parameters"] = summary.parameters
    if measure_size:
        description["size_bytes"] = summary.size_bytes
    description["structure"] = {
        "layers": summary.num_layers,
        "heads_per_layer": list(summary.heads_per_layer),
        "ffn_neurons_per_layer": list(summary.ffn_per_layer),
    }
    return description


def describe_latency(
    result: LatencyComparison, inputs: Mapping[str, Any] | None = None, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """How a `compare_latency` run measured, as the `latency` entry of a comparison (and the model card's sentence).

    Args:
        result: The `compare_latency` result.
        inputs: The inputs it timed; their `input_ids` give `batch_size` and `sequence_length`.
        device: Where the PyTorch models ran.

    Returns:
        `{"method": "interleaved", "device", "device_name", "torch_threads", "rounds", "warmup", "relative_iqr"
        (per model), "max_relative_iqr", "noisy", "warnings"}`, plus `batch_size` and `sequence_length` when the inputs
        have 2-d `input_ids`.
    """
    setup: dict[str, Any] = {
        "method": "interleaved",
        "device": str(device),
        "device_name": device_name(device),
        "torch_threads": result.torch_threads,
        "rounds": result.rounds,
        "warmup": result.warmup,
        "relative_iqr": {name: stats.relative_iqr for name, stats in result.stats.items()},
        "max_relative_iqr": result.max_relative_iqr,
        "noisy": result.noisy,
        "warnings": list(result.warnings),
    }
    input_ids = (inputs or {}).get("input_ids")
    shape = getattr(input_ids, "shape", None)
    if shape is not None and len(shape) == 2:
        setup["batch_size"], setup["sequence_length"] = int(shape[0]), int(shape[1])
    return setup


def build_comparison(
    reference: Mapping[str, Any],
    model: Mapping[str, Any],
    dataset: Mapping[str, Any] | None = None,
    latency: Mapping[str, Any] | None = None,
    task: str = "text-classification",
    speedup: Speedup | Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The comparison of a compressed model with its teacher/original, as saved in `comparison.json`.

    Args:
        reference: The teacher/original: `describe_model(...)` plus `name_or_path`, `metrics` (name -> value) and
            `latency_ms` (median per batch), each optional.
        model: The same for the compressed model.
        dataset: Where the metrics come from: `name` (for display), `hub_id` (the Hub dataset id, or None for local
            data), `config`, `split`, `num_examples`.
        latency: How latency was measured: `describe_latency(compare_latency_result, inputs)` (the models timed
            interleaved, with the spread and a `noisy` flag), or a `measure_latency` result minus the timings
            (`device`, `device_name`, `torch_threads`, `batch_size`, `sequence_length`, `repeats`, `warmup`).
        task: The pipeline task (`text-classification`, ...).
        speedup: The model's `Speedup` over the reference from the same `compare_latency` run
            (`result.speedups[name]`, or a mapping with `median`, `low` and `high`): the median of the per-round
            ratios becomes `speedup`, its 10%-90% range `speedup_interval`. Without it, `speedup` is the ratio of the
            two `latency_ms` and `speedup_interval` is `None`.

    Returns:
        `{"task", "dataset", "latency", "teacher", "student", "speedup", "speedup_interval", "parameter_ratio",
        "size_ratio", "metrics_retained"}`; ratios are student / teacher, `speedup` teacher latency / student
        latency, and an entry is `None` when a side lacks the number.
    """

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return numerator / denominator if numerator is not None and denominator else None

    reference_metrics, model_metrics = reference.get("metrics", {}), model.get("metrics", {})
    interval = None
    if speedup is not None:
        speedup = asdict(speedup) if is_dataclass(speedup) else dict(speedup)
        interval = [speedup["low"], speedup["high"]]
    return {
        "task": task,
        "dataset": dict(dataset or {}),
        "latency": dict(latency or {}),
        "teacher": dict(reference),
        "student": dict(model),
        "speedup": speedup["median"]
        if speedup is not None
        else ratio(reference.get("latency_ms"), model.get("latency_ms")),
        "speedup_interval": interval,
        "parameter_ratio": ratio(model.get("parameters"), reference.get("parameters")),
        "size_ratio": ratio(model.get("size_bytes"), reference.get("size_bytes")),
        "metrics_retained": {name: ratio(model_metrics[name], reference_metrics.get(name)) for name in model_metrics},
    }
