"""ONNX export of every kind of checkpoint hf-compress writes, int8 with ONNX Runtime, and the refusals.

Exports take seconds each (torch.export + ONNX translation), so the int8, classify and inspect tests share one export.
"""

import json
import shutil
import types

import numpy as np
import pytest
import torch
from conftest import VOCAB_SIZE, random_batch, tiny_config, tiny_model
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMultipleChoice,
    AutoModelForSequenceClassification,
    BertTokenizerFast,
    pipeline,
)

from hf_compress import (
    bert_to_distilbert,
    create_student,
    drop_layers,
    magnitude_prune,
    make_permanent,
    prune_ffn_neurons,
    prune_heads,
    quantize_dynamic_int8,
)

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from hf_compress import OnnxModel, export_onnx, inspect_onnx  # noqa: E402

ATOL = 1e-4
WORDS = "the a movie film good bad great awful fun dull not very plot actor story love hate".split()


def sentences(count, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(2, 14))) for _ in range(count)]


def make_tokenizer(folder):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab += [f"w{i}" for i in range(VOCAB_SIZE - len(vocab))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)


def prune_non_uniformly(model):
    """Layer 0 loses every head, layer 1 one head and two neurons, layer 2 every FFN neuron, layer 3 goes."""
    prune_heads(model, {0: [0, 1, 2, 3], 1: [1]})
    prune_ffn_neurons(model, {1: [0, 5], 2: list(range(24))})
    drop_layers(model, [3])
    return model


def assert_matches_pytorch(export_dir, model):
    """ORT vs PyTorch on padded batches of shapes the export did not use; returns the largest difference."""
    onnx_model = OnnxModel(export_dir, threads=1)
    worst = 0.0
    batches = [random_batch(5, 13, seed=1), random_batch(1, 7, seed=2, padded=False), random_batch(3, 30, seed=3)]
    for batch in batches:
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
        with torch.no_grad():
            expected = model(**inputs, return_dict=True)
        actual = onnx_model(**inputs)
        assert onnx_model.output_names and set(onnx_model.output_names) <= set(expected.keys())
        for name in onnx_model.output_names:
            assert actual[name].shape == tuple(expected[name].shape)
            worst = max(worst, float(np.abs(actual[name] - expected[name].numpy()).max()))
    assert worst <= ATOL
    return worst


def build(kind, tmp_path):
    """(what to pass to export_onnx, the PyTorch model it must reproduce)."""
    if kind == "original":
        model = tiny_model("bert")
        return model, model
    if kind == "student-from-folder":
        model = create_student(tiny_model("bert"), num_layers=2)
        model.save_pretrained(tmp_path / "student")
        return tmp_path / "student", model
    if kind == "distilbert-student":
        model = bert_to_distilbert(tiny_model("bert"), num_layers=2).eval()
        return model, model
    if kind == "uniform-pruned-roberta-from-folder":
        model = tiny_model("roberta")
        prune_heads(model, {layer: [0] for layer in range(4)})
        prune_ffn_neurons(model, {layer: list(range(8)) for layer in range(4)})
        drop_layers(model, [1])
        model.save_pretrained(tmp_path / "pruned")
        return tmp_path / "pruned", model
    if kind == "non-uniform-pruned-distilbert":
        model = prune_non_uniformly(tiny_model("distilbert"))
        return model, model
    if kind == "non-uniform-pruned-electra-token-classification":
        model = prune_non_uniformly(tiny_model("electra", task="token-classification"))
        return model, model
    if kind == "non-uniform-pruned-xlm-roberta-base-model":
        torch.manual_seed(0)
        model = prune_non_uniformly(AutoModel.from_config(tiny_config("xlm-roberta")).eval())
        return model, model
    raise AssertionError(kind)


