"""The compression benchmark (benchmarks/compression_table.py) end to end on a tiny teacher and a few sentences."""

import json
import os
from pathlib import Path

import pytest
from conftest import TOY_SENTENCES as SENTENCES
from conftest import teacher_and_data_folders

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REACHABLE_ONLY_AT_SCALE = {"latency-7x-distilled", "latency-12x-distilled"}
RUNTIMES = ["pytorch-fp32", "pytorch-int8", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static"]


@pytest.fixture
def compression_table(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compression_table

    return compression_table


def _workspace(tmp_path, tokenizer, labels: tuple[str, ...], text_column: str):
    """A tiny 6-layer teacher with `labels`, a data folder with `text_column` and string labels, and a README."""
    teacher_and_data_folders(
        tmp_path, tokenizer, labels, text_column, train_repeat=4, string_labels=True, num_hidden_layers=6,
        intermediate_size=32,
    )  # fmt: skip
    (tmp_path / "README.md").write_text(
        "# Title\n\n<!-- compression-table:begin -->\nold\n<!-- compression-table:end -->\n\nMore text.\n"
    )
    return tmp_path


@pytest.fixture
def workspace(tmp_path, tiny_tokenizer):
    return _workspace(tmp_path, tiny_tokenizer, ("negative", "positive"), "sentence")


def _argv(workspace, *extra):
    return [
        "--teacher", str(workspace / "teacher"), "--data", str(workspace / "data"),
        "--output", str(workspace / "results.json"), "--plot", str(workspace / "plot.png"),
        "--readme", str(workspace / "README.md"), "--work-dir", str(workspace / "work"),
        "--latency-table", str(workspace / "work" / "latency_table.json"),
        "--train-samples", "24", "--batch-size", "4", "--num-calibration", "8", "--seq-len", "16",
        "--max-length", "16", "--warmup", "0", "--rounds", "2", "--num-real", "3", "--threads", "1", *extra,
    ]  # fmt: skip


def test_every_variant_builds_and_renders(workspace, compression_table):
    import compression_recipes

    # The tiny teacher's embeddings and head take most of its time: 7x and 12x are refused as out of reach.
    names = [v.name for v in compression_recipes.default_variants(6) if v.name not in REACHABLE_ONLY_AT_SCALE]
    argv = ["--variants", *names, "--seeds", "0", "--runtimes", "pytorch-fp32"]
    results = compression_table.main(_argv(workspace, *argv))

    saved = json.loads((workspace / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    names = [row["name"] for row in saved["variants"]]
    assert names[0] == "teacher" and len(names) == len(set(names))
    assert {"student-3l", "student-2l", "pruned-2x", "pruned-4x-distilled", "latency-3.3x-distilled"} <= set(names)
    by_name = {row["name"]: row["seeds"]["0"] for row in saved["variants"]}
    teacher = by_name["teacher"]
    assert teacher["runtimes"]["pytorch-fp32"]["retained"] == 1.0
    # Pruning met its FLOPs budget (the kept cost is at most the target).
    for name, keep in (("pruned-2x", 0.5), ("pruned-4x-distilled", 0.25)):
        assert by_name[name]["flops_per_sequence"] <= keep * teacher["flops_per_sequence"]
        assert by_name[name]["flops_reduction"] >= 1 / keep
    # One teacher cache serves every distilled variant: the first builds it, the others reuse the file.
    distilled = [row["seeds"]["0"] for row in saved["variants"] if row["recipe"] in ("distil", "prune_then_distil")]
    assert [seed["teacher_cache_built"] for seed in distilled] == [True] + [False] * (len(distilled) - 1)
    assert len(list((workspace / "work" / "teacher-cache").glob("*.safetensors"))) == 1
    # The latency-budgeted variants measured their table once, where they were told.
    assert (workspace / "work" / "latency_table.json").is_file()

    assert (workspace / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (workspace / "README.md").read_text()
    assert "old" not in readme and readme.startswith("# Title") and readme.endswith("More text.\n")
    assert "| teacher | pytorch-fp32 |" in readme and "| student, 3 layers, distilled | pytorch-fp32 |" in readme
    assert "the teacher's outputs on them were cached once" in readme
    assert ">= 99% of the teacher at >= 3x" in readme and ">= 97% of the teacher at >= 4x (batch 1" in readme


def test_seeds_and_runtimes_multiclass_string_labels(tmp_path, tiny_tokenizer, compression_table):
    """The command runs unchanged on another folder: three string labels, another text column, relative paths."""
    workspace = _workspace(tmp_path, tiny_tokenizer, ("neg", "neutral", "pos"), "review")
    argv = ["--variants", "pruned-2x", "latency-3.3x-distilled", "--seeds", "0", "1", "--runtimes", *RUNTIMES]
    argv += ["--text-columns", "review"]
    results = compression_table.main(_argv(workspace, *argv))

    assert results["setup"]["seeds"] == [0, 1] and results["setup"]["num_eval"] == len(SENTENCES)
    assert not Path(results["setup"]["teacher"]).is_absolute()  # the README shows no machine's absolute path
    rows = {row["name"]: row for row in results["variants"]}
    assert list(rows) == ["teacher", "pruned-2x", "latency-3.3x-distilled"]
    assert list(rows["teacher"]["seeds"]) == ["0"]
    assert list(rows["pruned-2x"]["seeds"]) == ["0", "1"]
    for row in rows.values():
        for seed in row["seeds"].values():
            assert list(seed["runtimes"]) == RUNTIMES
            for measured in seed["runtimes"].values():
                assert 0 <= measured["accuracy"] <= 1 and measured["size_bytes"] > 0
                for setting in ("b32x16", "b1_real"):
                    assert measured[setting]["median_ms"] > 0 and measured[setting]["median"] > 0
    reference = rows["teacher"]["seeds"]["0"]["runtimes"]["pytorch-fp32"]
    assert reference["b32x16"]["median"] == 1.0 and reference["retained"] == 1.0
    # Each seed's models were saved and exported apart.
    for seed in (0, 1):
        assert (workspace / "work" / f"seed-{seed}" / "pruned-2x" / "onnx" / "model_int8_static.onnx").is_file()

    readme = (workspace / "README.md").read_text()
    assert "over 2 seeds (0, 1)" in readme and " +- " in readme
    # Of the two ONNX int8 modes, the table shows the better one per variant.
    teacher_rows = [line for line in readme.splitlines() if line.startswith("| teacher |")]
    assert len(teacher_rows) == len(RUNTIMES) - 1
    assert f"Teacher `{os.path.relpath(workspace / 'teacher', BENCHMARKS.parent)}`" in readme


def test_second_run_reuses_built_models(workspace, compression_table, caplog):
    argv = ["--variants", "pruned-2x", "--seeds", "0", "--runtimes", "pytorch-fp32", "onnx-fp32"]
    compression_table.main(_argv(workspace, *argv))
    exported = workspace / "work" / "seed-0" / "pruned-2x" / "onnx" / "model.onnx"
    first_export = exported.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="compression_table"):
        results = compression_table.main(_argv(workspace, *argv))
    assert "Reusing pruned-2x (seed 0)" in caplog.text
    assert exported.stat().st_mtime_ns == first_export  # a reused model keeps its export
    assert [row["name"] for row in results["variants"]] == ["teacher", "pruned-2x"]


def test_an_empty_teacher_cache_dir_runs_the_teacher_live(workspace, compression_table):
    argv = ["--variants", "student-2l", "--seeds", "0", "--runtimes", "pytorch-fp32", "--teacher-cache-dir", ""]
    results = compression_table.main(_argv(workspace, *argv))
    assert results["setup"]["teacher_cache"] is False
    assert results["variants"][1]["seeds"]["0"]["teacher_cache_seconds"] == 0
    assert not (workspace / "work" / "teacher-cache").exists()


def test_loss_settings_reach_the_students_and_the_table(workspace, compression_table, monkeypatch):
    import compression_recipes

    seen = []
    monkeypatch.setattr(compression_recipes.DistillationTrainer, "train", lambda self: seen.append(self.args))
    argv = ["--variants", "student-3l", "--temperature", "4", "--alpha", "0.9", "--hidden-loss-weight", "1"]
    argv += ["--seeds", "0", "--runtimes", "pytorch-fp32"]
    results = compression_table.main(_argv(workspace, *argv, "--hidden-loss-type", "cosine"))
    (args,) = seen
    assert (args.temperature, args.alpha, args.hidden_loss_weight, args.hidden_loss_type) == (4, 0.9, 1, "cosine")
    assert args.layer_mapping == {1: 1, 2: 4, 3: 6}  # each student layer -> the teacher layer it started from
    assert results["setup"]["num_train"] == 24
    assert "T=4, alpha=0.9, hidden-state loss (cosine) weight 1" in (workspace / "README.md").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runtimes", "tensorrt"], "Unknown or no runtimes"),
        (["--seeds", "0", "0"], "repeats a seed"),
        (["--variants", "nope"], "Unknown variants"),
    ],
)
def test_bad_arguments_are_refused_before_work(workspace, compression_table, argv, message):
    with pytest.raises(ValueError, match=message):
        compression_table.main(_argv(workspace, *argv))
    assert not (workspace / "work").exists()


def test_readme_without_markers_is_refused(workspace, compression_table):
    (workspace / "README.md").write_text("# No markers\n")
    with pytest.raises(ValueError, match="compression-table:begin"):
        compression_table.main(_argv(workspace, "--variants", "pruned-2x", "--seeds", "0"))
    assert not (workspace / "work").exists()
