"""`hf-compress` never does something silently wrong: bad inputs fail before any work, with one line naming the fix.

Each test here failed on the code before the fix (a broken tokenizer used and saved, an overwritten or lost output,
raw tracebacks, a summary printed twice, `TypeError`s from `PruningConfig`, `round_ffn_plan(uniform=True)` cutting
layers the plan never named).
"""

from __future__ import annotations

import inspect
import json
import logging
import math

import pytest
from conftest import TOY_REVIEWS, VOCAB_SIZE, tiny_model, word_tokenizer
from transformers import AutoTokenizer

from hf_compress import (
    PruningConfig,
    get_structure,
    load_compressed,
    prune,
    prune_ffn_neurons,
    round_ffn_plan,
    save_plan,
)
from hf_compress.cli import main
from hf_compress.pruning import config as pruning_config

SENTENCES = TOY_REVIEWS
WORDS = "the a movie film good bad great awful fun dull not very plot actor story love hate i was is , .".split()
FAST = ["--num-samples", "16", "--batch-size", "8", "--max-length", "32"]


def _tokenizer(folder, words=WORDS, size=VOCAB_SIZE):
    """A WordPiece tokenizer with `size` tokens, the first real ones being `words`, saved to `folder`."""
    tokenizer = word_tokenizer(folder, words, size)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture
def model_only(tmp_path):
    """A model folder with no tokenizer files."""
    folder = tmp_path / "model"
    tiny_model("bert").save_pretrained(folder)
    return folder


@pytest.fixture
def checkpoint(model_only):
    """A model folder with a working tokenizer."""
    _tokenizer(model_only)
    return model_only


@pytest.fixture
def good_tokenizer(tmp_path):
    folder = tmp_path / "tokenizer"
    _tokenizer(folder)
    return folder


