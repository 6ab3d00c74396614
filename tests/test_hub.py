"""push_compressed_to_hub with only the network calls stubbed: nothing leaves the machine."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

from hf_compress import build_comparison, create_student, describe_model, get_structure, push_compressed_to_hub
from hf_compress.structure import stock_class


def fake_export(folder: Path, model, tokenizer=None, int8_diffs=None) -> Path:
    """A folder laid out as `export_onnx` writes it (placeholder graph bytes: uploading and the card only read the
    file names, sizes and onnx_export.json; tests/test_cli_export.py pushes a real export)."""
    int8_diffs = {"dynamic": 0.0123} if int8_diffs is None else int8_diffs
    folder.mkdir(parents=True)
    files = {"fp32": "model.onnx", **{f"int8_{mode}": f"model_int8_{mode}.onnx" for mode in int8_diffs}}
    for name in files.values():
        (folder / name).write_bytes(b"\x08\x07" * 500)
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    info = {
        "format": "hf-compress-onnx",
        "format_version": 1,
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch_version": torch.__version__,
        "architecture": stock_class(type(model)).__name__,
        "structure": get_structure(model).to_dict(),
        "opset": 18,
        "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        "outputs": ["logits"],
        "files": files,
        "max_abs_diff": 3.2e-7,
        "atol": 1e-4,
        **({"int8_max_abs_diff": int8_diffs} if int8_diffs else {}),
    }
    (folder / "onnx_export.json").write_text(json.dumps(info, indent=2))
    return folder


@pytest.fixture
def hub(monkeypatch):
    """Record the Hub calls; `uploaded` maps each uploaded file's name to its text (or bytes size for weights)."""
    calls = {"create_repo": [], "create_branch": [], "upload_folder": [], "uploaded": {}}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, "token": self.token, **kwargs})
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"].append({"repo_id": repo_id, **kwargs})

    def upload_folder(self, **kwargs):
        calls["upload_folder"].append(kwargs)
        for file in Path(kwargs["folder_path"]).rglob("*"):
            if file.is_file():
                name = file.relative_to(kwargs["folder_path"]).as_posix()
                binary = file.suffix in (".safetensors", ".onnx")
                calls["uploaded"][name] = file.stat().st_size if binary else file.read_text()
        return CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid="abc",
        )

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_model_tokenizer_card_and_comparison(hub, tiny_tokenizer):
    teacher = tiny_model("bert")
    student = create_student(teacher, num_layers=2)
    comparison = build_comparison(
        {**describe_model(teacher), "metrics": {"accuracy": 0.9}, "latency_ms": 4.0},
        {**describe_model(student), "metrics": {"accuracy": 0.85}, "latency_ms": 2.0},
        dataset={"name": "glue", "hub_id": "glue", "config": "sst2", "split": "validation", "num_examples": 8},
    )
    commit = push_compressed_to_hub(
        student,
        "me/tiny-student",
        tokenizer=tiny_tokenizer,
        comparison=comparison,
        private=True,
        revision="v1",
        commit_message="first",
        token="hf_test",
        base_model="google-bert/bert-base-uncased",
        distillation={"temperature": 2.0},
    )
    assert commit.commit_url.endswith("/commit/abc")
    assert hub["create_repo"] == [
        {"repo_id": "me/tiny-student", "token": "hf_test", "private": True, "exist_ok": True}
    ]
    assert hub["create_branch"] == [{"repo_id": "me/tiny-student", "branch": "v1", "exist_ok": True}]
    (upload,) = hub["upload_folder"]
    assert (upload["repo_id"], upload["revision"], upload["commit_message"]) == ("me/tiny-student", "v1", "first")
    assert set(hub["uploaded"]) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "comparison.json",
    }
    assert json.loads(hub["uploaded"]["comparison.json"]) == json.loads(json.dumps(comparison))
    assert json.loads(hub["uploaded"]["config.json"])["num_hidden_layers"] == 2
    card = ModelCard(hub["uploaded"]["README.md"])
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert "hf-compress" in card.data.tags
    assert card.data.eval_results[0].metric_value == 0.85
    assert card.data.eval_results[0].dataset_type == "glue"
    assert 'from_pretrained("me/tiny-student")' in card.text and "# tiny-student" in card.text


def test_pruned_model_ships_its_remote_code(hub):
    from hf_compress.pruning.structured import prune_heads

    model = tiny_model("bert")
    prune_heads(model, {0: [1, 2]})
    card = ModelCard("---\nlicense: apache-2.0\n---\n# Pruned\n")
    push_compressed_to_hub(model, "me/pruned", card=card)
    assert set(hub["uploaded"]) == {"config.json", "model.safetensors", "modeling_hf_compress.py", "README.md"}
    config = json.loads(hub["uploaded"]["config.json"])
    assert config["auto_map"] and hub["uploaded"]["README.md"] == str(card)
    assert hub["create_branch"] == [] and hub["upload_folder"][0]["revision"] is None


def test_bad_card_fails_before_any_upload(hub):
    with pytest.raises(ValueError):
        push_compressed_to_hub(tiny_model("bert"), "me/x", card="---\nmodel-index: not-a-list\n---\n")
    with pytest.raises(ValueError, match="either a card or arguments"):
        push_compressed_to_hub(tiny_model("bert"), "me/x", card="# card", base_model="bert-base-uncased")
    assert hub["create_repo"] == [] and hub["upload_folder"] == []


