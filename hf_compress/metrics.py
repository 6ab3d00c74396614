"""Evaluating classifiers offline: a model's logits on a dataset, and metrics from `evaluate` or packaged copies.

`predict_logits` runs a model over batches (keeping only the inputs its `forward` takes); `accuracy`, `f1`,
`compute_classification_metrics` and `build_compute_metrics` (for `Trainer`) score the predictions.

`evaluate.load("accuracy")` fetches the metric's script from the Hub the first time, which fails (slowly) without a
network. hf-compress uses `evaluate` only for a metric that is already local (a path to a metric script, or one in
`evaluate`'s module cache) and otherwise its own implementation of the same formula, so evaluation never depends on a
silent download. `evaluate` is an optional dependency (`pip install "hf-compress[evaluate]"`): without it the packaged
metrics are used, and only a local metric script needs it.

Example:
    ```python
    from hf_compress import build_compute_metrics

    trainer = Trainer(..., compute_metrics=build_compute_metrics(("accuracy", "f1")))
    ```
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import EvalPrediction
from transformers.utils import logging

logger = logging.get_logger(__name__)

MetricFn = Callable[..., dict[str, float]]


def accuracy(predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray) -> dict[str, float]:
    """The fraction of predictions equal to their reference, as `{"accuracy": value}`."""
    predictions, references = _as_arrays(predictions, references)
    return {"accuracy": float((predictions == references).mean())}


def f1(
    predictions: Sequence[int] | np.ndarray,
    references: Sequence[int] | np.ndarray,
    average: str = "binary",
    pos_label: int = 1,
) -> dict[str, float]:
    """F1 score (as `evaluate`'s and scikit-learn's `f1_score`), as `{"f1": value}`.

    Args:
        predictions: Predicted class ids.
        references: True class ids.
        average: `"binary"` (F1 of `pos_label`), `"macro"` (unweighted mean over classes), `"micro"` (from the
            total counts, equal to accuracy for single-label data) or `"weighted"` (mean weighted by class support).
        pos_label: The positive class for `average="binary"`.

    Returns:
        `{"f1": value}`; a class with no predicted and no true examples counts as F1 0, as in scikit-learn.
    """
    predictions, references = _as_arrays(predictions, references)
    if average == "binary":
        return {"f1": _f1_of(predictions == pos_label, references == pos_label)}
    classes = np.union1d(predictions, references)
    if average == "micro":
        return {"f1": float((predictions == references).mean())}
    scores = np.array([_f1_of(predictions == c, references == c) for c in classes])
    if average == "macro":
        return {"f1": float(scores.mean())}
    if average == "weighted":
        support = np.array([(references == c).sum() for c in classes], dtype=float)
        return {"f1": float((scores * support).sum() / support.sum())}
    raise ValueError(f"Unknown F1 average {average!r}. Valid values: 'binary', 'macro', 'micro', 'weighted'.")


def _f1_of(predicted: np.ndarray, actual: np.ndarray) -> float:
    true_positives = float(np.logical_and(predicted, actual).sum())
    denominator = float(predicted.sum() + actual.sum())
    return 2 * true_positives / denominator if denominator else 0.0


def _as_arrays(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    predictions, references = np.asarray(predictions).reshape(-1), np.asarray(references).reshape(-1)
    if predictions.shape != references.shape or predictions.size == 0:
        raise ValueError(
            f"predictions and references must be non-empty and of equal length, got {predictions.size} and "
            f"{references.size}."
        )
    return predictions, references


_PACKAGED: dict[str, MetricFn] = {"accuracy": accuracy, "f1": f1}


def load_metric(name_or_path: str) -> MetricFn:
    """A metric function `(predictions, references, **kwargs) -> dict`, never downloading anything.

    Args:
        name_or_path: A metric name (`"accuracy"`, `"f1"`) or a local `evaluate` metric script / folder.

    Returns:
        `evaluate`'s implementation when the metric is local (a path, or a name in `evaluate`'s module cache),
        otherwise hf-compress's packaged implementation.

    Raises:
        ValueError: for a metric that is neither local nor packaged.
        ImportError: for a local metric script when `evaluate` is not installed.
    """
    if Path(name_or_path).exists() or _in_evaluate_cache(name_or_path):
        evaluate = _import_evaluate(name_or_path)
        from datasets import DownloadConfig

        # local_files_only: a cached module is used as is, never refreshed from the Hub.
        module = evaluate.load(name_or_path, download_config=DownloadConfig(local_files_only=True))
        logger.info("Using evaluate's %s metric from %s.", module.name, name_or_path)
        return module.compute
    if name_or_path in _PACKAGED:
        return _PACKAGED[name_or_path]
    raise ValueError(
        f"The metric {name_or_path!r} is neither packaged with hf-compress ({', '.join(_PACKAGED)}) nor available "
        "locally to `evaluate`. Pass a path to an evaluate metric script, or run `evaluate.load(name)` once while "
        "online so that it is cached."
    )


def _import_evaluate(metric: str):
    try:
        import evaluate
    except ImportError:
        raise ImportError(
            f"The metric {metric!r} is an `evaluate` metric script, and `evaluate` is not installed. Install it with "
            '`pip install "hf-compress[evaluate]"`, or use a packaged metric (' + ", ".join(_PACKAGED) + ")."
        ) from None
    return evaluate


def _in_evaluate_cache(name: str) -> bool:
    # Without `evaluate` installed nothing is in its cache: the packaged implementation is used.
    if "/" in name or not name or importlib.util.find_spec("evaluate") is None:
        return False
    from evaluate import config

    cached = Path(config.HF_MODULES_CACHE) / config.MODULE_NAME_FOR_DYNAMIC_MODULES / "metrics"
    return (cached / f"evaluate-metric--{name}").is_dir()


def compute_classification_metrics(
    predictions: Sequence[int] | np.ndarray,
    references: Sequence[int] | np.ndarray,
    metrics: Sequence[str] = ("accuracy", "f1"),
    num_labels: int | None = None,
) -> dict[str, float]:
    """Compute several metrics at once; F1 is binary for two classes and macro-averaged for more.

    Args:
        predictions: Predicted class ids.
        references: True class ids.
        metrics: Metric names or local `evaluate` metric paths (see `load_metric`).
        num_labels: The number of classes (decides binary vs macro F1); by default inferred from the data.

    Returns:
        The merged results, e.g. `{"accuracy": 0.91, "f1": 0.92}`.

    Example:
        ```python
        >>> compute_classification_metrics([1, 0, 1, 1], [1, 0, 0, 1])
        {'accuracy': 0.75, 'f1': 0.8}
        ```
    """
    return _compute({name: load_metric(name) for name in metrics}, predictions, references, num_labels)


def _compute(
    resolved: dict[str, MetricFn],
    predictions: Sequence[int] | np.ndarray,
    references: Sequence[int] | np.ndarray,
    num_labels: int | None,
) -> dict[str, float]:
    if num_labels is None:
        num_labels = int(max(np.max(predictions), np.max(references))) + 1
    results: dict[str, float] = {}
    for name, metric in resolved.items():
        kwargs = {"average": "binary" if num_labels <= 2 else "macro"} if Path(name).name == "f1" else {}
        computed = metric(predictions=predictions, references=references, **kwargs)
        results.update({key: float(value) for key, value in computed.items()})
    return results


def build_compute_metrics(
    metrics: Sequence[str] = ("accuracy", "f1"), num_labels: int | None = None
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` for `Trainer`/`DistillationTrainer` on single-label classification logits.

    Args:
        metrics: Metric names or local `evaluate` metric paths.
        num_labels: The number of classes (the model's `config.num_labels`).

    Returns:
        A function taking an `EvalPrediction` (logits, labels) and returning the metrics.
    """
    # Resolved once: a missing metric fails before training, and evaluate modules are not reloaded per evaluation.
    resolved = {name: load_metric(name) for name in metrics}

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return _compute(resolved, np.asarray(logits).argmax(-1), prediction.label_ids, num_labels)

    return compute_metrics


