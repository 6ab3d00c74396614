"""DistillationTrainer under FSDP2: 2 CPU processes (gloo) equal one process with the same global batch.

accelerate enables FSDP only on accelerator devices, so `tests/fsdp_distillation.py` installs a test-only shim that
turns its CPU processes into an FSDP run (see `enable_fsdp_on_cpu`); everything else is the real FSDP2 path of
accelerate, transformers and torch. Also: what is refused (DeepSpeed, FSDP1, L1 under FSDP), the warning when FSDP
is asked for but not enabled, and the lockstep teacher-cache build in one process with a scripted agreement.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import fsdp_distillation as script
import pytest
import torch
import torch.distributed
from conftest import random_batch, tiny_model
from safetensors import safe_open

from hf_compress import DistillationTrainer, DistillationTrainingArguments, TeacherCache
from hf_compress.distillation import distributed
from hf_compress.distillation.cache_builder import CacheBuilder
from hf_compress.distillation.cache_format import CacheLayout
from hf_compress.distillation.projections import PROJECTIONS_NAME, PROJECTIONS_OPTIMIZER_NAME

SCRIPT = Path(__file__).with_name("fsdp_distillation.py")
NUM_PROCESSES = 2
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _launch(mode: str, output_dir: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={NUM_PROCESSES}",
        str(SCRIPT),
        mode,
        str(output_dir),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, f"torchrun failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}"
    return [torch.load(output_dir / f"{mode}-rank{rank}.pt", weights_only=False) for rank in range(NUM_PROCESSES)]


def _max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[key] - second[key]).abs().max().item() for key in first)


@needs_gloo
def test_fsdp2_matches_single_process_and_resumes_exactly(tmp_path):
    trained = _launch("train", tmp_path)
    references = {  # evaluated after training like the "shard" scenario (which leaves the weights as they are)
        task: script.run(str(tmp_path / "single" / task), script.GLOBAL_BATCH_SIZE, task, fsdp=False, evaluate=True)
        for task in {scenario["task"] for scenario in script.SCENARIOS.values()}
    }
    for name, scenario in script.SCENARIOS.items():
        ranks = [result[name] for result in trained]
        reference = references[scenario["task"]]
        sharded_teacher = scenario["teacher_sharding"] == "shard"
        for result in ranks:
            # Real FSDP2: the student's parameters are DTensor shards; the teacher's too unless replicated.
            assert result["world_size"] == NUM_PROCESSES and result["is_fsdp_enabled"], name
            assert result["student_param_types"] == {"DTensor"}, name
            assert result["teacher_param_types"] == ({"DTensor"} if sharded_teacher else {"Parameter"}), name
            expected_local = result["teacher_numel"] // NUM_PROCESSES if sharded_teacher else result["teacher_numel"]
            assert abs(result["teacher_local_numel"] - expected_local) < 100, name
            assert result["teacher_frozen"] and not result["teacher_in_optimizer"], name
            assert result["projections_in_optimizer"], name
            steps = [entry["step"] for entry in result["log_history"] if "loss" in entry]
            assert steps == list(range(1, script.NUM_STEPS + 1)), name
        assert _max_difference(ranks[0]["projections"], ranks[1]["projections"]) == 0, name
        # Same global batch, same training as one process: weights and every logged loss part.
        for part in ("student", "projections"):
            torch.testing.assert_close(ranks[0][part], reference[part], rtol=1e-5, atol=1e-6, msg=f"{name}: {part}")
        fsdp_logs = [entry for entry in ranks[0]["log_history"] if "loss" in entry]
        single_logs = [entry for entry in reference["log_history"] if "loss" in entry]
        for fsdp_entry, single_entry in zip(fsdp_logs, single_logs, strict=True):
            for key in ("loss", "soft_loss", "hard_loss", "hidden_loss", "grad_norm"):
                assert fsdp_entry[key] == pytest.approx(single_entry[key], rel=1e-5, abs=1e-8), f"{name}: {key}"
    # Evaluation with the sharded teacher (after the cache build ran it in inference mode, for "cache-build"): the
    # distillation loss and each part, as one process computes them.
    single_metrics = references["sequence-classification"]["eval_metrics"]
    for name in ("shard", "cache-build"):
        for key in ("eval_loss", "eval_soft_loss", "eval_hard_loss", "eval_hidden_loss"):
            fsdp_value = trained[0][name]["eval_metrics"][key]
            assert fsdp_value == pytest.approx(single_metrics[key], rel=1e-5), f"{name}: {key}"
    initial = tiny_model("bert", "sequence-classification", seed=0, num_hidden_layers=2).state_dict()
    moved = _max_difference(initial, references["sequence-classification"]["student"])
    assert moved > 1e-2  # the comparison is not vacuous

    # The cache was built by both processes running the sharded teacher together, then reused by a new trainer.
    assert [result["cache-build"]["cache_built"] for result in trained] == [True, True]
    assert [result["cache-reuse"]["cache_built"] for result in trained] == [False, False]
    assert len(list((tmp_path / "teacher_cache").glob("*.safetensors"))) == 1
    assert not list((tmp_path / "teacher_cache").glob("*.tmp"))

    # The halfway checkpoint holds the whole student only; the projections and their optimizer state lie beside it.
    checkpoint = tmp_path / "shard" / f"checkpoint-{script.NUM_STEPS // 2}"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as file:
        assert set(file.keys()) == set(initial)
    assert (checkpoint / PROJECTIONS_NAME).is_file() and (checkpoint / PROJECTIONS_OPTIMIZER_NAME).is_file()

    # Resumed from it in a new launch: the weights of the uninterrupted run (the optimizer's momentum included).
    resumed = _launch("resume", tmp_path)
    for result in resumed:
        for part in ("student", "projections"):
            difference = _max_difference(result["shard"][part], trained[0]["shard"][part])
            assert difference <= 1e-6, f"resumed {part} differs by {difference}"


# ---- What is refused, and when FSDP is asked for but not enabled ----


def _args(tmp_path, **overrides) -> DistillationTrainingArguments:
    return DistillationTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", disable_tqdm=True, **overrides
    )


def test_deepspeed_is_refused_naming_fsdp2(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"deepspeed='ds_config.json'.*FSDP2"):
        distributed.check_distributed_setup(SimpleNamespace(deepspeed="ds_config.json", fsdp=None))
    # `accelerate launch` with a DeepSpeed config: refused before the Trainer creates its accelerator.
    args = _args(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    student, teacher = tiny_model(seed=0, num_hidden_layers=2), tiny_model(seed=1)
    with pytest.raises(ValueError, match="ACCELERATE_USE_DEEPSPEED.*FSDP2"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args)
    # A DeepSpeed plugin the accelerator found by itself is refused too.
    state = SimpleNamespace(deepspeed_plugin=object(), fsdp_plugin=None)
    with pytest.raises(ValueError, match="does not support DeepSpeed"):
        distributed.check_enabled_setup(args, state, teacher)


def test_fsdp1_and_l1_under_fsdp_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")  # the Accelerator sets it: restore it after the test
    args = _args(tmp_path, fsdp=True, fsdp_config={"version": 1})
    student, teacher = tiny_model(seed=0, num_hidden_layers=2), tiny_model(seed=1)
    with pytest.raises(ValueError, match=r"FSDP2 only.*version 1"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args)
    # `accelerate launch` with an FSDP1 config sets both variables.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match=r"FSDP2 only.*version 1"):
        distributed.check_distributed_setup(SimpleNamespace(deepspeed=None, fsdp=None))
    monkeypatch.setenv("FSDP_VERSION", "2")
    distributed.check_distributed_setup(SimpleNamespace(deepspeed=None, fsdp=None))
    # Once accelerate has enabled FSDP2: L1 (whole weights) and a device_map teacher to shard are refused.
    state = SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(fsdp_version=2))
    with pytest.raises(ValueError, match="l1_weight=1e-05 is not supported under FSDP"):
        distributed.check_enabled_setup(_args(tmp_path, l1_weight=1e-5), state, teacher)
    teacher.hf_device_map = {"": "cpu"}
    with pytest.raises(ValueError, match="teacher_sharding='replicate'"):
        distributed.check_enabled_setup(_args(tmp_path), state, teacher)
    distributed.check_enabled_setup(_args(tmp_path, teacher_sharding="replicate"), state, teacher)
    with pytest.raises(ValueError, match="teacher_sharding='whole'"):
        _args(tmp_path, teacher_sharding="whole")


def test_gradual_pruning_callbacks_are_refused_under_fsdp():
    from hf_compress import GradualMagnitudePruningCallback, GradualStructuredPruningCallback

    for callback in (GradualMagnitudePruningCallback, GradualStructuredPruningCallback):
        with pytest.raises(ValueError, match=f"{callback.__name__} cannot prune a student sharded by FSDP"):
            distributed.check_pruning_callbacks([callback], is_fsdp_enabled=True)
        distributed.check_pruning_callbacks([callback], is_fsdp_enabled=False)


def test_fsdp_requested_but_not_enabled_warns(caplog):
    # What a CPU run under torchrun gets: accelerate keeps MULTI_CPU (DDP) although `fsdp` is set.
    args = SimpleNamespace(fsdp=["full_shard"])
    with caplog.at_level("WARNING", logger="hf_compress"):
        distributed.warn_if_fsdp_ignored(args, SimpleNamespace(distributed_type="MULTI_CPU"), is_fsdp_enabled=False)
    assert "FSDP was requested" in caplog.text and "replicated on every process" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_compress"):
        distributed.warn_if_fsdp_ignored(args, SimpleNamespace(distributed_type="FSDP"), is_fsdp_enabled=True)
        distributed.warn_if_fsdp_ignored(SimpleNamespace(fsdp=[]), SimpleNamespace(), is_fsdp_enabled=False)
    assert not caplog.text


# ---- The lockstep cache build, with a scripted agreement in one process ----


class _ScriptedLockstep:
    """Stands for the other processes: `any` returns this process's flag or'ed with the scripted answers."""

    def __init__(self, writes: bool, others: list[bool]):
        self.writes, self.others, self.flags = writes, list(others), []

    def any(self, flag: bool) -> bool:
        self.flags.append(flag)
        return flag or self.others.pop(0)


def _cache_inputs():
    teacher = tiny_model(seed=1).eval()
    batches = [random_batch(batch_size=4, seed=seed) for seed in range(3)]
    calls = []

    def forward(batch):
        calls.append(batch)
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    layout = CacheLayout(token_level=False, hidden_states=(), attentions=(), intermediate_dtype=None)
    return teacher, batches, forward, calls, layout


def _load_or_build(cache_dir, teacher, batches, forward, layout, lockstep):
    return TeacherCache.load_or_build(
        str(cache_dir), batches, teacher, forward, ("attention_mask", "input_ids"), layout, False, lockstep
    )


def test_lockstep_write_failure_runs_the_teacher_to_the_end_then_raises(tmp_path, monkeypatch):
    teacher, batches, forward, calls, layout = _cache_inputs()

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(CacheBuilder, "_write_batch", fail)
    lockstep = _ScriptedLockstep(writes=True, others=[False, False])
    with pytest.raises(OSError, match="No space left"):
        _load_or_build(tmp_path, teacher, batches, forward, layout, lockstep)
    # The other processes' all-gathers were all matched: the teacher ran on every batch, then all agreed it failed.
    assert len(calls) == len(batches)
    assert lockstep.flags == [True, True]
    assert not list(tmp_path.iterdir())  # no partial file


def test_lockstep_non_writer_runs_the_teacher_without_writing(tmp_path):
    teacher, batches, forward, calls, layout = _cache_inputs()
    # Another process's writer needs a build: this one, which does not write, runs the teacher in step and opens
    # the file once all agree the writing succeeded (here an earlier single-process build wrote it).
    written = _load_or_build(tmp_path, teacher, batches, forward, layout, None)
    calls.clear()
    cache = _load_or_build(tmp_path, teacher, batches, forward, layout, _ScriptedLockstep(False, [True, False]))
    assert len(calls) == len(batches) and cache.built and cache.path == written.path
    assert len(list(tmp_path.iterdir())) == 1
    # Nobody needs a build: the teacher does not run, the file is opened.
    calls.clear()
    cache = _load_or_build(tmp_path, teacher, batches, forward, layout, _ScriptedLockstep(False, [False]))
    assert not calls and not cache.built
    # The writing failed on another process: this one raises too instead of waiting for it.
    with pytest.raises(RuntimeError, match="failed on another process"):
        _load_or_build(tmp_path, teacher, batches, forward, layout, _ScriptedLockstep(False, [True, True]))
