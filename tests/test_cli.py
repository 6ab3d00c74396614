"""`hf-compress` on the command line, run in-process on tiny models and local files (no network)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from conftest import TOY_REVIEWS, tiny_model

from hf_compress import PruningConfig, apply_plan, get_structure, load_compressed, load_plan
from hf_compress.cli import build_parser, main

# A quote inside a TSV/CSV cell must come through the readers as it is.
SENTENCES = ['the movie was "great" fun', *TOY_REVIEWS[1:]]


@pytest.fixture
def checkpoint(tmp_path, tiny_tokenizer):
    folder = tmp_path / "model"
    tiny_model("bert").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def glue_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [f"{s}\t{i % 2}" for i, s in enumerate(SENTENCES * 3)]
    for split in ("train", "validation"):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


def _outputs(model, tokenizer_folder):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(tokenizer_folder)(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "prune" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--dataset", "--keep", "--target", "--importance", "--no-rescale", "--output-dir"):
        assert option in out


def test_prune_glue_folder_then_apply_plan(tmp_path, checkpoint, glue_folder):
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(checkpoint), "--dataset", str(glue_folder), "--keep", "0.5"]
    status = main([*args, "--num-samples", "16", "--batch-size", "8", "--max-length", "32", "--output-dir", str(out)])
    assert status == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "pruning_plan.json", "pruning_report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["flops_ratio"] <= 0.5 and report["config"]["keep"] == 0.5
    pruned = load_compressed(out)
    assert list(get_structure(pruned).heads) == report["after"]["heads_per_layer"]

    # The plan replays on the original, in Python and through the command line, to the same model.
    replayed = load_compressed(checkpoint)
    apply_plan(replayed, load_plan(out / "pruning_plan.json"))
    torch.testing.assert_close(_outputs(replayed, checkpoint), _outputs(pruned, checkpoint), rtol=0, atol=0)
    again = tmp_path / "again"
    plan_args = ["apply-plan", "--model", str(checkpoint), "--plan", str(out / "pruning_plan.json")]
    assert main([*plan_args, "--output-dir", str(again)]) == 0
    torch.testing.assert_close(_outputs(load_compressed(again), checkpoint), _outputs(pruned, checkpoint))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_single_unlabelled_file(tmp_path, checkpoint, suffix):
    data = tmp_path / f"calibration{suffix}"
    if suffix == ".jsonl":
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    else:
        separator = "," if suffix == ".csv" else "\t"
        data.write_text("text\n" + "\n".join(s.replace(",", "") if separator == "," else s for s in SENTENCES) + "\n")
    out = tmp_path / "pruned"
    args = ["prune", "--model", str(checkpoint), "--dataset", str(data), "--target", "params", "--keep", "0.7"]
    assert main([*args, "--uniform", "--output-dir", str(out)]) == 0
    structure = get_structure(load_compressed(out))
    assert structure.is_stock and structure.ffn[0] < 24


def test_errors(tmp_path, checkpoint, glue_folder, capsys):
    out = str(tmp_path / "out")
    assert (
        main(["prune", "--model", str(checkpoint), "--dataset", str(glue_folder), "--keep", "2", "--output-dir", out])
        == 2
    )
    assert "keep=2.0 must be in (0, 1]" in capsys.readouterr().err
    missing = str(tmp_path / "no-such-folder")
    assert main(["prune", "--model", str(checkpoint), "--dataset", missing, "--output-dir", out]) == 2
    assert "no-such-folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            ["prune", "--model", str(checkpoint), "--dataset", str(glue_folder), "--layers", "x", "--output-dir", out]
        )


def test_every_pruning_config_field_is_a_flag_of_its_type():
    args = build_parser().parse_args(["prune", "--model", "m", "--dataset", "d", "--output-dir", "o"])
    for field in dataclasses.fields(PruningConfig):
        assert getattr(args, field.name) == field.default, field.name
    args = build_parser().parse_args(
        ["prune", "--model", "m", "--dataset", "d", "--output-dir", "o", "--keep", "0.3", "--round-to", "4"]
        + ["--layers", "1,3", "--uniform", "--no-rescale"]
    )
    assert (args.keep, args.round_to, args.layers, args.uniform, args.rescale) == (0.3, 4, [1, 3], True, False)
    assert (
        build_parser()
        .parse_args(["prune", "--model", "m", "--dataset", "d", "--output-dir", "o", "--layers", "2"])
        .layers
        == 2
    )


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run(
        [sys.executable, "-m", "hf_compress.cli", "--help"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "apply-plan" in result.stdout
