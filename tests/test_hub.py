"""push_compressed_to_hub with only the network calls stubbed: nothing leaves the machine."""

import json
from pathlib import Path

import pytest
from conftest import tiny_model
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl

from hf_compress import build_comparison, create_student, describe_model, push_compressed_to_hub


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
                calls["uploaded"][name] = file.stat().st_size if file.suffix == ".safetensors" else file.read_text()
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
