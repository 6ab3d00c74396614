"""Offline metrics and predictions (metrics.py) and latency measurement (latency.py)."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_model
from transformers import EvalPrediction

from hf_compress import measure_latency
from hf_compress.deploy.latency import device_name
from hf_compress.metrics import (
    accuracy,
    build_compute_metrics,
    compute_classification_metrics,
    f1,
    load_metric,
    model_inputs,
    predict_logits,
)

PREDICTIONS = [0, 1, 2, 2, 1, 0, 2, 1]
REFERENCES = [0, 2, 2, 2, 1, 1, 0, 1]


def test_accuracy_and_binary_f1_by_hand():
    assert accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75}
    # tp=2, fp=1, fn=0 -> 2*2 / (2*2 + 1 + 0)
    assert f1([1, 0, 1, 1], [1, 0, 0, 1]) == {"f1": pytest.approx(0.8)}
    assert f1([0, 0], [0, 0]) == {"f1": 0.0}


def test_multiclass_f1_averages_by_hand():
    # Per class (tp, predicted, actual): 0 -> (1, 2, 2), 1 -> (2, 3, 3), 2 -> (2, 3, 3).
    per_class = np.array([2 * 1 / 4, 2 * 2 / 6, 2 * 2 / 6])
    assert f1(PREDICTIONS, REFERENCES, average="macro")["f1"] == pytest.approx(per_class.mean())
    assert f1(PREDICTIONS, REFERENCES, average="weighted")["f1"] == pytest.approx((per_class * [2, 3, 3]).sum() / 8)
    assert f1(PREDICTIONS, REFERENCES, average="micro")["f1"] == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="Unknown F1 average 'samples'"):
        f1(PREDICTIONS, REFERENCES, average="samples")
    with pytest.raises(ValueError, match="equal length, got 2 and 3"):
        accuracy([1, 0], [1, 0, 1])


def test_compute_metrics_for_trainer_picks_macro_f1_for_many_classes():
    logits = np.eye(3)[PREDICTIONS] + 0.1
    compute_metrics = build_compute_metrics(("accuracy", "f1"), num_labels=3)
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array(REFERENCES)))
    assert result == {"accuracy": 5 / 8, "f1": pytest.approx(f1(PREDICTIONS, REFERENCES, average="macro")["f1"])}
    assert compute_classification_metrics([1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75, "f1": pytest.approx(0.8)}


def test_unknown_metric_fails_without_downloading():
    with pytest.raises(ValueError, match="'bleu' is neither packaged .*accuracy, f1.* nor available locally"):
        build_compute_metrics(("accuracy", "bleu"))


def test_local_evaluate_metric_script_is_used(tmp_path):
    pytest.importorskip("evaluate")
    folder = tmp_path / "exact_match_rate"
    folder.mkdir()
    (folder / "exact_match_rate.py").write_text(
        "import datasets\nimport evaluate\n\n"
        "class ExactMatchRate(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        return evaluate.MetricInfo(description='', citation='', inputs_description='',\n"
        "            features=datasets.Features({'predictions': datasets.Value('int64'),\n"
        "                                        'references': datasets.Value('int64')}))\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'exact_match_rate': sum(p == r for p, r in zip(predictions, references)) / len(predictions)}\n"
    )
    metric = load_metric(str(folder))
    assert metric(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1]) == {"exact_match_rate": 0.75}


def test_measure_latency_reports_median_and_restores_state():
    model = tiny_model("bert").train()
    previous_threads = torch.get_num_threads()
    batch = random_batch(batch_size=2, seq_len=8)
    batch.pop("labels")
    result = measure_latency(model, batch, warmup=1, repeats=3, threads=1)
    assert result["min_ms"] <= result["median_ms"] <= result["max_ms"] and result["median_ms"] > 0
    assert (result["repeats"], result["warmup"], result["torch_threads"]) == (3, 1, 1)
    # The processor's real name (what the model card shows), not the device type.
    assert (result["device"], result["device_name"]) == ("cpu", device_name("cpu"))
    assert (result["batch_size"], result["sequence_length"]) == (2, 8)
    assert model.training and torch.get_num_threads() == previous_threads
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(model, batch, repeats=0)
    with pytest.raises(ValueError, match="threads=0"):
        measure_latency(model, batch, threads=0)


def test_measure_latency_counts_every_call():
    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            calls.append(torch.is_inference_mode_enabled())
            return x

    measure_latency(Recorder(), {"x": torch.zeros(1)}, warmup=2, repeats=5)
    assert calls == [True] * 7


def test_metrics_work_without_evaluate(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "evaluate", None)  # as if not installed
    assert load_metric("accuracy") is accuracy and load_metric("f1") is f1
    assert build_compute_metrics(("accuracy",), num_labels=2)(
        EvalPrediction(predictions=np.eye(2)[[0, 1, 1]], label_ids=np.array([0, 1, 0]))
    ) == {"accuracy": pytest.approx(2 / 3)}
    # Only a metric script needs evaluate, and the error says how to get it.
    with pytest.raises(ImportError, match=r'pip install "hf-compress\[evaluate\]"'):
        load_metric(str(tmp_path))


def test_the_library_imports_without_evaluate():
    code = "import sys; sys.modules['evaluate'] = None; import hf_compress, hf_compress.cli, hf_compress.metrics"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_predict_logits_keeps_order_labels_and_the_model_mode():
    model = tiny_model("distilbert").train()
    batches = [random_batch(batch_size=3, seed=0), random_batch(batch_size=2, seed=1)]
    # A BERT tokenizer's extra input, which DistilBERT's forward does not take, is dropped.
    batches[0]["token_type_ids"] = torch.zeros_like(batches[0]["input_ids"])
    logits, labels = predict_logits(model, batches)
    assert model.training  # back to its previous mode
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model(**model_inputs(model, batch)).logits for batch in batches])
    torch.testing.assert_close(logits, expected)
    assert torch.equal(labels, torch.cat([batch["labels"] for batch in batches]))
    assert set(model_inputs(model, batches[0])) == {"input_ids", "attention_mask"}
    unlabelled = [{k: v for k, v in batch.items() if k != "labels"} for batch in batches]
    assert predict_logits(model, unlabelled)[1] is None


def test_device_name_names_the_processor():
    name = device_name("cpu")
    assert isinstance(name, str) and name.strip() == name and name
