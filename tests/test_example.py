"""The tiny variant of examples/distill_bert_sst2.py: a tiny teacher, a few TSV rows, a few steps."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import teacher_and_data_folders
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

from hf_compress import HubUnreachableError, compare_latency, device_name, load_compressed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_bert_sst2.py"
PROGRESSIVE = EXAMPLE.parent / "progressive_compression.py"


def _load_example(path: Path = EXAMPLE):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses resolve their string annotations through sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workspace(tmp_path, tiny_tokenizer):
    return teacher_and_data_folders(tmp_path, tiny_tokenizer)


def _args(workspace, *extra):
    return [
        "--teacher", str(workspace / "teacher"), "--dataset", str(workspace / "data"),
        "--output_dir", str(workspace / "out"), "--student_layers", "2", "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_length", "16",
        "--latency_repeats", "2", "--max_train_samples", "12", "--temperature", "3", "--alpha", "0.7",
        "--logging_steps", "1", "--use_cpu", "true", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("student_type", ["same", "distilbert"])
def test_tiny_example_saves_student_comparison_and_card(workspace, student_type):
    comparison = _load_example().main(_args(workspace, "--student_type", student_type))
    out = workspace / "out"
    assert {"config.json", "model.safetensors", "tokenizer.json", "comparison.json", "README.md"} <= {
        path.name for path in out.iterdir()
    }
    saved = json.loads((out / "comparison.json").read_text())
    assert saved == json.loads(json.dumps(comparison))
    assert saved["teacher"]["structure"]["layers"] == 4 and saved["student"]["structure"]["layers"] == 2
    assert saved["dataset"] == {
        "name": "data",
        "hub_id": None,
        "config": None,
        "split": "validation",
        "num_examples": 6,
    }
    for side in ("teacher", "student"):
        assert set(saved[side]["metrics"]) == {"accuracy", "f1"} and saved[side]["latency_ms"] > 0
    assert saved["student"]["parameters"] < saved["teacher"]["parameters"]
    # Timed interleaved in one compare_latency run: the speed-up is the median of per-round ratios, with its interval.
    low, high = saved["speedup_interval"]
    assert low <= saved["speedup"] <= high
    latency = saved["latency"]
    assert (latency["method"], latency["rounds"], latency["warmup"]) == ("interleaved", 2, 3)
    assert latency["batch_size"] == 4 and latency["sequence_length"] == 16
    assert latency["device_name"] == device_name("cpu") and isinstance(latency["noisy"], bool)

    card = ModelCard.load(out / "README.md")
    assert "hf-compress" in card.data.tags and card.data.eval_results[0].metric_type == "accuracy"
    assert card.data.datasets is None and card.data.eval_results[0].dataset_type == "data"  # local data: no Hub id
    assert "- Temperature: 3" in card.text and "- Alpha: 0.7" in card.text
    assert "- Teacher layers kept: 0, 2" in card.text
    assert f"{saved['speedup']:.2f}x faster ({low:.2f}-{high:.2f}x in 80% of rounds)" in card.text
    assert "both models timed interleaved (one call of each per round, 2 rounds)" in card.text

    # The saved student is a stock checkpoint of the chosen family that a pipeline runs as is.
    student = AutoModelForSequenceClassification.from_pretrained(out)
    expected = (
        "DistilBertForSequenceClassification" if student_type == "distilbert" else "BertForSequenceClassification"
    )
    assert type(student).__name__ == expected
    classify = pipeline("text-classification", model=str(out), device="cpu")
    assert classify("a good movie")[0]["label"] in {"negative", "positive"}
    if student_type == "distilbert":
        assert "token_type_ids" not in AutoTokenizer.from_pretrained(out)("a good movie")


def test_example_times_both_models_interleaved_and_flags_a_noisy_run(workspace, monkeypatch, capsys):
    example = _load_example()
    calls = []

    def noisy_compare_latency(models, inputs, **kwargs):
        # The real measurement, reported as if the machine had been busy.
        calls.append((list(models), kwargs))
        result = compare_latency(models, inputs, **kwargs)
        result.noisy, result.warnings = True, ["'teacher' is too noisy to trust: ..."]
        return result

    monkeypatch.setattr(example, "compare_latency", noisy_compare_latency)
    comparison = example.main(_args(workspace, "--latency_repeats", "3", "--latency_warmup", "1"))
    assert calls == [(["teacher", "student"], {"rounds": 3, "warmup": 1})]  # one run, both models
    assert comparison["latency"]["noisy"] and comparison["latency"]["warnings"]
    out = capsys.readouterr().out
    assert "in 80% of rounds" in out and "WARNING: the latency spread is too large to trust the speed-up" in out
    card = ModelCard.load(workspace / "out" / "README.md")
    assert "**The timings were noisy**" in card.text
    # A noisy speed-up is not claimed in the one-line summary, only in the table, qualified.
    assert "x the speed" not in card.text.split("## Results")[0]


def test_example_refuses_fewer_than_two_timed_rounds(workspace):
    with pytest.raises(ValueError, match="at least 2 timed rounds"):
        _load_example().main(_args(workspace, "--latency_repeats", "1"))


def test_example_trains_the_student(workspace):
    teacher = AutoModelForSequenceClassification.from_pretrained(workspace / "teacher")
    _load_example().main(_args(workspace, "--layers_to_keep", "1", "2", "--student_layers", "2"))
    student = AutoModelForSequenceClassification.from_pretrained(workspace / "out")
    # Copied from teacher layer 1, then trained: changed, and the teacher's checkpoint on disk is untouched.
    assert not torch.equal(
        student.bert.encoder.layer[0].attention.self.query.weight,
        teacher.bert.encoder.layer[1].attention.self.query.weight,
    )
    reloaded = AutoModelForSequenceClassification.from_pretrained(workspace / "teacher")
    assert all(
        torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), reloaded.state_dict().values(), strict=True)
    )


def test_example_without_hub_shows_the_local_command(workspace, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachableError, match="--teacher PATH/TO/MODEL_FOLDER") as error:
        _load_example().main(["--teacher", "textattack/bert-base-uncased-SST-2", "--dataset", str(workspace / "data")])
    assert "--dataset PATH/TO/DATA_FOLDER" not in str(error.value)  # the local dataset needs no Hub


def test_example_pushes_student_card_and_comparison(workspace, monkeypatch):
    uploads = []

    def upload_folder(self, **kwargs):
        files = {p.relative_to(kwargs["folder_path"]).as_posix(): p for p in Path(kwargs["folder_path"]).rglob("*")}
        readme = files.get("README.md")
        uploads.append({"files": set(files), "readme": readme.read_text() if readme else None, **kwargs})
        return CommitInfo(
            commit_url="https://huggingface.co/me/x/commit/1", commit_message="", commit_description="", oid="1"
        )

    monkeypatch.setattr(
        HfApi, "create_repo", lambda self, repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}")
    )
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    _load_example().main(_args(workspace, "--push_to_hub", "true", "--hub_model_id", "me/tiny-student"))
    # The last commit is the complete one: student, tokenizer, this card and the comparison.
    final = uploads[-1]
    assert final["repo_id"] == "me/tiny-student"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "comparison.json"} <= final["files"]
    card = ModelCard(final["readme"])
    assert "hf-compress" in card.data.tags and 'from_pretrained("me/tiny-student")' in card.text


def test_example_with_pruning_saves_a_loadable_pruned_student(workspace):
    comparison = _load_example().main(_args(workspace, "--prune_keep", "0.7", "--prune_calibration_samples", "8"))
    out = workspace / "out"
    structure = comparison["student"]["structure"]
    removed = comparison["pruning"]["removed"]
    assert structure["layers"] == 2 and (removed["heads"] or removed["ffn_neurons"])
    assert sum(structure["heads_per_layer"]) + sum(structure["ffn_neurons_per_layer"]) < 2 * (4 + 24)
    card = ModelCard.load(out / "README.md")
    assert card.data.tags[:3] == ["hf-compress", "distillation", "pruning"]
    assert "- Budget: 70% of the encoder FLOPs per token at 16 tokens" in card.text
    # Per-layer widths differ from a stock config, so the checkpoint carries its code and loads with it.
    loaded = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    batch = AutoTokenizer.from_pretrained(out)("a good movie", return_tensors="pt")
    assert loaded(**batch).logits.shape == (1, 2)
    stock = set(structure["heads_per_layer"]) == {4} and len(set(structure["ffn_neurons_per_layer"])) == 1
    assert bool(json.loads((out / "config.json").read_text()).get("auto_map")) is not stock
    assert ("trust_remote_code=True" in card.text) is not stock


def _progressive_args(workspace, *extra):
    return [
        "--teacher", str(workspace / "teacher"), "--dataset", str(workspace / "data"),
        "--output_dir", str(workspace / "progressive"), "--max_steps", "4", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--max_length", "16", "--latency_repeats", "2",
        "--calibration_samples", "8", "--prune_frequency", "1", "--use_cpu", "true", *extra,
    ]  # fmt: skip


def test_progressive_example_prunes_the_teacher_then_the_student_while_distilling(workspace):
    stages = _load_example(PROGRESSIVE).main(
        _progressive_args(workspace, "--teacher_keep", "0.6", "--final_keep", "0.3")
    )

    assert [stage["stage"] for stage in stages] == [
        "teacher",
        "teacher pruned, no training",
        "student pruned while distilling",
    ]
    teacher, pruned_teacher, student = stages
    assert teacher["flops_kept"] == 1.0
    assert pruned_teacher["flops_kept"] <= 0.6 and student["flops_kept"] <= 0.3
    assert student["parameters"] < pruned_teacher["parameters"] < teacher["parameters"]
    # Every stage timed in one interleaved run, relative to the teacher.
    assert teacher["speedup"] == 1.0 and teacher["speedup_interval"] == [1.0, 1.0]
    for stage in stages:
        low, high = stage["speedup_interval"]
        assert stage["latency_ms"] > 0 and low <= stage["speedup"] <= high
    out = workspace / "progressive"
    assert json.loads((out / "stages.json").read_text()) == stages
    # The saved student is the final, smallest model: it loads with its per-layer structure.
    loaded = load_compressed(out)
    assert sum(p.numel() for p in loaded.parameters()) == student["parameters"]


def test_progressive_example_refuses_a_final_budget_above_the_pruned_teacher(workspace):
    with pytest.raises(ValueError, match="--final_keep 0.7 keeps more than the pruned teacher"):
        _load_example(PROGRESSIVE).main(_progressive_args(workspace, "--teacher_keep", "0.6", "--final_keep", "0.7"))


def test_comparison_prints_when_the_teacher_scored_zero(capsys):
    """A retained ratio is None when the teacher's metric is 0; the table says n/a instead of crashing."""
    side = {"metrics": {"accuracy": 0.0}, "parameters": 10, "size_bytes": 40, "latency_ms": 1.0}
    latency = {"batch_size": 1, "sequence_length": 8, "device_name": "cpu", "torch_threads": 1}
    comparison = {
        "teacher": side,
        "student": {**side, "metrics": {"accuracy": 0.5}},
        "latency": latency,
        "dataset": {"num_examples": 2},
        "speedup": 1.0,
        "metrics_retained": {"accuracy": None},
    }
    _load_example().print_comparison(comparison)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("accuracy retained") and last.endswith("n/a")
