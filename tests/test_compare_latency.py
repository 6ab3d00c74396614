"""compare_latency on callables with known sleep times (tolerances sized for a loaded 2-core machine)."""

import itertools
import logging
import time

import pytest
import torch
from conftest import random_batch, tiny_model

from hf_compress.deploy.latency_compare import compare_latency


def sleeper(*seconds):
    """A callable that sleeps the given durations in turn (sleep never returns early, only late)."""
    durations = itertools.cycle(seconds)

    def call(**inputs):
        time.sleep(next(durations))

    return call


def test_known_sleep_times_give_their_ratio():
    result = compare_latency({"slow": sleeper(0.004), "fast": sleeper(0.002)}, {}, rounds=15, warmup=1)
    assert result.reference == "slow" and list(result.stats) == ["slow", "fast"]
    slow, fast = result.stats["slow"], result.stats["fast"]
    assert slow.median_ms >= 4.0 and fast.median_ms >= 2.0
    assert slow.q25_ms <= slow.median_ms <= slow.q75_ms and slow.iqr_ms == pytest.approx(slow.q75_ms - slow.q25_ms)
    assert len(slow.timings_ms) == 15
    speedup = result.speedups["fast"]
    # 4 ms / 2 ms = 2; wake-up delays add the same absolute time to both, pulling the ratio toward 1.
    assert 1.4 < speedup.median < 2.6 and 1.4 < speedup.ratio_of_medians < 2.6
    assert speedup.low <= speedup.median <= speedup.high
    assert result.speedups["slow"].median == 1.0
    assert "fast" in result.format() and "speed-up vs slow" in str(result)
    assert "timings_ms" not in result.to_dict()["stats"]["fast"]


def test_a_noisy_model_is_flagged_plainly(caplog):
    quiet, noisy = sleeper(0.002), sleeper(0.001, 0.008)  # half the calls 1 ms, half 8 ms: relative IQR ~1.5
    with caplog.at_level(logging.WARNING):
        result = compare_latency({"quiet": quiet, "noisy": noisy}, {}, rounds=12, warmup=0, max_relative_iqr=0.5)
    assert result.noisy
    assert result.stats["noisy"].relative_iqr > 0.5
    assert len(result.warnings) == 1 and "'noisy' is too noisy to trust" in result.warnings[0]
    assert "'noisy' is too noisy to trust" in caplog.text
    assert "WARNING: 'noisy'" in result.format()
    # The quiet sleeper alone is not flagged at a threshold that leaves room for a loaded machine.
    assert not compare_latency({"quiet": quiet}, {}, rounds=8, warmup=0, max_relative_iqr=1.0).noisy


def test_round_robin_order_rotates():
    calls = []
    models = {name: (lambda name=name, **inputs: calls.append(name)) for name in "abc"}
    compare_latency(models, {}, rounds=3, warmup=0)
    assert "".join(calls) == "abcbcacab"


def test_times_pytorch_modules_and_onnxruntime_sessions(tmp_path):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from hf_compress import OnnxModel

    # A tiny hand-made graph stands in for an export here (test_onnx_export covers real ones).
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input_ids"], ["logits"], keepdims=1)],
        "sum",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 1])],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model_proto.ir_version = 8
    onnx.save(model_proto, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])

    model = tiny_model("bert").train()
    batch = random_batch()  # holds labels too, which the sessions do not take
    threads = torch.get_num_threads()
    result = compare_latency(
        {"torch": model, "session": session, "onnx-model": OnnxModel(tmp_path, threads=1)},
        {k: v for k, v in batch.items() if k != "labels"},
        rounds=3,
        warmup=1,
        threads=1,
    )
    assert set(result.stats) == {"torch", "session", "onnx-model"}
    assert all(stats.median_ms > 0 for stats in result.stats.values())
    assert result.torch_threads == 1 and torch.get_num_threads() == threads
    assert model.training  # mode restored


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one model"):
        compare_latency({}, {})
    with pytest.raises(ValueError, match="reference='c'"):
        compare_latency({"a": sleeper(0)}, {}, reference="c")
    with pytest.raises(ValueError, match="rounds >= 2"):
        compare_latency({"a": sleeper(0)}, {}, rounds=1)
    with pytest.raises(ValueError, match="got a int"):
        compare_latency({"a": 3}, {})
