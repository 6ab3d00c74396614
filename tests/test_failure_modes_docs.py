"""Failure modes of what hf-compress tells users: model cards and printed sizes (issue 13, items 12-13)."""

import re

from conftest import tiny_model

from hf_compress import (
    build_comparison,
    compression_report,
    create_model_card,
    describe_model,
    format_bytes,
    prune_ffn_neurons,
)


def test_card_without_latency_setup_publishes_no_placeholder(tmp_path):
    # The README's snippet gives latency_ms per model but no `latency=` description: the card used to render
    # "a batch of ? sequences of ? tokens".
    teacher, student = tiny_model("bert"), tiny_model("bert", seed=1)
    comparison = build_comparison(
        {**describe_model(teacher), "metrics": {"accuracy": 0.9}, "latency_ms": 30.0},
        {**describe_model(student), "metrics": {"accuracy": 0.88}, "latency_ms": 12.0},
    )
    create_model_card(tmp_path, student, comparison=comparison)
    text = (tmp_path / "README.md").read_text()
    assert "?" not in text.split("## Results", 1)[1].split("##", 1)[0]
    assert "Latency is the median time of one forward pass, measured in the same run for both models." in text


def test_card_describes_the_latency_setup_that_was_recorded(tmp_path):
    teacher, student = tiny_model("bert"), tiny_model("bert", seed=1)
    comparison = build_comparison(
        {**describe_model(teacher), "metrics": {"accuracy": 0.9}, "latency_ms": 30.0},
        {**describe_model(student), "metrics": {"accuracy": 0.88}, "latency_ms": 12.0},
        latency={"device_name": "AMD EPYC", "torch_threads": 2, "batch_size": 32, "sequence_length": 64},
    )
    create_model_card(tmp_path, student, comparison=comparison)
    text = (tmp_path / "README.md").read_text()
    assert "over a batch of 32 sequences of 64 tokens on AMD EPYC with 2 torch threads" in text


def test_card_without_latency_has_no_latency_sentence(tmp_path):
    teacher, student = tiny_model("bert"), tiny_model("bert", seed=1)
    comparison = build_comparison(
        {**describe_model(teacher), "metrics": {"accuracy": 0.9}},
        {**describe_model(student), "metrics": {"accuracy": 0.88}},
    )
    create_model_card(tmp_path, student, comparison=comparison)
    text = (tmp_path / "README.md").read_text()
    assert "Latency is" not in text and "Latency per batch" not in text


def test_format_bytes_is_decimal():
    assert format_bytes(90_867_952) == "90.9 MB"
    assert format_bytes(2_500_000_000) == "2.5 GB"
    assert format_bytes(1_500) == "1.5 kB"
    assert format_bytes(12) == "12 B"


def test_one_size_in_report_and_card(tmp_path):
    # compression_report printed 90.86 MB and the card 86.7 MB for the same 90,867,952-byte model.
    reference = tiny_model("bert", hidden_size=64, intermediate_size=4096, num_attention_heads=4)
    model = tiny_model("bert", hidden_size=64, intermediate_size=4096, num_attention_heads=4)
    prune_ffn_neurons(model, {0: list(range(100))})
    size = describe_model(model)["size_bytes"]
    assert size > 1e6  # large enough that MB and MiB round differently
    expected = format_bytes(size)
    assert expected in str(compression_report(reference, model))
    comparison = build_comparison(
        {**describe_model(reference), "metrics": {"accuracy": 0.9}},
        {**describe_model(model), "metrics": {"accuracy": 0.9}},
    )
    create_model_card(tmp_path, model, comparison=comparison)
    card = (tmp_path / "README.md").read_text()
    assert re.search(
        rf"\| Size on disk \| {re.escape(format_bytes(describe_model(reference)['size_bytes']))} \| "
        rf"{re.escape(expected)} \|",
        card,
    )
