"""Model cards for compressed models: what was done, what it costs and gains, and how to load the result.

The rendering half of a card; the numbers it shows are measured in `hf_compress.deploy.comparison`.
`create_model_card(output_dir, model, ...)` renders `hf_compress/deploy/templates/model_card.md` (a Jinja template, through
`huggingface_hub.ModelCard.from_template`) with facts from the run and writes `README.md`:

- metadata the Hub understands: `library_name: transformers`, the `hf-compress` tag, `base_model` (the teacher, when it
  is a Hub id), datasets, metrics, `pipeline_tag`, and the model's results as `model-index` (`EvalResult`s);
- the comparison with the teacher/original model (metrics, parameters, size on disk, latency, speed-up, device), the
  distillation settings and pruning plan, the layers/heads/FFN neurons kept, how to load the model (with or without
  `trust_remote_code`), intended use and limitations.

The comparison is the JSON that `build_comparison` returns (and that the example saves as `comparison.json`). An
existing `README.md` is updated, not replaced: its metadata is merged (the run's values win, tags are united) and its
text is kept; only the section between the `hf-compress:card` markers is regenerated.

The card's metadata is checked offline by parsing it back (`ModelCardData` raises on a malformed `model-index`).
`ModelCard.validate()` would also check it against the Hub's rules, but it is a request to the Hub; the Hub applies the
same rules when the card is uploaded.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import PartialState
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PreTrainedModel

from ..report import format_bytes
from .comparison import COMPARISON_FILE, describe_model

# COMPARISON_FILE lives in `comparison`; it is also importable from here, where the card's callers look for it.
__all__ = ["COMPARISON_FILE", "TEMPLATE_PATH", "create_model_card"]

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
_START, _END = "<!-- hf-compress:card:start", "<!-- hf-compress:card:end -->"
_TASK_NAMES = {
    "text-classification": "Text Classification",
    "token-classification": "Token Classification",
    "question-answering": "Question Answering",
    "fill-mask": "Fill-Mask",
    "multiple-choice": "Multiple Choice",
    "feature-extraction": "Feature Extraction",
}
_AUTO_CLASSES = {
    "ForSequenceClassification": ("AutoModelForSequenceClassification", "text-classification"),
    "ForTokenClassification": ("AutoModelForTokenClassification", "token-classification"),
    "ForQuestionAnswering": ("AutoModelForQuestionAnswering", "question-answering"),
    "ForMaskedLM": ("AutoModelForMaskedLM", "fill-mask"),
    "ForMultipleChoice": ("AutoModelForMultipleChoice", None),
}


#### The card


def create_model_card(
    output_dir: str | os.PathLike,
    model: PreTrainedModel | None = None,
    *,
    base_model: str | None = None,
    comparison: Mapping[str, Any] | None = None,
    distillation: Mapping[str, Any] | None = None,
    pruning: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    task: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: Sequence[str] | None = None,
    intended_use: str | None = None,
    template_path: str | os.PathLike | None = None,
) -> ModelCard | None:
    """Write (or update) `output_dir/README.md`: a model card for a compressed model, filled from the run.

    Only the main process writes (under `accelerate launch`/`torchrun` the others return `None`).

    Args:
        output_dir: The folder with the saved model; the card goes to `README.md` there.
        model: The compressed model (its class, structure and whether it needs custom code). Default: the config saved
            in `output_dir`, with the structure taken from `comparison`.
        base_model: The teacher/original model's Hub id or path; a Hub id also becomes the `base_model` metadata.
        comparison: The `build_comparison` result: metrics, parameters, size, latency, device of both models.
        distillation: Distillation settings to list, e.g. `{"temperature": 4.0, "alpha": 0.5, "losses": "..."}`.
        pruning: The pruning plan to list, e.g. `{"heads removed": 24, "FFN neurons removed": 3072}`.
        dataset: The dataset's Hub id (e.g. `"glue"`) for the `datasets` metadata and `model-index`; default
            `comparison["dataset"]["hub_id"]`. Local data is named by `comparison["dataset"]["name"]` only.
        dataset_config: The dataset configuration (e.g. `"sst2"`).
        task: The pipeline task; default from the model's head (`text-classification` for sequence classification).
        model_name: The card's title and `model-index` name; default the folder's name.
        repo_id: The Hub id used in the loading snippets; default `model_name`.
        language, license: Card metadata.
        tags: Extra tags; `hf-compress` and `distillation`/`pruning` are always added.
        intended_use: A paragraph on intended use; a default derived from the task and teacher otherwise.
        template_path: Another Jinja template; default `hf_compress/deploy/templates/model_card.md`.

    Returns:
        The written `ModelCard`, or `None` on a non-main process.

    Raises:
        ValueError: if the resulting metadata does not parse back (e.g. a malformed result).

    Example:
        ```python
        card = create_model_card(
            "out/student", student, base_model="textattack/bert-base-uncased-SST-2", comparison=comparison,
            distillation={"temperature": 4.0, "alpha": 0.5}, dataset="glue", dataset_config="sst2",
        )
        ```
    """
    if not PartialState().is_main_process:
        return None
    output_dir = Path(output_dir)
    comparison = dict(comparison or {})
    student, teacher = comparison.get("student", {}), comparison.get("teacher", {})
    config = model.config if model is not None else transformers.AutoConfig.from_pretrained(output_dir)
    class_name = type(model).__name__ if model is not None else (config.architectures or ["PreTrainedModel"])[0]
    auto_class, default_task = next(
        (value for suffix, value in _AUTO_CLASSES.items() if class_name.endswith(suffix)), ("AutoModel", None)
    )
    task = task or comparison.get("task") or default_task or "feature-extraction"
    model_name = model_name or output_dir.resolve().name
    base_model = base_model or teacher.get("name_or_path")
    dataset_info = comparison.get("dataset", {})
    dataset = dataset or dataset_info.get("hub_id")
    dataset_name = dataset_info.get("name") or dataset
    dataset_config = dataset_config or dataset_info.get("config")
    structure = describe_model(model, measure_size=False).get("structure") if model is not None else None
    structure = structure or student.get("structure")

    methods = [name for name, settings in (("distillation", distillation), ("pruning", pruning)) if settings]
    metrics = student.get("metrics", {})
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        tags=_unique(["hf-compress", *methods, *(tags or [])]),
        base_model=base_model if _is_hub_id(base_model) else None,
        datasets=[dataset] if dataset else None,
        metrics=list(metrics) or None,
        pipeline_tag=task if task in _TASK_NAMES and auto_class != "AutoModel" else None,
        model_name=model_name if metrics else None,
        eval_results=_eval_results(metrics, task, dataset or dataset_name, dataset_config, dataset_info)
        if metrics
        else None,
    )
    reference_label = "Teacher" if distillation else "Original"
    dataset_description = " ".join(part for part in (dataset_name, dataset_config) if part) or None
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path or TEMPLATE_PATH),
        model_name=model_name,
        summary=_summary(model_name, base_model, task, methods, comparison),
        reference_label=reference_label,
        comparison_rows=_comparison_rows(comparison),
        eval_dataset_description=_eval_description(dataset_description, dataset_info),
        latency_sentence=_latency_sentence(comparison),
        base_model_link=_link(base_model) if base_model else "an unnamed model",
        distillation_items=_items(distillation),
        pruning_items=_items(pruning),
        structure_rows=_structure_rows(teacher.get("structure"), structure),
        structure_has_reference=bool(teacher.get("structure")),
        needs_remote_code=bool(getattr(config, "auto_map", None)),
        auto_class=auto_class,
        pipeline_tag=card_data.pipeline_tag,
        repo_id=repo_id or model_name,
        architecture=class_name,
        dataset_description=dataset_description,
        intended_use=intended_use or _default_intended_use(task, base_model),
        versions=_versions(),
    )
    # Optional sections leave runs of blank lines behind; Markdown renders one the same.
    card.text = re.sub(r"\n{3,}", "\n\n", card.text)
    card = _merge_with_existing(card, output_dir / "README.md")
    # Parsing the text back re-validates the metadata (model-index included) exactly as a reader of the file would.
    card = ModelCard(str(card))
    card.save(output_dir / "README.md")
    return card


def _eval_results(
    metrics: Mapping[str, float],
    task: str,
    dataset: str | None,
    dataset_config: str | None,
    dataset_info: Mapping[str, Any],
) -> list[EvalResult]:
    dataset = dataset or "custom"
    return [
        EvalResult(
            task_type=task,
            task_name=_TASK_NAMES.get(task, task),
            dataset_type=dataset,
            dataset_name=" ".join(part for part in (dataset, dataset_config) if part),
            dataset_config=dataset_config,
            dataset_split=dataset_info.get("split"),
            metric_type=name,
            metric_name=name.replace("_", " ").capitalize(),
            metric_value=round(float(value), 4),
        )
        for name, value in metrics.items()
    ]


def _merge_with_existing(card: ModelCard, path: Path) -> ModelCard:
    """`card`, keeping an existing README's text outside our markers and its metadata where ours has none."""
    if not path.is_file():
        return card
    existing = ModelCard.load(path)
    metadata = existing.data.to_dict()
    new = card.data.to_dict()
    tags = _unique([*(metadata.get("tags") or []), *(new.get("tags") or [])])
    metadata.update(new)
    metadata["tags"] = tags
    section = card.text.strip()
    text = existing.text
    if _START in text and _END in text:
        before, rest = text.split(_START, 1)
        after = rest.split(_END, 1)[1]
        body = f"{before}{section}{after}"
    else:
        body = f"\n{section}\n\n{text.lstrip()}"
    return ModelCard(f"---\n{ModelCardData(**metadata).to_yaml()}\n---\n{body}")


