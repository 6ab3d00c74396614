"""DistillationTrainer under DDP: 2 CPU processes (gloo) launched with torchrun equal one process with the same batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import distributed_distillation as script
import pytest
import torch
import torch.distributed

SCRIPT = Path(__file__).with_name("distributed_distillation.py")
NUM_PROCESSES = 2


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)
def test_two_process_ddp_matches_single_process(tmp_path):
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={NUM_PROCESSES}",
        str(SCRIPT),
        str(ddp_dir),
        str(script.GLOBAL_BATCH_SIZE // NUM_PROCESSES),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, f"torchrun failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"

    results = [torch.load(ddp_dir / f"rank{rank}.pt", weights_only=False) for rank in range(NUM_PROCESSES)]
    for task in script.TASKS:
        _check_task(task, [result[task] for result in results], single_dir / task)


def _check_task(task: str, ranks: list[dict], single_dir: Path) -> None:
    assert [result["world_size"] for result in ranks] == [NUM_PROCESSES] * NUM_PROCESSES
    reference = script.run(str(single_dir), script.GLOBAL_BATCH_SIZE, task)
    assert reference["world_size"] == 1
    if task == "token-classification":  # the ranks' shards hold different numbers of labelled tokens
        labels = torch.tensor(script.build_dataset(task)["labels"])  # (rows, SEQ_LEN)
        per_shard = labels.ne(-100).view(script.MAX_STEPS, NUM_PROCESSES, -1).sum(-1)  # (steps, ranks)
        assert (per_shard[:, 0] != per_shard[:, 1]).all()

    # Training finished on both ranks, and they hold the same student and the same (separately synced) projections.
    for result in ranks:
        steps = [entry["step"] for entry in result["log_history"] if "loss" in entry]
        assert steps == list(range(1, script.MAX_STEPS + 1))
    for name in ("student", "projections"):
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), f"{task}: {name}.{key} differs between the ranks"

    # Same global batch, same result as one process, and far from the initial weights (the comparison is not vacuous).
    initial = script.tiny_model("bert", task, seed=0, num_hidden_layers=2).state_dict()
    for name in ("student", "projections"):
        for key, value in reference[name].items():
            torch.testing.assert_close(ranks[0][name][key], value, rtol=1e-5, atol=1e-6, msg=f"{task}: {name}.{key}")
    assert max((initial[k] - reference["student"][k]).abs().max().item() for k in initial) > 1e-2

    # The logged loss and its parts are averaged over processes like the single-process logs.
    ddp_logs = [entry for entry in ranks[0]["log_history"] if "loss" in entry]
    single_logs = [entry for entry in reference["log_history"] if "loss" in entry]
    for ddp_entry, single_entry in zip(ddp_logs, single_logs, strict=True):
        for key in ("loss", "soft_loss", "hard_loss", "hidden_loss"):
            assert ddp_entry[key] == pytest.approx(single_entry[key], rel=1e-5, abs=1e-8), f"{task}: {key}"
