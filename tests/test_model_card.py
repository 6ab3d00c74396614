import pytest
import yaml
from conftest import tiny_model
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from transformers import GPT2Config, GPT2LMHeadModel

from hf_compress import build_comparison, compression_report, create_model_card, create_student, describe_model
from hf_compress.deploy.model_card import TEMPLATE_PATH

TEACHER_ID = "textattack/bert-base-uncased-SST-2"


@pytest.fixture
def distilled(tmp_path):
    teacher = tiny_model("bert")
    student = create_student(teacher, num_layers=2)
    student.save_pretrained(tmp_path / "student")
    comparison = build_comparison(
        {
            **describe_model(teacher),
            "name_or_path": TEACHER_ID,
            "metrics": {"accuracy": 0.9, "f1": 0.92},
            "latency_ms": 30.0,
        },
        {**describe_model(student), "metrics": {"accuracy": 0.88, "f1": 0.9}, "latency_ms": 12.0},
        dataset={"name": "glue", "hub_id": "glue", "config": "sst2", "split": "validation", "num_examples": 872},
        latency={"device": "cpu", "device_name": "cpu", "torch_threads": 2, "batch_size": 32, "sequence_length": 64},
    )
    return teacher, student, comparison, tmp_path / "student"


def test_describe_model_and_comparison(distilled):
    teacher, student, comparison, _ = distilled
    assert comparison["teacher"]["structure"] == {
        "layers": 4,
        "heads_per_layer": [4, 4, 4, 4],
        "ffn_neurons_per_layer": [24, 24, 24, 24],
    }
    assert comparison["student"]["structure"]["layers"] == 2
    assert comparison["student"]["parameters"] == sum(p.numel() for p in student.parameters())
    assert comparison["speedup"] == pytest.approx(2.5)
    assert comparison["metrics_retained"]["accuracy"] == pytest.approx(0.88 / 0.9)
    assert comparison["parameter_ratio"] == pytest.approx(
        comparison["student"]["parameters"] / comparison["teacher"]["parameters"]
    )
    # Size on disk is the bytes save_pretrained writes: fewer layers, fewer bytes.
    assert 0 < comparison["student"]["size_bytes"] < comparison["teacher"]["size_bytes"]


def test_card_metadata_round_trips_and_body_has_the_run(distilled):
    _, student, comparison, folder = distilled
    card = create_model_card(
        folder,
        student,
        comparison=comparison,
        distillation={"temperature": 4.0, "alpha": 0.5, "teacher_layers_kept": [0, 3]},
        language="en",
        license="apache-2.0",
    )
    text = (folder / "README.md").read_text()
    assert text == str(card)
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "transformers"
    assert metadata["tags"] == ["hf-compress", "distillation"]
    assert metadata["base_model"] == TEACHER_ID and metadata["datasets"] == ["glue"]
    assert metadata["pipeline_tag"] == "text-classification"
    # model-index parses back into the student's results.
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "student"
    assert {(r.metric_type, r.metric_value, r.dataset_type, r.dataset_config, r.dataset_split) for r in results} == {
        ("accuracy", 0.88, "glue", "sst2", "validation"),
        ("f1", 0.9, "glue", "sst2", "validation"),
    }
    reloaded = ModelCard.load(folder / "README.md")
    assert reloaded.data.eval_results[0].metric_value == 0.88
    body = reloaded.text
    assert "| Accuracy | 0.9000 | 0.8800 | 97.8% retained |" in body
    assert "| Latency per batch | 30.0 ms | 12.0 ms | 2.50x faster |" in body
    assert "- Temperature: 4" in body and "- Teacher layers kept: 0, 3" in body
    assert "| Layers | 4 | 2 |" in body
    assert 'AutoModelForSequenceClassification.from_pretrained("student")' in body
    assert "trust_remote_code" not in body.split("## How to use")[1].split("```python")[1]
    assert "## Intended use and limitations" in body


def test_local_teacher_is_not_base_model_metadata(distilled, tmp_path):
    teacher, student, comparison, folder = distilled
    teacher.save_pretrained(tmp_path / "local-teacher")
    comparison["teacher"]["name_or_path"] = str(tmp_path / "local-teacher")
    card = create_model_card(folder, student, comparison=comparison)
    assert card.data.base_model is None
    assert "`local-teacher`" in card.text and str(tmp_path) not in card.text


def test_existing_readme_is_updated_not_lost(distilled):
    _, student, comparison, folder = distilled
    (folder / "README.md").write_text(
        "---\nlicense: mit\ntags:\n- sentiment\n---\n# My notes\n\nTrained on a Tuesday.\n"
    )
    create_model_card(folder, student, comparison=comparison, distillation={"alpha": 0.5})
    first = ModelCard.load(folder / "README.md")
    assert first.data.license == "mit"
    assert first.data.tags == ["sentiment", "hf-compress", "distillation"]
    assert "Trained on a Tuesday." in first.text and "0.8800" in first.text

    # A second run replaces only its own section: the user's text stays, the numbers are new, nothing is duplicated.
    comparison["student"]["metrics"]["accuracy"] = 0.87
    create_model_card(folder, student, comparison=comparison, distillation={"alpha": 0.5})
    second = (folder / "README.md").read_text()
    assert second.count("Trained on a Tuesday.") == 1 and second.count("## How to use") == 1
    assert "0.8700" in second and "0.8800" not in second