KINDS = [
    "original",
    "student-from-folder",
    "distilbert-student",
    "uniform-pruned-roberta-from-folder",
    "non-uniform-pruned-distilbert",
    "non-uniform-pruned-electra-token-classification",
    "non-uniform-pruned-xlm-roberta-base-model",
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_checkpoint_kind_exports_and_matches_pytorch(kind, tmp_path):
    source, model = build(kind, tmp_path)
    result = export_onnx(source, tmp_path / "onnx", quantize="dynamic")
    assert result.max_abs_diff <= ATOL
    assert (tmp_path / "onnx" / "model.onnx").is_file() and (tmp_path / "onnx" / "config.json").is_file()
    diff = assert_matches_pytorch(tmp_path / "onnx", model)
    # Empty projections (no heads / no FFN neurons) stay fp32; every other linear layer is int8.
    int8 = OnnxModel(tmp_path / "onnx", "model_int8_dynamic.onnx", threads=1)
    assert int8(**random_batch(2, 9))[result.output_names[0]].shape[0] == 2
    print(f"{kind}: max |ORT - PyTorch| = {max(diff, result.max_abs_diff):.2e}, int8: {result.int8_max_abs_diff}")
    assert model.training is False  # export_onnx restored the mode it found (eval here)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A non-uniformly pruned BERT saved with its tokenizer, exported from its folder with both int8 graphs."""
    root = tmp_path_factory.mktemp("onnx")
    tokenizer = make_tokenizer(root)
    # A wider initialisation than the default gives logits that differ between sentences, so int8 agreement means
    # something on a random model.
    model = prune_non_uniformly(tiny_model("bert", initializer_range=0.2))
    model.save_pretrained(root / "pruned")
    tokenizer.save_pretrained(root / "pruned")
    result = export_onnx(
        root / "pruned", root / "onnx", quantize=["dynamic", "static"], calibration_texts=sentences(256)
    )
    return types.SimpleNamespace(model=model, tokenizer=tokenizer, root=root, out=root / "onnx", result=result)


def test_pruned_folder_exports_a_self_contained_folder(exported):
    out = exported.out
    assert exported.result.max_abs_diff <= ATOL
    assert exported.result.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    assert exported.result.output_names == ["logits"]
    assert {"model.onnx", "config.json", "tokenizer.json", "onnx_export.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "modeling_hf_compress.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config  # no PyTorch modeling code here to point to
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["hf_compress"]["num_attention_heads_per_layer"] == [0, 3, 4]
    assert AutoConfig.from_pretrained(out).hf_compress["intermediate_size_per_layer"] == [24, 22, 0]
    info = json.loads((out / "onnx_export.json").read_text())
    assert info["structure"]["heads"] == [0, 3, 4] and info["structure"]["ffn"] == [24, 22, 0]
    assert info["files"] == {
        "fp32": "model.onnx",
        "int8_dynamic": "model_int8_dynamic.onnx",
        "int8_static": "model_int8_static.onnx",
    }
    print(
        f"non-uniform-pruned-bert-from-folder: max |ORT - PyTorch| = {assert_matches_pytorch(out, exported.model):.2e}"
    )


def test_classify_agrees_with_the_pytorch_pipeline(exported):
    texts = sentences(12, seed=5)
    expected = pipeline("text-classification", model=exported.model, tokenizer=exported.tokenizer)(texts)
    actual = OnnxModel(exported.out, threads=1).classify(texts, batch_size=5)
    assert [r["label"] for r in actual] == [r["label"] for r in expected]
    assert np.allclose([r["score"] for r in actual], [r["score"] for r in expected], atol=ATOL)


@pytest.mark.parametrize("spinning", [True, False])
def test_spinning_can_be_turned_off_for_shared_cores(exported, spinning):
    # Spinning worker threads steal the cores from models timed right after (compare_latency, the ONNX benchmark).
    model = OnnxModel(exported.out, threads=1, spinning=spinning)
    options = model.session.get_session_options()
    if spinning:  # ONNX Runtime's default: no entry at all
        with pytest.raises(RuntimeError, match="does not have configuration"):
            options.get_session_config_entry("session.intra_op.allow_spinning")
    else:
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    texts = sentences(4, seed=2)
    assert [r["label"] for r in model.classify(texts)] == [r["label"] for r in OnnxModel(exported.out).classify(texts)]


@pytest.mark.parametrize("file_name", ["model_int8_dynamic.onnx", "model_int8_static.onnx"])
def test_int8_graphs_load_and_agree_with_fp32(exported, file_name):
    encoded = exported.tokenizer(sentences(48, seed=7), padding=True, return_tensors="np")
    fp32 = OnnxModel(exported.out, threads=1)(**encoded)["logits"]
    int8 = OnnxModel(exported.out, file_name, threads=1)(**encoded)["logits"]
    assert not np.array_equal(int8, fp32)  # the int8 graph really differs
    # Measured on this seeded model: correlation 0.996-0.997, argmax agreement 98-100%.
    assert np.corrcoef(fp32.ravel(), int8.ravel())[0, 1] > 0.95
    assert (fp32.argmax(-1) == int8.argmax(-1)).mean() >= 0.8
    graph = inspect_onnx(exported.out / file_name)["graphs"][file_name]
    assert graph["int8_ops"] > 0
    assert graph["bytes"] < (exported.out / "model.onnx").stat().st_size


def test_inspect_describes_the_dynamic_axes(exported):
    description = inspect_onnx(exported.out)
    assert set(description["graphs"]) == {"model.onnx", "model_int8_dynamic.onnx", "model_int8_static.onnx"}
    graph = description["graphs"]["model.onnx"]
    assert graph["inputs"]["input_ids"] == ["batch_size", "sequence_length"]
    assert graph["outputs"]["logits"] == ["batch_size", 2]
    assert graph["int8_ops"] == 0 and graph["opset"] == 18
    assert description["export"]["exporter"] == "torch.onnx.export(dynamo=True)"


def test_export_over_an_earlier_export_leaves_no_stale_int8_graph(exported, tmp_path):
    out = tmp_path / "onnx"
    shutil.copytree(exported.out, out)
    model = tiny_model("bert")
    export_onnx(model, out)
    assert not (out / "model_int8_dynamic.onnx").exists() and not (out / "model_int8_static.onnx").exists()
    assert json.loads((out / "onnx_export.json").read_text())["files"] == {"fp32": "model.onnx"}
    assert_matches_pytorch(out, model)


class _Reached(Exception):
    pass


@pytest.fixture
def no_export(monkeypatch):
    """Make reaching the exporter an exception: tests of the checks stay fast and prove they come first."""

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(torch.onnx, "export", reached)


def test_refusals_come_before_any_write(tmp_path, no_export):
    out = tmp_path / "out"
    gpt2 = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model(
            "gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB_SIZE, bos_token_id=0, eos_token_id=0
        )
    )
    with pytest.raises(ValueError, match="does not know the architecture 'gpt2'"):
        export_onnx(gpt2, out)
    with pytest.raises(ValueError, match="does not export BertForMultipleChoice"):
        export_onnx(AutoModelForMultipleChoice.from_config(tiny_config("bert")), out)
    with pytest.raises(ValueError, match="Unknown quantize mode"):
        export_onnx(tiny_model("bert"), out, quantize="int4")
    with pytest.raises(ValueError, match="calibration_texts"):
        export_onnx(tiny_model("bert"), out, quantize="static")
    with pytest.raises(ValueError, match="opset=17"):
        export_onnx(tiny_model("bert"), out, opset=17)
    with pytest.raises(ValueError, match="float16.*model.float"):
        export_onnx(tiny_model("bert").half(), out)
    assert not out.exists()


def test_refuses_the_models_own_folder_and_foreign_folders(tmp_path, no_export):
    model = tiny_model("bert")
    model.save_pretrained(tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())
    with pytest.raises(ValueError, match="model's own checkpoint folder"):
        export_onnx(tmp_path / "model", tmp_path / "model")
    from hf_compress import load_compressed

    with pytest.raises(ValueError, match="model's own checkpoint folder"):
        export_onnx(load_compressed(tmp_path / "model"), tmp_path / "model")
    with pytest.raises(ValueError, match="not empty and holds no earlier ONNX export"):
        export_onnx(model, tmp_path)  # holds the checkpoint folder
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_onnx(model, tmp_path / "file")
    with pytest.raises(_Reached):  # an empty folder is fine
        (tmp_path / "empty").mkdir()
        export_onnx(model, tmp_path / "empty")


def test_refuses_live_masks_and_torch_int8_with_the_fix(tmp_path, no_export):
    model = tiny_model("bert")
    magnitude_prune(model, 0.5)
    with pytest.raises(ValueError, match=r"live magnitude-pruning masks.*make_permanent"):
        export_onnx(model, tmp_path / "out")
    make_permanent(model)
    with pytest.raises(_Reached):  # folded: every check passes
        export_onnx(model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"quantized by PyTorch.*quantize='dynamic'"):
        export_onnx(quantize_dynamic_int8(tiny_model("bert")), tmp_path / "out")
    assert not (tmp_path / "out").exists()
