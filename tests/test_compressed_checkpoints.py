"""Pruned checkpoints load three ways and reproduce the pruned model's outputs exactly."""

import ast
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ARCHITECTURES, VOCAB_SIZE, random_batch, tiny_config, tiny_model
from transformers import (
    AutoModel,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertTokenizerFast,
)

from hf_compress import (
    drop_layers,
    get_spec,
    get_structure,
    load_compressed,
    prune_ffn_neurons,
    prune_heads,
    register_architecture,
    round_ffn_plan,
)
from hf_compress.architectures import _REGISTRY
from hf_compress.remote_code import modeling_hf_compress

# Layer 1 loses every head, layer 2 every FFN neuron: the per-layer structure no stock class can hold.
HEAD_PLAN = {0: [1, 3], 1: [0, 1, 2, 3], 3: [2]}
FFN_PLAN = {0: [0, 5, 7], 2: list(range(24)), 3: [23]}
TASKS = ["sequence-classification", "token-classification", "masked-lm", "question-answering", "base"]
TEXTS = ["the good movie", "a very bad plot not fun", "great actor"]


def _model(model_type, task):
    if task == "question-answering":
        torch.manual_seed(0)
        return AutoModelForQuestionAnswering.from_config(tiny_config(model_type)).eval()
    if task == "base":
        torch.manual_seed(0)
        return AutoModel.from_config(tiny_config(model_type)).eval()
    return tiny_model(model_type, task)


def _pruned(model_type, task="sequence-classification"):
    model = _model(model_type, task)
    prune_heads(model, HEAD_PLAN)
    prune_ffn_neurons(model, FFN_PLAN)
    return model


def _inputs(model_type):
    batch = random_batch(padded=True)
    batch.pop("labels")
    return batch


