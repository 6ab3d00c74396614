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
import json
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

from ..architectures import supported_model_types
from ..report import format_bytes
from ..structure import get_structure, stock_class
from .comparison import describe_model
from .onnx_runtime import DYNAMIC_INT8_FILE, EXPORT_INFO_FILE, ONNX_FILE, STATIC_INT8_FILE

__all__ = ["ONNX_FILE_DESCRIPTIONS", "TEMPLATE_PATH", "create_model_card", "read_onnx_export"]

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
# What each graph of an `export_onnx` folder is (the card's ONNX table, `hf-compress export`'s summary).
ONNX_FILE_DESCRIPTIONS = {
    ONNX_FILE: "fp32 graph",
    DYNAMIC_INT8_FILE: "int8, dynamic quantization (int8 weights, activations quantized per batch)",
    STATIC_INT8_FILE: "int8, static quantization (int8 weights and activations, activation scales calibrated on "
    "sample text)",
}
# Where `push_compressed_to_hub` puts the ONNX files in the repository, and the card's paths when `onnx_dir` is not
# inside the card's folder.
ONNX_SUBFOLDER = "onnx"
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
    onnx_dir: str | os.PathLike | None = None,
    onnx_results: Mapping[str, Mapping[str, float]] | None = None,
    onnx_latency: Mapping[str, Any] | None = None,
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
        onnx_dir: A folder written by `export_onnx` whose graphs the card lists (file, what it is, size, largest
            difference from PyTorch measured at export) with a snippet to run them. Paths are shown relative to
            `output_dir` when the folder is inside it, otherwise under `onnx/` (where `push_compressed_to_hub` uploads
            them). Adds the `onnx` tag.
        onnx_results: What you measured per graph, e.g. `{"model.onnx": {"accuracy": 0.91, "latency_ms": 8.2},
            "model_int8_dynamic.onnx": {"accuracy": 0.90, "latency_ms": 3.1}}`: metric names (shown to 4 decimals),
            `latency_ms` (median per batch) and `speedup` (e.g. `compare_latency(...).speedups[name].median`). Only
            what is given is shown; a graph without a number gets "not measured".
        onnx_latency: How the ONNX latencies were measured (`describe_latency(result, inputs)` of the
            `compare_latency` run, or a mapping with `batch_size`, `sequence_length`, `device_name`, `torch_threads`
            / `threads`), for the sentence under the table.
        template_path: Another Jinja template; default `hf_compress/deploy/templates/model_card.md`.

    Returns:
        The written `ModelCard`, or `None` on a non-main process.

    Raises:
        ValueError: if the resulting metadata does not parse back (e.g. a malformed result), or for `onnx_dir` /
            `onnx_results` that do not describe an export (no `onnx_export.json`, results for files it lacks).

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

    onnx = _onnx_section(output_dir, onnx_dir, onnx_results, onnx_latency, repo_id or model_name)
    methods = [name for name, settings in (("distillation", distillation), ("pruning", pruning)) if settings]
    metrics = student.get("metrics", {})
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        tags=_unique(["hf-compress", *methods, *(["onnx"] if onnx else []), *(tags or [])]),
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
        onnx=onnx,
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


#### ONNX files


