"""benchmarks/latency_target.py on a tiny teacher: retraining-free and while distilling, the budget is predicted met."""

import json
from pathlib import Path

import pytest
from conftest import teacher_and_data_folders

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def latency_target(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import latency_target

    return latency_target


@pytest.mark.parametrize("while_distilling", [0, 6])
def test_budget_is_met_by_prediction_and_timed(tmp_path, tiny_tokenizer, latency_target, while_distilling):
    # A wide FFN, so that the layers (not the embeddings and head) take most of the time: the budget is reachable
    # even with every layer kept, as the callback keeps them.
    teacher_and_data_folders(tmp_path, tiny_tokenizer, train_repeat=4, intermediate_size=512)
    argv = [
        "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data"), "--keeps", "0.7",
        "--num-calibration", "8", "--batch-size", "4", "--seq-len", "16", "--threads", "1", "--rounds", "2",
        "--warmup", "0", "--table-repeats", "1", "--latency-table", str(tmp_path / "latency_table.json"),
        "--output", str(tmp_path / "result.json"), "--work-dir", str(tmp_path / "work"),
        "--while-distilling", str(while_distilling), "--train-length", "16",
    ]  # fmt: skip
    result = latency_target.main(argv)

    assert json.loads((tmp_path / "result.json").read_text()) == json.loads(json.dumps(result))
    (variant,) = result["variants"].values()
    assert variant["target_speedup"] == pytest.approx(1 / 0.7)
    assert variant["predicted_ms"] <= variant["budget_ms"] * 1.0001
    assert variant["predicted_speedup"] >= variant["target_speedup"] * 0.9999
    assert variant["realised_speedup"]["median"] > 0
    assert variant["flops_ratio"] < 1


def test_negative_steps_are_refused(latency_target):
    with pytest.raises(ValueError, match="--while-distilling -1"):
        latency_target.parse_args(["--while-distilling", "-1"])
