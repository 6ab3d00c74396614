"""compression_report: parameters, bytes on disk, per-layer structure and FLOPs per token, against a reference."""

import json
import struct

import pytest
from conftest import ARCHITECTURES, tiny_model

from hf_compress import compression_report, drop_layers, get_structure, prune_ffn_neurons, prune_heads

HIDDEN, HEAD_DIM = 16, 4


def _encoder_flops(heads, ffn, seq_len):
    """The cost model, by hand: per head q/k/v/o projections (8 * D * d) and attention (4 * S * d); per neuron 4 * D."""
    return sum(
        h * (8 * HIDDEN * HEAD_DIM + 4 * seq_len * HEAD_DIM) + n * 4 * HIDDEN for h, n in zip(heads, ffn, strict=True)
    )


def _safetensors_data_bytes(path):
    """Bytes of tensor data in a safetensors file: its size minus the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        (header_length,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header_length


def _pruned(model_type, task="sequence-classification"):
    model = tiny_model(model_type, task)
    prune_heads(model, {0: [1, 3], 1: [0, 1, 2, 3]})
    prune_ffn_neurons(model, {2: list(range(24)), 3: [0, 1, 2, 3]})
    drop_layers(model, [0])
    return model


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_report_counts_against_the_reference(model_type, tmp_path):
    # Masked LM: the output embeddings are tied to the input ones, and both the count and the bytes count them once.
    reference = tiny_model(model_type, "masked-lm")
    model = _pruned(model_type, "masked-lm")
    report = compression_report(model, reference=reference, seq_len=32)

    assert report.model.heads_per_layer == (0, 4, 4)
    assert report.model.ffn_per_layer == (24, 0, 20)
    assert report.reference.heads_per_layer == (4, 4, 4, 4)
    assert report.model.flops_per_token == _encoder_flops((0, 4, 4), (24, 0, 20), 32)
    assert report.reference.flops_per_token == _encoder_flops((4,) * 4, (24,) * 4, 32)
    assert report.ratio("flops_per_token") == report.model.flops_per_token / report.reference.flops_per_token
    assert report.model.parameters == sum(p.numel() for p in model.parameters())
    for summary, source, name in ((report.model, model, "pruned"), (report.reference, reference, "reference")):
        source.save_pretrained(tmp_path / name)
        assert summary.size_bytes == _safetensors_data_bytes(tmp_path / name / "model.safetensors")
    assert report.model.size_bytes < report.reference.size_bytes
    assert report.model.structure == get_structure(model) and report.model.max_heads == 4
    # Plain data, with the structure flattened into the keys saved reports have always used.
    data = json.loads(json.dumps(report.to_dict()))
    assert data["seq_len"] == 32 and data["reference"]["heads_per_layer"] == [4, 4, 4, 4]
    assert data["model"] == {
        "parameters": report.model.parameters,
        "size_bytes": report.model.size_bytes,
        "heads_per_layer": [0, 4, 4],
        "ffn_per_layer": [24, 0, 20],
        "max_heads": 4,
        "flops_per_token": report.model.flops_per_token,
    }


def test_report_table():
    report = compression_report(_pruned("bert"), reference=tiny_model("bert"), seq_len=64)
    table = str(report)
    lines = table.splitlines()
    assert lines[0].split() == ["model", "reference", "model", "/", "reference"]
    rows = {line.split("  ")[0].strip(): line.split() for line in lines[2:8]}
    assert rows["layers"][-3:] == ["3", "4", "75.0%"]
    assert rows["attention heads"][-3:] == ["8", "16", "50.0%"]
    assert rows["FFN neurons"][-3:] == ["44", "96", "45.8%"]
    assert rows["parameters"][-2] == f"{report.reference.parameters:,}"
    assert f"{report.ratio('parameters'):.1%}" in rows["parameters"][-1]
    assert "encoder FLOPs/token @ 64 tokens" in table
    # One row per layer: heads kept of the unpruned count, FFN neurons.
    assert [line.split() for line in lines[-3:]] == [
        ["0", "0/4", "24"],
        ["1", "4/4", "0"],
        ["2", "4/4", "20"],
    ]


def test_report_without_reference():
    report = compression_report(tiny_model("distilbert"))
    assert report.reference is None and report.ratio("parameters") is None
    assert report.seq_len == 128
    assert report.model.flops_per_token == _encoder_flops((4,) * 4, (24,) * 4, 128)
    assert str(report).splitlines()[0].split() == ["model"]


@pytest.mark.parametrize("seq_len", [0, -3, 1.5, True])
def test_report_rejects_bad_seq_len(seq_len):
    with pytest.raises(ValueError, match="seq_len=.* must be a positive integer"):
        compression_report(tiny_model("bert"), seq_len=seq_len)