def _first_output(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.logits if "logits" in out else out.start_logits if "start_logits" in out else out.last_hidden_state


def _assert_same_model(loaded, model, batch):
    assert type(loaded).__name__ == type(model).__name__
    assert get_structure(loaded) == get_structure(model)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded_state[name], tensor), name
    torch.testing.assert_close(_first_output(loaded, batch), _first_output(model, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_load_compressed_reproduces_every_head_class(model_type, task, tmp_path):
    model = _pruned(model_type, task)
    model.save_pretrained(tmp_path)
    loaded = load_compressed(tmp_path)
    _assert_same_model(loaded, model, _inputs(model_type))
    assert isinstance(loaded, modeling_hf_compress.HFCompressMixin)
    assert not loaded.training  # from_pretrained returns eval models; so must the twin


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_checkpoint_records_the_structure_as_data(model_type, tmp_path):
    _pruned(model_type).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "modeling_hf_compress.py"]
    config = json.loads((tmp_path / "config.json").read_text())
    structure = config["hf_compress"]
    assert structure["num_attention_heads_per_layer"] == [2, 0, 4, 3]
    assert structure["intermediate_size_per_layer"] == [21, 24, 0, 23]
    assert structure["head_dim"] == 4
    stock_name = config["architectures"][0]
    assert config["auto_map"]["AutoModelForSequenceClassification"] == f"modeling_hf_compress.{stock_name}"
    assert config["auto_map"]["AutoModel"].startswith("modeling_hf_compress.")
    # The modeling code travels as it is in the package, and needs nothing but torch and transformers.
    code = (tmp_path / "modeling_hf_compress.py").read_text()
    assert code == open(modeling_hf_compress.__file__).read()
    tree = ast.parse(code)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {name.split(".")[0] for name in imported} <= {"__future__", "warnings", "torch", "transformers"}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_loaded_model_prunes_further_and_saves_again(model_type, tmp_path):
    model = _pruned(model_type)
    model.save_pretrained(tmp_path / "first")
    loaded = load_compressed(tmp_path / "first")
    prune_heads(loaded, {0: [0]})
    drop_layers(loaded, [2])
    prune_heads(model, {0: [0]})
    drop_layers(model, [2])
    loaded.save_pretrained(tmp_path / "second")
    _assert_same_model(load_compressed(tmp_path / "second"), model, _inputs(model_type))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_from_config_builds_and_initialises_the_pruned_shapes(model_type):
    model = _pruned(model_type)
    fresh = type(model)._from_config(model.config)
    assert get_structure(fresh) == get_structure(model)
    for name, parameter in fresh.named_parameters():
        assert torch.isfinite(parameter).all(), name
    query = next(
        p for n, p in fresh.named_parameters() if n.endswith(("0.attention.self.query.weight", "q_lin.weight"))
    )
    assert 0.005 < query.std() < 0.05  # initialised like the stock model (normal, std=initializer_range=0.02)


def test_load_compressed_passes_from_pretrained_arguments(tmp_path):
    _pruned("bert").save_pretrained(tmp_path)
    loaded = load_compressed(tmp_path, dtype=torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.config._attn_implementation == "eager"


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_uniform_structure_saves_a_plain_stock_checkpoint(model_type, tmp_path):
    model = tiny_model(model_type)
    stock_class = type(model)
    drop_layers(model, [1])
    plan = round_ffn_plan(model, {0: list(range(10)), 1: [0, 1], 2: []}, uniform=True, round_to=4)
    prune_ffn_neurons(model, plan)
    assert get_structure(model).ffn == (20, 20, 20)  # kept 14, 22, 24: mean 20
    model.save_pretrained(tmp_path)

    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and "hf_compress" not in config
    assert config["architectures"] == [stock_class.__name__]
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path)  # no trust_remote_code, no hf-compress code
    assert type(stock) is stock_class
    _assert_same_model(stock, model, _inputs(model_type))
    assert type(load_compressed(tmp_path)) is stock_class


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_no_ffn_anywhere_is_still_a_stock_checkpoint(model_type, tmp_path):
    model = tiny_model(model_type)
    prune_ffn_neurons(model, {layer: list(range(24)) for layer in range(4)})
    model.save_pretrained(tmp_path)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    _assert_same_model(AutoModelForSequenceClassification.from_pretrained(tmp_path), model, _inputs(model_type))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_stock_model_loaded_by_load_compressed(model_type, tmp_path):
    model = tiny_model(model_type, "token-classification")
    model.save_pretrained(tmp_path)
    _assert_same_model(load_compressed(tmp_path), model, _inputs(model_type))


# Route 2: a fresh interpreter with only stock transformers (hf_compress made unimportable) loads every checkpoint
# with trust_remote_code, as someone who downloads it from the Hub would.
_STOCK_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_compress"] = None  # any import of hf_compress now fails
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, pipeline

    output, batch, texts, *paths = sys.argv[1:]
    batch = {k: torch.tensor(v) for k, v in json.loads(batch).items()}
    results = {}
    for path in paths:
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)
        base = AutoModel.from_pretrained(path, trust_remote_code=True)
        classifier = pipeline("text-classification", model=path, trust_remote_code=True)
        with torch.no_grad():
            results[path] = {
                "class": type(model).__module__ + "." + type(model).__name__,
                "base_class": type(base).__name__,
                "logits": model(**batch).logits.tolist(),
                "hidden": base(**batch).last_hidden_state.tolist(),
                "pipeline": classifier(json.loads(texts), top_k=None),
            }
    results["hf_compress_modules"] = [name for name, m in sys.modules.items() if name.split(".")[0] == "hf_compress" and m]
    with open(output, "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def stock_loaded(tmp_path_factory):
    """Save a pruned sequence classifier (with a tokenizer) per architecture and load them all in a stock process."""
    root = tmp_path_factory.mktemp("route2")
    words = "the a movie film good bad great awful fun dull not very plot actor story love hate".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"w{i}" for i in range(VOCAB_SIZE - len(vocab))]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    models, paths = {}, []
    for model_type in ARCHITECTURES:
        path = root / model_type
        models[model_type] = _pruned(model_type)
        models[model_type].save_pretrained(path)
        tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
        if model_type == "distilbert":  # DistilBERT takes no token_type_ids
            tokenizer.model_input_names = ["input_ids", "attention_mask"]
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    batch = {k: v.tolist() for k, v in _inputs("bert").items()}
    env = {**os.environ, "HF_HOME": str(root / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = root / "results.json"
    subprocess.run(
        [sys.executable, "-c", _STOCK_LOADER, str(out), json.dumps(batch), json.dumps(TEXTS), *paths],
        cwd=root,  # not the repository root, where `hf_compress/` would be importable as a folder
        env=env,
        check=True,
        timeout=600,
    )
    return json.loads(out.read_text()), models, root


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_stock_transformers_loads_with_trust_remote_code(model_type, stock_loaded):
    results, models, root = stock_loaded
    assert results["hf_compress_modules"] == []
    result = results[str(root / model_type)]
    model = models[model_type]
    # The class came from the checkpoint's copy of the modeling code (transformers' dynamic-module cache).
    assert result["class"].startswith("transformers_modules.")
    assert result["class"].endswith(f"modeling_hf_compress.{type(model).__name__}")
    batch = _inputs(model_type)
    torch.testing.assert_close(torch.tensor(result["logits"]), _first_output(model, batch), atol=1e-6, rtol=0)
    with torch.no_grad():
        hidden = model.base_model(**batch).last_hidden_state
    torch.testing.assert_close(torch.tensor(result["hidden"]), hidden, atol=1e-6, rtol=0)
    assert result["base_class"] == type(model.base_model).__name__

    tokenizer = BertTokenizerFast.from_pretrained(root / model_type)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        probabilities = model(**encoded).logits.softmax(-1)
    for text_scores, expected in zip(result["pipeline"], probabilities, strict=True):
        scores = {item["label"]: item["score"] for item in text_scores}
        got = torch.tensor([scores[model.config.id2label[i]] for i in range(len(expected))])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_registered_architecture_round_trips(tmp_path):
    # CamemBERT is not registered by default; the checkpoint records the module paths its modeling code needs.
    register_architecture(dataclasses.replace(get_spec(tiny_config("bert")), model_type="camembert"))
    try:
        model = _pruned("camembert")
        assert type(model).__name__ == "CamembertForSequenceClassification"
        model.save_pretrained(tmp_path)
        _assert_same_model(load_compressed(tmp_path), model, _inputs("camembert"))
    finally:
        _REGISTRY.pop("camembert")


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_load_compressed_reads_transformers_4_pruned_heads(model_type, tmp_path):
    # transformers 4 saved pruned heads as `config.pruned_heads` (original indices, JSON string keys) and the kept
    # heads' weights in order, under the stock names.
    model = tiny_model(model_type)
    prune_heads(model, {0: [1, 3], 2: [0]})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("hf_compress", "auto_map"):
        del config[key]
    config["pruned_heads"] = {"0": [1, 3], "2": [0]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "modeling_hf_compress.py").unlink()

    loaded = load_compressed(tmp_path)
    _assert_same_model(loaded, model, _inputs(model_type))
    assert not hasattr(loaded.config, "pruned_heads")
    assert loaded.config.hf_compress["num_attention_heads_per_layer"] == [2, 4, 3, 4]
