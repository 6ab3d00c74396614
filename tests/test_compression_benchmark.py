"""The compression benchmark (benchmarks/compression_table.py) end to end on a tiny teacher and a few sentences."""

import json
from pathlib import Path

import pytest
from conftest import tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SENTENCES = ["a good movie", "a bad film", "great fun", "dull and awful", "not very good", "love the story"]


@pytest.fixture
def compression_table(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import compression_table

    return compression_table


@pytest.fixture
def workspace(tmp_path, tiny_tokenizer):
    teacher = tiny_model("bert", num_hidden_layers=6, intermediate_size=32)
    teacher.config.id2label, teacher.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    data = tmp_path / "data"
    data.mkdir()
    for split, repeat in (("train", 4), ("validation", 1)):
        rows = [f"{sentence}\t{i % 2}" for i, sentence in enumerate(SENTENCES)] * repeat
        (data / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    (tmp_path / "README.md").write_text(
        "# Title\n\n<!-- compression-table:begin -->\nold\n<!-- compression-table:end -->\n\nMore text.\n"
    )
    return tmp_path


def _argv(workspace, *extra):
    return [
        "--teacher", str(workspace / "teacher"), "--data", str(workspace / "data"),
        "--output", str(workspace / "results.json"), "--plot", str(workspace / "plot.png"),
        "--readme", str(workspace / "README.md"), "--work-dir", str(workspace / "work"),
        "--train-samples", "24", "--batch-size", "4", "--num-calibration", "8", "--seq-len", "16",
        "--max-length", "16", "--warmup", "0", "--repeats", "2", "--threads", "1", *extra,
    ]  # fmt: skip


def test_benchmark_writes_json_plot_and_readme_table(workspace, compression_table):
    results = compression_table.main(_argv(workspace))

    saved = json.loads((workspace / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    names = [row["name"] for row in saved["variants"]]
    assert names[0] == "teacher" and len(names) == len(set(names))
    assert {"student-3l", "student-3l-3ep", "student-2l", "pruned-2x", "pruned-4x-distilled", "teacher-int8"} <= set(
        names
    )
    teacher = saved["variants"][0]
    assert teacher["retained"] == 1.0 and teacher["speedup"]["b32_seq"] > 0
    for row in saved["variants"]:
        assert 0 <= row["accuracy"] <= 1
        assert set(row["latency_ms"]) == {"b32_seq", "b1_seq", "b32_real", "b1_real"}
        assert row["size_bytes"] > 0 and row["parameters"] > 0
    by_name = {row["name"]: row for row in saved["variants"]}
    # Pruning met its FLOPs budget (the kept cost is at most the target), and the realised ratio is reported.
    for name, keep in (("pruned-2x", 0.5), ("pruned-4x-distilled", 0.25)):
        assert by_name[name]["flops_per_sequence"] <= keep * teacher["flops_per_sequence"]
        assert by_name[name]["realised_over_flops"] == pytest.approx(
            by_name[name]["speedup"]["b32_seq"] / by_name[name]["flops_reduction"]
        )
    assert "realised_over_flops" not in by_name["teacher-int8"]
    # One teacher cache serves every distilled variant: the first builds it, the others reuse the file.
    distilled = [row for row in saved["variants"] if row["recipe"] == "distil"]
    assert [row["teacher_cache_built"] for row in distilled] == [True] + [False] * (len(distilled) - 1)
    assert len(list((workspace / "work" / "teacher-cache").glob("*.safetensors"))) == 1

    assert (workspace / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (workspace / "README.md").read_text()
    assert "old" not in readme and readme.startswith("# Title") and readme.endswith("More text.\n")
    assert "| teacher |" in readme and "student, 3 layers, distilled" in readme
    assert "the teacher's outputs on them were cached once" in readme

    # A second run reuses the built models (same settings) and only re-times them; --render-only redraws the table.
    (workspace / "README.md").write_text("<!-- compression-table:begin -->\n<!-- compression-table:end -->\n")
    compression_table.main(_argv(workspace, "--render-only"))
    assert "| teacher |" in (workspace / "README.md").read_text()


def test_second_run_reuses_built_models(workspace, compression_table, caplog):
    compression_table.main(_argv(workspace, "--variants", "pruned-2x"))
    with caplog.at_level("INFO", logger="compression_table"):
        results = compression_table.main(_argv(workspace, "--variants", "pruned-2x"))
    assert "Reusing pruned-2x" in caplog.text
    assert [row["name"] for row in results["variants"]] == ["teacher", "pruned-2x"]


def test_an_empty_teacher_cache_dir_runs_the_teacher_live(workspace, compression_table):
    results = compression_table.main(_argv(workspace, "--variants", "student-2l", "--teacher-cache-dir", ""))
    assert results["setup"]["teacher_cache"] is False
    assert results["variants"][1]["teacher_cache_seconds"] == 0 and not (workspace / "work" / "teacher-cache").exists()


def test_loss_settings_reach_the_students_and_the_table(workspace, compression_table, monkeypatch):
    import compression_recipes

    seen = []
    monkeypatch.setattr(compression_recipes.DistillationTrainer, "train", lambda self: seen.append(self.args))
    argv = ["--variants", "student-3l", "--temperature", "4", "--alpha", "0.9", "--hidden-loss-weight", "1"]
    results = compression_table.main(_argv(workspace, *argv, "--hidden-loss-type", "cosine"))
    (args,) = seen
    assert (args.temperature, args.alpha, args.hidden_loss_weight, args.hidden_loss_type) == (4, 0.9, 1, "cosine")
    assert args.layer_mapping == {1: 1, 2: 4, 3: 6}  # each student layer -> the teacher layer it started from
    assert results["setup"]["num_train"] == 24
    assert "T=4, alpha=0.9, hidden-state loss (cosine) weight 1" in (workspace / "README.md").read_text()


def test_readme_without_markers_is_refused(workspace, compression_table):
    (workspace / "README.md").write_text("# No markers\n")
    with pytest.raises(ValueError, match="compression-table:begin"):
        compression_table.main(_argv(workspace, "--variants", "pruned-2x"))
