"""benchmarks/gpu_check.py: runs on a CPU with --quick, marking the GPU-only parts skipped; its latency code runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_check.py"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    return gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU writes")
def test_quick_run_on_cpu_writes_every_part_and_marks_gpu_parts_skipped(tmp_path):
    output = tmp_path / "results" / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(output)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(output.read_text())
    assert set(result) == {"settings", "environment", "skipped", "throughput", "exactness", "latency", "fsdp2"}
    assert result["settings"]["quick"] and result["environment"]["cuda"] is None

    # GPU-only parts: skipped, saying why, in the JSON and on stdout.
    skipped = [("throughput", "bf16"), ("throughput", "fp16"), ("exactness", "bf16"), ("exactness", "fp16")]
    parts = [result[part][precision] for part, precision in skipped] + [result["latency"], result["fsdp2"]]
    for part in parts:
        assert part["status"] == "skipped" and "CUDA" in part["reason"]
    assert len(result["skipped"]) == len(parts)
    assert completed.stdout.count("SKIPPED") == len(parts)

    # What runs on a CPU: fp32 throughput of the three modes with the cache build, and cached == live exactly.
    throughput = result["throughput"]["fp32"]
    assert throughput["status"] == "ok" and set(throughput["steps_per_second"]) == {"stock", "live", "cached"}
    assert all(value > 0 for value in throughput["steps_per_second"].values())
    assert throughput["cache_build_s"] > 0 and throughput["cache_mb"] > 0
    exactness = result["exactness"]["fp32"]
    assert exactness["status"] == "ok"
    for batches in ("same_batches", "reshuffled_batches"):
        assert exactness[batches]["batches"] == result["settings"]["steps"]
        assert exactness[batches]["equal"], exactness[batches]
        assert all(loss > 0.1 for pair in exactness[batches]["losses"] for loss in pair)  # not a vacuous comparison


def test_latency_part_on_cpu(gpu_check):
    # The GPU-only latency code, run on the CPU with a tiny teacher: variants, FLOPs ratios and the table's keys.
    teacher = tiny_model("bert", seed=0)
    result = gpu_check.latency_part(
        teacher, "cpu", batch_sizes=(1, 2), seq_len=8, rounds=2, iterations=2, dtypes=("float32",)
    )
    names = {"teacher", "student_2_layers", "pruned_flops_1/2", "pruned_flops_1/4"}
    assert result["status"] == "ok" and set(result["flops_per_token"]) == names
    assert result["flops_ratio_vs_teacher"]["teacher"] == 1
    assert result["flops_ratio_vs_teacher"]["student_2_layers"] == pytest.approx(2)
    assert result["flops_ratio_vs_teacher"]["pruned_flops_1/2"] >= 2
    assert result["flops_ratio_vs_teacher"]["pruned_flops_1/4"] >= 4
    assert set(result["float32"]) == {"1", "2"}
    for row in result["float32"].values():
        assert set(row) == names
        assert row["teacher"]["speedup_vs_teacher"] == 1
        assert all(len(entry["ms_per_round"]) == 2 and entry["median_ms"] > 0 for entry in row.values())


def test_a_failing_part_is_recorded_and_the_others_run(gpu_check):
    results = {"skipped": []}

    def fail():
        raise RuntimeError("CUDA out of memory")

    value = gpu_check._run_part(results, ("latency",), fail)
    assert value["status"] == "failed" and "CUDA out of memory" in value["error"]
    gpu_check._skip(results, ("throughput", "bf16"), "needs a CUDA device")
    assert results["throughput"]["bf16"] == {"status": "skipped", "reason": "needs a CUDA device"}
    assert results["skipped"] == ["throughput.bf16: needs a CUDA device"]