def read_onnx_export(
    onnx_dir: str | os.PathLike, model: PreTrainedModel | None = None, name: str = "onnx_dir"
) -> tuple[dict[str, Any], list[Path]]:
    """What `export_onnx` recorded in a folder (`onnx_export.json`) and its graphs (`model*.onnx`), checked.

    Args:
        onnx_dir: The export folder.
        model: When given, the export must be of this model: the same architecture and, for a registered one, the
            same heads and FFN neurons per layer (the weights themselves are not compared).
        name: The argument's name, for the messages.

    Raises:
        ValueError: for a folder without `onnx_export.json` or `model.onnx`, or the export of another model.
    """
    folder = Path(onnx_dir)
    info_path = folder / EXPORT_INFO_FILE
    if not folder.is_dir() or not info_path.is_file() or not (folder / ONNX_FILE).is_file():
        raise ValueError(
            f"{name}={os.fspath(onnx_dir)!r} is not an ONNX export (a folder with {ONNX_FILE} and "
            f"{EXPORT_INFO_FILE}); write one with `export_onnx(model, folder)` or `hf-compress export`."
        )
    info = json.loads(info_path.read_text())
    if model is not None:
        architecture = stock_class(type(model)).__name__
        if info.get("architecture") not in (None, architecture):
            raise ValueError(
                f"{name}={os.fspath(onnx_dir)!r} holds an export of a {info['architecture']}, not of this "
                f"{architecture}; export this model (`export_onnx(model, folder)`) and pass that folder."
            )
        exported = info.get("structure")
        if exported is not None and model.config.model_type in supported_model_types():
            structure = get_structure(model).to_dict()
            if exported != structure:
                raise ValueError(
                    f"{name}={os.fspath(onnx_dir)!r} holds an export of another model: its heads per layer "
                    f"{exported.get('heads')} and FFN neurons {exported.get('ffn')} are not this model's "
                    f"{structure['heads']} and {structure['ffn']}. Export this model again and pass that folder."
                )
    graphs = sorted(folder.glob("model*.onnx"), key=lambda path: (path.name != ONNX_FILE, path.name))
    return info, graphs


def _onnx_section(
    output_dir: Path,
    onnx_dir: str | os.PathLike | None,
    results: Mapping[str, Mapping[str, float]] | None,
    latency: Mapping[str, Any] | None,
    repo_id: str,
) -> dict[str, Any] | None:
    """The template's `onnx` variable: the graphs' table, the notes under it and the snippet's values."""
    if onnx_dir is None:
        if results or latency:
            raise ValueError("onnx_results and onnx_latency describe ONNX files: pass their folder as onnx_dir too.")
        return None
    info, graphs = read_onnx_export(onnx_dir)
    names = [graph.name for graph in graphs]
    results = {Path(file).name: dict(values) for file, values in (results or {}).items()}
    unknown = sorted(set(results) - set(names))
    if unknown:
        raise ValueError(f"onnx_results names {unknown}, which {os.fspath(onnx_dir)!r} does not hold; it has {names}.")
    for file, values in results.items():
        bad = {
            key: value
            for key, value in values.items()
            if isinstance(value, bool) or not isinstance(value, (int, float))
        }
        if bad:
            raise ValueError(f"onnx_results[{file!r}] has values that are not numbers: {bad}.")
    metric_names = _unique(
        [key for values in results.values() for key in values if key not in ("latency_ms", "speedup")]
    )
    has_latency = any("latency_ms" in values for values in results.values())
    has_speedup = any("speedup" in values for values in results.values())
    columns = [name.replace("_", " ").capitalize() for name in metric_names]
    columns += ["Latency per batch"] * has_latency + ["Speed-up"] * has_speedup

    folder = Path(onnx_dir).resolve()
    try:
        prefix = folder.relative_to(output_dir.resolve()).as_posix()
    except ValueError:
        prefix = ONNX_SUBFOLDER
    prefix = "" if prefix == "." else prefix
    int8_diffs = info.get("int8_max_abs_diff") or {}
    diffs = {ONNX_FILE: info.get("max_abs_diff"), DYNAMIC_INT8_FILE: int8_diffs.get("dynamic")}
    diffs[STATIC_INT8_FILE] = int8_diffs.get("static")
    rows = []
    for graph in graphs:
        measured = results.get(graph.name, {})
        cells = [f"{measured[name]:.4f}" if name in measured else "not measured" for name in metric_names]
        if has_latency:
            cells.append(f"{measured['latency_ms']:.1f} ms" if "latency_ms" in measured else "not measured")
        if has_speedup:
            cells.append(f"{measured['speedup']:.2f}x" if "speedup" in measured else "not measured")
        data = graph.with_name(graph.name + ".data")
        diff = diffs.get(graph.name)
        rows.append(
            {
                "path": f"{prefix}/{graph.name}" if prefix else graph.name,
                "what": ONNX_FILE_DESCRIPTIONS.get(graph.name, "ONNX graph"),
                "size": format_bytes(graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)),
                "diff": "not measured" if diff is None else f"{diff:.1e}",
                "cells": cells,
            }
        )
    inputs, outputs = info.get("inputs") or [], info.get("outputs") or []
    export_line = ", ".join(
        part
        for part in (
            f"`{info['exporter']}`" if info.get("exporter") else "",
            f"opset {info['opset']}" if info.get("opset") else "",
            f"torch {info['torch_version']}" if info.get("torch_version") else "",
        )
        if part
    )
    example = DYNAMIC_INT8_FILE if DYNAMIC_INT8_FILE in names else ONNX_FILE
    return {
        "folder": prefix,
        "patterns": f"{prefix}/*" if prefix else "*",
        "path_expression": f'f"{{folder}}/{prefix}"' if prefix else "folder",
        "export_line": export_line,
        "columns": columns,
        "rows": rows,
        "latency_sentence": _onnx_latency_sentence(latency) if has_latency else "",
        "example_file": example,
        "inputs": ", ".join(f"`{name}`" for name in inputs),
        "outputs": ", ".join(f"`{name}`" for name in outputs),
        "repo_id": repo_id,
    }