def test_remote_code_checkpoint_gets_trust_remote_code_snippet(distilled):
    _, student, comparison, folder = distilled
    student.config.auto_map = {"AutoModelForSequenceClassification": "modeling_hf_compress.Model"}
    card = create_model_card(folder, student, comparison=comparison, repo_id="me/pruned", pruning={"heads": 3})
    assert 'from_pretrained("me/pruned", trust_remote_code=True)' in card.text
    assert 'load_compressed("me/pruned")' in card.text
    assert card.data.tags == ["hf-compress", "pruning"]
    assert "| Structure | Original | This model |" in card.text


def test_card_without_comparison_reads_config_from_folder(distilled):
    _, _, _, folder = distilled
    card = create_model_card(folder, base_model=TEACHER_ID)
    assert card.data.eval_results is None and card.data.base_model == TEACHER_ID
    assert "## Results" not in card.text
    assert "AutoModelForSequenceClassification" in card.text


def test_only_the_main_process_writes(distilled, monkeypatch):
    _, student, comparison, folder = distilled
    monkeypatch.setattr(
        "hf_compress.deploy.model_card.PartialState", lambda: type("State", (), {"is_main_process": False})
    )
    assert create_model_card(folder, student, comparison=comparison) is None
    assert not (folder / "README.md").exists()


def test_template_ships_inside_the_package():
    assert TEMPLATE_PATH.is_file() and "{{ card_data }}" in TEMPLATE_PATH.read_text()


def test_describe_model_is_the_model_summary_under_the_comparison_keys():
    model = tiny_model("bert", "masked-lm")  # tied embeddings: counted once in both
    summary = compression_report(model).model
    description = describe_model(model)
    assert description == {
        "class": "BertForMaskedLM",
        "model_type": "bert",
        "parameters": summary.parameters,
        "size_bytes": summary.size_bytes,
        "structure": {"layers": 4, "heads_per_layer": [4] * 4, "ffn_neurons_per_layer": [24] * 4},
    }
    assert "size_bytes" not in describe_model(model, measure_size=False)


def test_describe_model_of_an_unregistered_architecture_has_no_structure():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
    description = describe_model(model)
    assert set(description) == {"class", "model_type", "parameters", "size_bytes"}
    assert description["parameters"] == sum(p.numel() for p in model.parameters())
    assert description["size_bytes"] > 0


def test_interleaved_latency_shows_its_interval_and_a_noisy_run_is_qualified(distilled):
    _, student, comparison, folder = distilled
    comparison["speedup"], comparison["speedup_interval"] = 2.4, [2.1, 2.9]
    comparison["latency"].update(method="interleaved", rounds=30, warmup=3, noisy=False, max_relative_iqr=0.2)
    card = create_model_card(folder, student, comparison=comparison, base_model=TEACHER_ID)
    assert "| Latency per batch | 30.0 ms | 12.0 ms | 2.40x faster (2.10-2.90x in 80% of rounds) |" in card.text
    assert "both models timed interleaved (one call of each per round, 30 rounds)" in card.text
    assert "median of the per-round ratios" in card.text and "noisy" not in card.text
    assert "2.40x the speed" in card.text.split("## Results")[0]

    comparison["latency"]["noisy"] = True
    card = create_model_card(folder, student, comparison=comparison, base_model=TEACHER_ID)
    assert "**The timings were noisy**: the spread of the middle half of the rounds exceeded 20% of the median" in (
        card.text
    )
    assert "x the speed" not in card.text.split("## Results")[0]  # not claimed in the summary line


def test_onnx_files_inside_the_card_folder_are_listed_by_their_relative_path(distilled):
    from test_hub import fake_export

    _, student, comparison, folder = distilled
    fake_export(folder / "exports" / "onnx", student, int8_diffs={})
    card = create_model_card(folder, student, comparison=comparison, onnx_dir=folder / "exports" / "onnx")
    assert "| `exports/onnx/model.onnx` | fp32 graph |" in card.text and "onnx" in card.data.tags
    assert 'allow_patterns=["exports/onnx/*"]' in card.text


def test_onnx_results_need_their_folder(distilled):
    _, student, comparison, folder = distilled
    with pytest.raises(ValueError, match="pass their folder as onnx_dir"):
        create_model_card(folder, student, onnx_results={"model.onnx": {"accuracy": 0.9}})
    assert not (folder / "README.md").exists()
