"""benchmarks/example_defaults.py: the example's recipes over seeds, on a tiny teacher and a few TSV rows."""

import json
import statistics
from pathlib import Path

import pytest
from conftest import teacher_and_data_folders

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def example_defaults(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import example_defaults

    return example_defaults


@pytest.fixture
def workspace(tmp_path, tiny_tokenizer):
    return teacher_and_data_folders(tmp_path, tiny_tokenizer, num_hidden_layers=6)


def _argv(workspace, *extra):
    return [
        "--teacher", str(workspace / "teacher"), "--data", str(workspace / "data"), "--max-train-samples", "12",
        "--extra", "--max_steps 2 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --use_cpu true",
        "--work-dir", str(workspace / "work"), "--output", str(workspace / "defaults.json"), *extra,
    ]  # fmt: skip


def test_every_recipe_runs_once_per_seed_and_is_summarised(workspace, example_defaults):
    result = example_defaults.main(_argv(workspace, "--seeds", "0", "1"))

    assert json.loads((workspace / "defaults.json").read_text()) == json.loads(json.dumps(result))
    recipes = list(example_defaults.RECIPES)
    assert [(run["recipe"], run["seed"]) for run in result["runs"]] == [(r, s) for r in recipes for s in (0, 1)]
    for recipe in recipes:
        accuracies = [run["accuracy"] for run in result["runs"] if run["recipe"] == recipe]
        assert result["summary"][recipe]["mean"] == pytest.approx(statistics.fmean(accuracies))
        assert result["summary"][recipe]["std"] == pytest.approx(statistics.stdev(accuracies))
    # One teacher-output cache serves every run (same training sentences).
    assert len(list((workspace / "work" / "teacher-cache").glob("*.safetensors"))) == 1


def test_runs_already_measured_are_kept_and_only_new_ones_run(workspace, example_defaults):
    first = example_defaults.main(_argv(workspace, "--seeds", "0", "--recipes", "uniform-T2-3ep"))
    second = example_defaults.main(
        _argv(workspace, "--seeds", "0", "1", "--recipes", "uniform-T2-3ep", "uniform-T4-2ep")
    )

    assert second["runs"][0] == first["runs"][0]
    assert [(run["recipe"], run["seed"]) for run in second["runs"]] == [
        ("uniform-T2-3ep", 0), ("uniform-T2-3ep", 1), ("uniform-T4-2ep", 0), ("uniform-T4-2ep", 1)
    ]  # fmt: skip
    assert len(list((workspace / "work").glob("uniform-T2-3ep-*"))) == 2  # seed 0 ran once
    assert list(second["summary"]) == ["uniform-T2-3ep", "uniform-T4-2ep"]

    # Other settings: nothing is reused.
    third = example_defaults.main(
        _argv(workspace, "--seeds", "0", "--recipes", "uniform-T2-3ep", "--max-eval-samples", "3")
    )
    assert [(run["recipe"], run["seed"]) for run in third["runs"]] == [("uniform-T2-3ep", 0)]
    assert len(list((workspace / "work").glob("uniform-T2-3ep-*"))) == 3


def test_unknown_recipe_is_refused_before_work(workspace, example_defaults):
    with pytest.raises(ValueError, match="Unknown recipes"):
        example_defaults.main(["--recipes", "nope", "--work-dir", str(workspace / "work")])
    assert not (workspace / "work").exists()
