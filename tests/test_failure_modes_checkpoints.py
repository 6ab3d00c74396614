"""Damaged checkpoints fail loudly instead of loading as a different model (issue 13, "keep it found")."""

import json

import pytest
import torch
from conftest import random_batch, tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from hf_compress import from_pretrained_int8, load_compressed, prune_ffn_neurons, prune_heads


@pytest.fixture
def pruned_checkpoint(tmp_path):
    model = tiny_model("bert")
    prune_heads(model, {0: [0]})
    prune_ffn_neurons(model, {1: [0, 1, 2]})
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_corrupted_config_is_an_error(pruned_checkpoint):
    _, folder = pruned_checkpoint
    (folder / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="not a valid JSON"):
        load_compressed(folder)
    with pytest.raises(OSError, match="not a valid JSON"):
        from_pretrained_int8(folder, AutoModelForSequenceClassification)


def test_missing_weights_file_is_an_error(pruned_checkpoint):
    _, folder = pruned_checkpoint
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        load_compressed(folder)


def test_truncated_weights_file_is_an_error(pruned_checkpoint):
    _, folder = pruned_checkpoint
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="deserializ|incomplete"):
        load_compressed(folder)


def test_weights_file_missing_a_tensor_is_refused(pruned_checkpoint):
    # Stock from_pretrained initialises a missing tensor at random and only logs it: a silently different model.
    _, folder = pruned_checkpoint
    tensors = load_file(folder / "model.safetensors")
    del tensors["bert.encoder.layer.1.intermediate.dense.bias"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*intermediate\.dense\.bias"):
        load_compressed(folder)


def test_complete_checkpoint_loads_exactly(pruned_checkpoint):
    model, folder = pruned_checkpoint
    loaded, info = load_compressed(folder, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    batch = {k: v for k, v in random_batch().items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)
    assert json.loads((folder / "config.json").read_text())["hf_compress"]["num_attention_heads_per_layer"][0] == 3
