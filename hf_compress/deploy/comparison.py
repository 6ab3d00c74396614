"""What a comparison of a compressed model with its teacher/original holds: the measuring half of a model card.

`describe_model` gives the numbers of one model, `build_comparison` puts two side by side with their ratios; the result
is the JSON that the example saves as `comparison.json`, that `push_compressed_to_hub` uploads and that
`hf_compress.deploy.model_card.create_model_card` renders. The numbers come from `hf_compress.report.summarize`, the
one model summary, so a card and a `compression_report` of the same model agree to the byte.

Example:
    ```python
    from hf_compress import build_comparison, describe_model

    comparison = build_comparison(
        {**describe_model(teacher), "name_or_path": "textattack/bert-base-uncased-SST-2", "metrics": {"accuracy": 0.92}},
        {**describe_model(student), "metrics": {"accuracy": 0.91}},
    )
    ```
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PreTrainedModel

from ..architectures import supported_model_types
from ..report import count_parameters, summarize, weight_bytes

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


def build_comparison(
    reference: Mapping[str, Any],
    model: Mapping[str, Any],
    dataset: Mapping[str, Any] | None = None,
    latency: Mapping[str, Any] | None = None,
    task: str = "text-classification",
) -> dict[str, Any]:
    """The comparison of a compressed model with its teacher/original, as saved in `comparison.json`.

    Args:
        reference: The teacher/original: `describe_model(...)` plus `name_or_path`, `metrics` (name -> value) and
            `latency_ms` (median per batch), each optional.
        model: The same for the compressed model.
        dataset: Where the metrics come from: `name` (for display), `hub_id` (the Hub dataset id, or None for local
            data), `config`, `split`, `num_examples`.
        latency: How latency was measured (a `measure_latency` result minus the timings): `device`, `device_name`,
            `torch_threads`, `batch_size`, `sequence_length`, `repeats`, `warmup`.
        task: The pipeline task (`text-classification`, ...).

    Returns:
        `{"task", "dataset", "latency", "teacher", "student", "speedup", "parameter_ratio", "size_ratio",
        "metrics_retained"}`; ratios are student / teacher, `speedup` teacher latency / student latency, and an
        entry is `None` when a side lacks the number.
    """

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return numerator / denominator if numerator is not None and denominator else None

    reference_metrics, model_metrics = reference.get("metrics", {}), model.get("metrics", {})
    return {
        "task": task,
        "dataset": dict(dataset or {}),
        "latency": dict(latency or {}),
        "teacher": dict(reference),
        "student": dict(model),
        "speedup": ratio(reference.get("latency_ms"), model.get("latency_ms")),
        "parameter_ratio": ratio(model.get("parameters"), reference.get("parameters")),
        "size_ratio": ratio(model.get("size_bytes"), reference.get("size_bytes")),
        "metrics_retained": {name: ratio(model_metrics[name], reference_metrics.get(name)) for name in model_metrics},
    }