@pytest.fixture
def glue_folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [f"{s}\t{i % 2}" for i, s in enumerate(SENTENCES * 3)]
    for split in ("train", "validation"):
        (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return folder


@pytest.fixture
def plan_file(tmp_path):
    """A plan for `tiny_model("bert")`, made in Python (no calibration needed)."""
    model = tiny_model("bert")
    report = prune(model, PruningConfig(keep=0.5, importance="magnitude", rescale=False), show_progress=False)
    path = tmp_path / "plan.json"
    save_plan(report.plan, path)
    return path


def _snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def _error_line(capsys) -> str:
    """The command's single error line on stderr (progress bars aside); fails on a traceback or several lines."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _prune(model, data, out, *extra):
    return main(
        [
            "prune",
            "--model",
            str(model),
            "--dataset",
            str(data),
            "--keep",
            "0.5",
            *FAST,
            "--output-dir",
            str(out),
            *extra,
        ]
    )


#### 3. A tokenizer that cannot encode the calibration text is refused; --tokenizer names the right one


def test_prune_refuses_model_folder_without_tokenizer_files(tmp_path, model_only, glue_folder, capsys):
    out = tmp_path / "pruned"
    assert _prune(model_only, glue_folder, out) == 2
    line = _error_line(capsys)
    assert str(model_only) in line and "no tokenizer files" in line and "--tokenizer" in line
    assert not out.exists()  # nothing pruned, nothing written


def test_prune_refuses_tokenizer_much_smaller_than_the_vocabulary(tmp_path, model_only, glue_folder, capsys):
    # What transformers 5 makes of a folder without vocabulary: 5 special tokens, all text -> [UNK].
    _tokenizer(model_only, words=[], size=5)
    out = tmp_path / "pruned"
    assert _prune(model_only, glue_folder, out) == 2
    line = _error_line(capsys)
    assert "5 tokens" in line and f"{VOCAB_SIZE} token embeddings" in line and "--tokenizer" in line
    assert not out.exists()


def test_prune_refuses_tokenizer_that_reads_mostly_unknown_tokens(tmp_path, model_only, glue_folder, capsys):
    _tokenizer(model_only, words=[])  # full size, but none of the calibration words
    out = tmp_path / "pruned"
    assert _prune(model_only, glue_folder, out) == 2
    line = _error_line(capsys)
    assert "unknown token '[UNK]'" in line and "--tokenizer" in line
    assert not out.exists()


def test_prune_with_tokenizer_flag_calibrates_and_saves_that_tokenizer(
    tmp_path, model_only, good_tokenizer, glue_folder
):
    out = tmp_path / "pruned"
    assert _prune(model_only, glue_folder, out, "--tokenizer", str(good_tokenizer)) == 0
    saved = AutoTokenizer.from_pretrained(out)
    assert len(saved) == VOCAB_SIZE
    assert saved("the movie")["input_ids"] == [2, 5, 7, 3]  # [CLS] the movie [SEP]: real ids, no [UNK]


def test_apply_plan_without_usable_tokenizer_saves_none_and_says_so(tmp_path, model_only, plan_file, capsys):
    out = tmp_path / "applied"
    assert main(["apply-plan", "--model", str(model_only), "--plan", str(plan_file), "--output-dir", str(out)]) == 0
    assert "WITHOUT a tokenizer" in capsys.readouterr().out
    assert not any(name.startswith(("tokenizer", "vocab")) for name in _snapshot(out))
    assert get_structure(load_compressed(out)).heads != (4, 4, 4, 4)  # the plan was applied
    # A --tokenizer that is no better is an error, not a silent fallback.
    broken = tmp_path / "broken"
    _tokenizer(broken, words=[], size=5)
    args = ["apply-plan", "--model", str(model_only), "--plan", str(plan_file), "--tokenizer", str(broken)]
    assert main([*args, "--output-dir", str(tmp_path / "again")]) == 2
    assert "--tokenizer" in _error_line(capsys)
    assert not (tmp_path / "again").exists()


def test_help_documents_tokenizer_and_overwrite(capsys):
    for command in ("prune", "apply-plan"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert "--tokenizer" in out and "--overwrite" in out


#### 5. Outputs are checked before any work; the input model is never overwritten; one-line input errors


@pytest.mark.parametrize("spelling", ["same", "trailing-slash", "dot-dot"])
def test_output_dir_equal_to_model_is_refused_and_model_untouched(tmp_path, checkpoint, glue_folder, capsys, spelling):
    before = _snapshot(checkpoint)
    out = {
        "same": str(checkpoint),
        "trailing-slash": f"{checkpoint}/",
        "dot-dot": str(checkpoint / ".." / checkpoint.name),
    }[spelling]
    assert _prune(checkpoint, glue_folder, out) == 2
    line = _error_line(capsys)
    assert "--output-dir" in line and "--model folder" in line
    assert _snapshot(checkpoint) == before


def test_output_dir_equal_to_model_is_refused_even_with_overwrite(
    tmp_path, checkpoint, glue_folder, plan_file, capsys
):
    before = _snapshot(checkpoint)
    assert _prune(checkpoint, glue_folder, checkpoint, "--overwrite") == 2
    assert "--model folder" in _error_line(capsys)
    args = ["apply-plan", "--model", str(checkpoint), "--plan", str(plan_file), "--output-dir", str(checkpoint)]
    assert main(args) == 2
    assert "--model folder" in _error_line(capsys)
    assert _snapshot(checkpoint) == before


def test_output_dir_that_is_a_file_is_refused_before_pruning(tmp_path, checkpoint, glue_folder, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert _prune(checkpoint, glue_folder, out) == 2
    line = _error_line(capsys)
    assert str(out) in line and "existing file" in line
    assert out.read_text() == "keep me"


def test_non_empty_foreign_output_dir_needs_overwrite(tmp_path, checkpoint, glue_folder, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert _prune(checkpoint, glue_folder, out) == 2
    line = _error_line(capsys)
    assert "notes.txt" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _prune(checkpoint, glue_folder, out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "my notes" and (out / "pruning_plan.json").is_file()
    # A previous output (it has pruning_plan.json) is replaced without --overwrite.
    assert _prune(checkpoint, glue_folder, out) == 0


def test_apply_plan_missing_or_malformed_plan_names_the_file(tmp_path, checkpoint, capsys):
    base = ["apply-plan", "--model", str(checkpoint), "--output-dir", str(tmp_path / "out")]
    missing = tmp_path / "missing.json"
    assert main([*base, "--plan", str(missing)]) == 2
    line = _error_line(capsys)
    assert str(missing) in line and "no such file" in line
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": ')
    assert main([*base, "--plan", str(broken)]) == 2
    line = _error_line(capsys)
    assert str(broken) in line and "not valid JSON" in line
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps({"format": "hf-compress-pruning-plan", "version": 1}))
    assert main([*base, "--plan", str(damaged)]) == 2
    line = _error_line(capsys)
    assert str(damaged) in line and "model_type" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--num-samples", "--batch-size", "--max-length"])
def test_sizes_below_one_are_refused_at_parse_time(tmp_path, checkpoint, glue_folder, capsys, flag):
    args = ["prune", "--model", str(checkpoint), "--dataset", str(glue_folder), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, flag, "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: '0' is not a positive integer" in err and "Traceback" not in err


@pytest.mark.parametrize("source", ["folder", "file"])
def test_missing_text_column_names_this_clis_flag_and_the_columns(tmp_path, checkpoint, glue_folder, capsys, source):
    data = glue_folder if source == "folder" else glue_folder / "train.tsv"
    assert _prune(checkpoint, data, tmp_path / "out", "--text-column", "nosuch") == 2
    line = _error_line(capsys)
    assert "--text-column nosuch" in line and "'sentence', 'label'" in line and "--text_columns" not in line


#### 14. The summary is printed once


def test_prune_prints_its_summary_once(tmp_path, checkpoint, glue_folder, capsys, caplog):
    caplog.set_level(logging.INFO)  # the level the command line logs at
    assert _prune(checkpoint, glue_folder, tmp_path / "out") == 0
    captured = capsys.readouterr()
    assert captured.out.count("Removed ") == 1
    assert (captured.out + captured.err + caplog.text).count("Removed ") == 1


#### 10. PruningConfig: every bad value is a ValueError naming it and the valid range


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": "0.5"}, r"keep='0.5' must be a number \(not str\) in \(0, 1\]"),
        ({"keep": None}, r"keep=None must be a number \(not NoneType\) in \(0, 1\]"),
        ({"keep": math.nan}, r"keep=nan must be in \(0, 1\]"),
        ({"target": "ratios", "head_ratio": "0.25"}, r"head_ratio='0.25' must be None or a number .* in \[0, 1\]"),
        ({"target": "ratios", "ffn_ratio": [0.5]}, r"ffn_ratio=\[0.5\] must be None or a number .* in \[0, 1\)"),
        ({"rescale_damping": "0.01"}, r"rescale_damping='0.01' must be a finite number >= 0"),
        ({"rescale_damping": math.inf}, r"rescale_damping=inf must be a finite number >= 0"),
        ({"layers": "2"}, r"layers='2' must be a number of layers"),
        ({"layers": [1, "2"]}, r"layers=\[1, '2'\] must hold non-negative integer layer indices"),
        ({"uniform": "no"}, r"uniform='no' must be True or False"),
        ({"rescale": None}, r"rescale=None must be True or False"),
        ({"num_batches": True}, r"num_batches=True must be a positive integer"),
        ({"target": None}, r"target=None is not supported; choose one of flops, params, ratios"),
        ({"seq_len": 1.5}, r"seq_len=1.5 must be a positive integer"),
    ],
)
def test_pruning_config_bad_types_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_pruning_config_names_the_real_callback_class():
    source = inspect.getsource(pruning_config)
    assert "GradualPruningCallback" not in source and "GradualStructuredPruningCallback" in source


#### 16. round_ffn_plan(uniform=True) never cuts layers the plan does not name


def test_round_ffn_plan_uniform_must_name_every_layer():
    model = tiny_model("bert")  # 4 layers of 24 neurons
    plan = {0: list(range(12)), 1: list(range(12))}
    with pytest.raises(ValueError, match=r"layers \[2, 3\].*\{2: \[\]\}.*uniform=False"):
        round_ffn_plan(model, plan, uniform=True, round_to=4)
    # Without uniform, the layers the plan does not name stay whole.
    assert round_ffn_plan(model, plan, round_to=4) == plan
    # Naming every layer says the untouched ones take part: mean kept width (12 + 12 + 24 + 24) / 4 = 18 -> 20.
    rounded = round_ffn_plan(model, {**plan, 2: [], 3: []}, uniform=True, round_to=4)
    prune_ffn_neurons(model, rounded)
    assert get_structure(model).ffn == (20, 20, 20, 20)