def test_only_the_main_process_pushes(hub, monkeypatch):
    monkeypatch.setattr("hf_compress.deploy.hub.PartialState", lambda: type("State", (), {"is_main_process": False}))
    assert push_compressed_to_hub(tiny_model("bert"), "me/x") is None
    assert hub["create_repo"] == [] and hub["upload_folder"] == []


def test_push_uploads_the_onnx_export_and_the_card_lists_it(hub, tiny_tokenizer, tmp_path):
    model = tiny_model("bert")
    export = fake_export(tmp_path / "onnx", model, tiny_tokenizer, int8_diffs={"dynamic": 0.0123, "static": 0.02})
    (export / "notes.txt").write_text("not part of the export")
    push_compressed_to_hub(
        model,
        "me/tiny-onnx",
        tokenizer=tiny_tokenizer,
        onnx_dir=export,
        onnx_results={
            "model.onnx": {"accuracy": 0.91, "latency_ms": 8.25},
            "onnx/model_int8_dynamic.onnx": {"accuracy": 0.9, "latency_ms": 3.1, "speedup": 2.66},
        },
        onnx_latency={"batch_size": 32, "sequence_length": 128, "device_name": "AMD EPYC 7R13", "threads": 2},
    )
    uploaded = set(hub["uploaded"])
    onnx_files = {name for name in uploaded if name.startswith("onnx/")}
    assert onnx_files == {
        "onnx/model.onnx",
        "onnx/model_int8_dynamic.onnx",
        "onnx/model_int8_static.onnx",
        "onnx/onnx_export.json",
        "onnx/config.json",
        "onnx/tokenizer.json",
        "onnx/tokenizer_config.json",
    }
    assert {"config.json", "model.safetensors", "README.md"} <= uploaded  # the PyTorch model beside it
    assert json.loads(hub["uploaded"]["onnx/onnx_export.json"])["max_abs_diff"] == 3.2e-7

    card = ModelCard(hub["uploaded"]["README.md"])
    assert "onnx" in card.data.tags
    section = card.text.split("## ONNX Runtime")[1].split("## Intended use")[0]
    header = (
        "| File | What it is | Size | Max. abs. difference from PyTorch | Accuracy | Latency per batch | Speed-up |"
    )
    assert header in section
    assert "| `onnx/model.onnx` | fp32 graph | 1.0 kB | 3.2e-07 | 0.9100 | 8.2 ms | not measured |" in section
    assert "| `onnx/model_int8_dynamic.onnx` | int8, dynamic quantization" in section
    assert "| 1.2e-02 | 0.9000 | 3.1 ms | 2.66x |" in section
    assert "| 2.0e-02 | not measured | not measured | not measured |" in section  # static: nothing measured
    assert "of 32 sequences of 128 tokens on AMD EPYC 7R13 with 2 threads" in section
    assert 'snapshot_download("me/tiny-onnx", allow_patterns=["onnx/*"])' in section
    assert 'OnnxModel(f"{folder}/onnx", file_name="model_int8_dynamic.onnx")' in section
    assert "model.classify(" in section and "`input_ids`, `attention_mask`, `token_type_ids`" in section


def test_onnx_card_shows_only_what_was_measured(hub, tmp_path):
    model = tiny_model("bert")
    push_compressed_to_hub(model, "me/tiny-onnx", onnx_dir=fake_export(tmp_path / "onnx", model, int8_diffs={}))
    assert {name for name in hub["uploaded"] if name.startswith("onnx/")} == {
        "onnx/model.onnx",
        "onnx/onnx_export.json",
        "onnx/config.json",
    }
    section = ModelCard(hub["uploaded"]["README.md"]).text.split("## ONNX Runtime")[1].split("## Intended use")[0]
    assert "| File | What it is | Size | Max. abs. difference from PyTorch |\n" in section
    assert "Accuracy" not in section and "Latency" not in section and "not measured" not in section
    assert 'file_name="model.onnx"' in section


def test_onnx_dir_of_another_model_or_no_export_is_refused_before_any_upload(hub, tmp_path):
    from hf_compress.pruning.structured import prune_heads

    model = tiny_model("bert")
    pruned = tiny_model("bert")
    prune_heads(pruned, {0: [1]})
    export = fake_export(tmp_path / "pruned-onnx", pruned)
    with pytest.raises(ValueError, match=r"export of another model: its heads per layer \[3, 4, 4, 4\]"):
        push_compressed_to_hub(model, "me/x", onnx_dir=export)
    with pytest.raises(ValueError, match="holds an export of a BertForSequenceClassification, not of this"):
        push_compressed_to_hub(tiny_model("distilbert"), "me/x", onnx_dir=export)
    with pytest.raises(ValueError, match="is not an ONNX export"):
        push_compressed_to_hub(model, "me/x", onnx_dir=tmp_path)
    with pytest.raises(ValueError, match=r"onnx_results names \['model_int8_static.onnx'\]"):
        push_compressed_to_hub(
            pruned, "me/x", onnx_dir=export, onnx_results={"model_int8_static.onnx": {"accuracy": 0.9}}
        )
    with pytest.raises(ValueError, match="not numbers"):
        push_compressed_to_hub(pruned, "me/x", onnx_dir=export, onnx_results={"model.onnx": {"accuracy": "n/a"}})
    assert hub["create_repo"] == [] and hub["upload_folder"] == []