#### Text helpers


def _is_hub_id(name: str | None) -> bool:
    if not name or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _link(name: str) -> str:
    return f"[{name}](https://huggingface.co/{name})" if _is_hub_id(name) else f"`{_display_name(name)}`"


def _display_name(name: str) -> str:
    # A local path says nothing to a reader of the card on the Hub; its last component is the model's name.
    return name if _is_hub_id(name) else Path(name).name or name


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _items(settings: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    return [(str(key).replace("_", " ").capitalize(), _format_value(value)) for key, value in (settings or {}).items()]


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(item) for item in value)
    if isinstance(value, Mapping):
        return "; ".join(f"{key}: {_format_value(item)}" for key, item in value.items())
    return str(value)


def _human_count(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e6 else f"{count / 1e3:.1f}K" if count >= 1e3 else str(count)


def _comparison_rows(comparison: Mapping[str, Any]) -> list[dict[str, str]]:
    reference, model = comparison.get("teacher", {}), comparison.get("student", {})
    rows = []
    for name, value in model.get("metrics", {}).items():
        reference_value = reference.get("metrics", {}).get(name)
        retained = comparison.get("metrics_retained", {}).get(name)
        rows.append(
            {
                "quantity": name.replace("_", " ").capitalize(),
                "reference": "" if reference_value is None else f"{reference_value:.4f}",
                "model": f"{value:.4f}",
                "change": "" if retained is None else f"{retained:.1%} retained",
            }
        )
    for key, label, fmt, ratio_key in (
        ("parameters", "Parameters", _human_count, "parameter_ratio"),
        ("size_bytes", "Size on disk", format_bytes, "size_ratio"),
    ):
        if model.get(key) is not None:
            ratio = comparison.get(ratio_key)
            rows.append(
                {
                    "quantity": label,
                    "reference": fmt(reference[key]) if reference.get(key) is not None else "",
                    "model": fmt(model[key]),
                    "change": "" if ratio is None else f"{ratio - 1:+.1%}",
                }
            )
    if model.get("latency_ms") is not None:
        speedup = comparison.get("speedup")
        reference_latency = reference.get("latency_ms")
        rows.append(
            {
                "quantity": "Latency per batch",
                "reference": "" if reference_latency is None else f"{reference_latency:.1f} ms",
                "model": f"{model['latency_ms']:.1f} ms",
                "change": "" if speedup is None else f"{speedup:.2f}x faster",
            }
        )
    return rows


def _structure_rows(reference: Mapping[str, Any] | None, model: Mapping[str, Any] | None) -> list[dict[str, str]]:
    if not model:
        return []
    reference = reference or {}

    def per_layer(values: Sequence[int] | None) -> str:
        if not values:
            return ""
        return f"{values[0]} per layer" if len(set(values)) == 1 else ", ".join(map(str, values))

    return [
        {"quantity": "Layers", "reference": str(reference.get("layers", "")), "model": str(model["layers"])},
        {
            "quantity": "Attention heads",
            "reference": per_layer(reference.get("heads_per_layer")),
            "model": per_layer(model["heads_per_layer"]),
        },
        {
            "quantity": "FFN neurons",
            "reference": per_layer(reference.get("ffn_neurons_per_layer")),
            "model": per_layer(model["ffn_neurons_per_layer"]),
        },
    ]


def _summary(
    model_name: str, base_model: str | None, task: str, methods: list[str], comparison: Mapping[str, Any]
) -> str:
    source = _link(base_model) if base_model else "a larger model"
    how = " and ".join({"distillation": "knowledge distillation", "pruning": "structured pruning"}[m] for m in methods)
    text = f"A compressed version of {source} for {_TASK_NAMES.get(task, task).lower()}"
    text += f", made by {how}." if how else "."
    facts = []
    parameter_ratio, speedup = comparison.get("parameter_ratio"), comparison.get("speedup")
    if parameter_ratio:
        facts.append(f"{parameter_ratio:.0%} of the parameters")
    if speedup:
        device = comparison.get("latency", {}).get("device_name") or comparison.get("latency", {}).get("device")
        facts.append(f"{speedup:.2f}x the speed" + (f" on {device}" if device else ""))
    for name, retained in comparison.get("metrics_retained", {}).items():
        if retained is not None:
            facts.append(f"{retained:.1%} of the {name}")
            break
    if facts:
        text += f" It has {', '.join(facts[:-1]) + ' and ' + facts[-1] if len(facts) > 1 else facts[0]}"
        text += " of the original." if not base_model else f" of {_display_name(base_model)}."
    return text


def _eval_description(dataset_description: str | None, dataset_info: Mapping[str, Any]) -> str:
    text = f"the {dataset_info.get('split', 'evaluation')} split of {dataset_description or 'the dataset'}"
    if dataset_info.get("num_examples"):
        text += f" ({dataset_info['num_examples']} examples)"
    return text


def _latency_sentence(comparison: Mapping[str, Any]) -> str:
    """How latency was measured, from what was recorded; a card never publishes a placeholder for what was not."""
    if comparison.get("student", {}).get("latency_ms") is None:
        return ""
    latency = comparison.get("latency", {})
    batch, length = latency.get("batch_size"), latency.get("sequence_length")
    text = "Latency is the median time of one forward pass"
    if batch is not None and length is not None:
        text += f" over a batch of {batch} sequences of {length} tokens"
    elif batch is not None:
        text += f" over a batch of {batch} sequences"
    elif length is not None:
        text += f" over sequences of {length} tokens"
    device = latency.get("device_name") or latency.get("device")
    if device:
        text += f" on {device}"
    if latency.get("torch_threads"):
        text += f" with {latency['torch_threads']} torch threads"
    return text + ", measured in the same run for both models."


def _default_intended_use(task: str, base_model: str | None) -> str:
    source = _link(base_model) if base_model else "the original model"
    return (
        f"{_TASK_NAMES.get(task, task).capitalize()} on text like the training data, where {source} would be used but a "
        "smaller or "
        "faster model is needed (CPU serving, high throughput, lower cost)."
    )


def _versions() -> list[tuple[str, str]]:
    try:
        hf_compress_version = importlib.metadata.version("hf-compress")
    except importlib.metadata.PackageNotFoundError:
        hf_compress_version = "unknown"
    return [
        ("hf-compress", hf_compress_version),
        ("transformers", transformers.__version__),
        ("torch", torch.__version__),
    ]