def _onnx_latency_sentence(latency: Mapping[str, Any] | None) -> str:
    """How the ONNX latencies were measured, from what was recorded (nothing is assumed)."""
    if not latency:
        return "Latency is the median time per batch as measured by the uploader; the setting was not recorded."
    text = "Latency is the median time per batch"
    batch, length = latency.get("batch_size"), latency.get("sequence_length")
    if batch is not None and length is not None:
        text += f" of {batch} sequences of {length} tokens"
    device = latency.get("device_name") or latency.get("device")
    if device:
        text += f" on {device}"
    threads = latency.get("threads") or latency.get("torch_threads")
    if threads:
        text += f" with {threads} threads"
    if latency.get("method") == "interleaved" and latency.get("rounds"):
        text += f", the graphs timed interleaved over {latency['rounds']} rounds"
    text += "."
    if latency.get("noisy"):
        text += " The timings were noisy (the spread of some exceeded the threshold); treat the differences as rough."
    return text


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
        speedup, interval = comparison.get("speedup"), comparison.get("speedup_interval")
        reference_latency = reference.get("latency_ms")
        change = "" if speedup is None else f"{speedup:.2f}x faster"
        if speedup is not None and interval:
            change += f" ({interval[0]:.2f}-{interval[1]:.2f}x in 80% of rounds)"
        rows.append(
            {
                "quantity": "Latency per batch",
                "reference": "" if reference_latency is None else f"{reference_latency:.1f} ms",
                "model": f"{model['latency_ms']:.1f} ms",
                "change": change,
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
    if speedup and not comparison.get("latency", {}).get("noisy"):  # a noisy speed-up is only in the table, qualified
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
    if latency.get("method") != "interleaved":
        return text + ", measured in the same run for both models."
    text += (
        f", both models timed interleaved (one call of each per round, {latency['rounds']} rounds)"
        if latency.get("rounds")
        else ", both models timed interleaved (one call of each per round)"
    )
    text += "; the speed-up is the median of the per-round ratios."
    if latency.get("noisy"):
        threshold = latency.get("max_relative_iqr")
        text += (
            " **The timings were noisy**: the spread of the middle half of the rounds exceeded "
            + (f"{threshold:.0%} of the median" if threshold is not None else "the threshold")
            + ", so the speed-up is rough; re-measure on an idle machine."
        )
    return text


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