#### Predictions


def model_inputs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `batch` that `model.forward` names, on the model's device, without `labels`.

    A tokenizer's or collator's batch may hold more than a model takes: a DistilBERT student has no
    `token_type_ids`, and `labels` would make the model compute a loss nobody reads.
    """
    accepted = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items() if key in accepted and key != "labels"}


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits of `model` on every batch, and the batches' labels, in order.

    The model runs in eval mode under `torch.inference_mode()` and is returned to its previous mode; each batch
    goes through `model_inputs` (the inputs its `forward` takes, moved to its device).

    Args:
        model: A classifier whose output has `.logits` of shape (batch, num_labels).
        batches: E.g. a `DataLoader` with a `DataCollatorWithPadding`, or a list of tokenizer outputs.
        desc: Show a progress bar with this description.

    Returns:
        `(logits, labels)` on CPU: logits of shape (examples, num_labels), labels of shape (examples,), or None when
        the batches have no `labels`.

    Example:
        ```python
        loader = DataLoader(eval_dataset, batch_size=64, collate_fn=DataCollatorWithPadding(tokenizer))
        logits, labels = predict_logits(model, loader)
        accuracy(logits.argmax(-1), labels)  # {'accuracy': 0.91}
        ```
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for batch in tqdm(batches, desc=desc, disable=desc is None):
            logits.append(model(**model_inputs(model, batch)).logits.float().cpu())
            if "labels" in batch:
                labels.append(batch["labels"].cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels) if labels else None
