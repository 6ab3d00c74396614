"""Teacher-cache failure modes: damaged, truncated and stale files are detected instead of trusted, and builds that are
interrupted (Ctrl-C, SIGKILL) leave nothing that lingers or that a concurrent build of another process loses.

Builds that get killed run in a forked child (the modules are already imported, so it starts in milliseconds rather
than the seconds a fresh interpreter takes to import transformers) over a teacher slowed down by a sleep per batch.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_batch, tiny_model
from test_distillation_trainer import make_batch, to_dataset
from test_teacher_cache import cached_trainer, count_forwards

from hf_compress.distillation.cache_format import CacheLayout
from hf_compress.distillation.teacher_cache import TeacherCache

NAMES = ("attention_mask", "input_ids")
LAYOUT = CacheLayout(token_level=False, hidden_states=(2,), attentions=(1,))
LOGGER = "hf_compress.distillation.teacher_cache"


@pytest.fixture(scope="module")
def teacher():
    model = tiny_model("bert")
    model.set_attn_implementation("eager")  # sdpa returns no attention maps
    return model


def make_batches(seed: int, num_batches: int = 3) -> list[dict[str, torch.Tensor]]:
    return [random_batch(batch_size=4, seq_len=10, seed=1000 * seed + i) for i in range(num_batches)]


def run_teacher(teacher, batch):
    return teacher(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        output_attentions=True,
    )


def build(cache_dir: Path, teacher, batches, delay: float = 0.0) -> TeacherCache:
    def forward(batch):
        time.sleep(delay)  # a slow teacher, so that a test can interrupt the build midway
        return run_teacher(teacher, batch)

    return TeacherCache.load_or_build(str(cache_dir), batches, teacher, forward, NAMES, LAYOUT, show_progress=False)


def assert_matches_the_teacher(cache: TeacherCache, teacher, batches) -> None:
    for batch in batches:
        cached = cache.lookup(batch)
        with torch.no_grad():
            live = run_teacher(teacher, batch)
        valid = batch["attention_mask"].bool()
        torch.testing.assert_close(cached.logits, live.logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(cached.hidden_states[2][valid], live.hidden_states[2][valid], rtol=0, atol=1e-6)
        pairs = (valid[:, None, :, None] & valid[:, None, None, :]).to(live.attentions[1].dtype)
        torch.testing.assert_close(cached.attentions[1], live.attentions[1] * pairs, rtol=0, atol=1e-6)


def tensor_region(path: str, name: str) -> tuple[int, dict]:
    """The file offset where tensor `name` starts, and its header entry."""
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
    return 8 + header_size + header[name]["data_offsets"][0], header[name]


def overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "rb") as file:
        file.seek(offset)
        value = file.read(1)[0]
    overwrite(path, offset, bytes([value ^ 0xFF]))


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def temp_files(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if name.endswith(".tmp")} if folder.exists() else set()


# ---- Damaged contents ----


@pytest.mark.parametrize(("name", "value"), [("logits", float("nan")), ("hidden_states.2", 1e30)])
def test_nan_or_huge_values_written_into_the_data_are_detected_not_used(tmp_path, teacher, name, value):
    batches = make_batches(0)
    path = build(tmp_path, teacher, batches).path
    offset, entry = tensor_region(path, name)
    overwrite(path, offset, np.full(4, value, dtype=np.float32).tobytes())  # the first values of example 0

    cache = build(tmp_path, teacher, batches)  # the header and index are intact: reused, data checked when read
    assert not cache.built
    with pytest.raises(ValueError, match=r"teacher cache is damaged") as caught:
        cache.lookup(batches[0])
    message = str(caught.value)
    assert type(caught.value).__name__ == "TeacherCacheCorruptedError"
    assert path in message and f"tensor '{name}'" in message and "Block 0" in message
    assert "was deleted: the next run" in message and not os.path.exists(path)

    rebuilt = build(tmp_path, teacher, batches)
    assert rebuilt.built and rebuilt.path == path
    assert_matches_the_teacher(rebuilt, teacher, batches)


def test_damaged_hidden_states_stop_training_instead_of_a_nan_loss(tmp_path):
    data = to_dataset(make_batch(num_rows=8))
    first = cached_trainer(tmp_path, data=data, max_steps=1, hidden_loss_weight=0.5)
    first.train()
    path = first.teacher_cache.path
    offset, entry = tensor_region(path, "hidden_states.4")
    count = (entry["data_offsets"][1] - entry["data_offsets"][0]) // 4
    overwrite(path, offset, np.full(count, np.nan, dtype=np.float32).tobytes())

    second = cached_trainer(tmp_path, data=data, teacher=first.teacher_model, max_steps=1, hidden_loss_weight=0.5)
    with pytest.raises(ValueError, match=r"teacher cache is damaged: .*'hidden_states.4'.*next run.*rebuilds it"):
        second.train()
    assert not os.path.exists(path)


def test_a_damaged_key_is_reported_as_damage_not_as_a_changed_collator(tmp_path, teacher):
    batches = make_batches(0)
    path = build(tmp_path, teacher, batches).path
    keys_offset, _ = tensor_region(path, "keys")
    flip_byte(path, keys_offset)  # the first byte of example 0's key
    with pytest.raises(ValueError, match=r"teacher cache is damaged: .*tensor 'keys'.*Delete") as caught:
        TeacherCache(path, NAMES)
    assert "collator" not in str(caught.value)

    # Damaged under a job that already opened it: a batch it does not hold is blamed on the file, not the inputs.
    flip_byte(path, keys_offset)  # intact again
    cache = TeacherCache(path, NAMES)
    flip_byte(path, keys_offset)
    with pytest.raises(ValueError, match=r"teacher cache is damaged: .*tensor 'keys'") as caught:
        cache.lookup(make_batches(seed=5, num_batches=1)[0])
    assert "collator" not in str(caught.value)


def test_a_damaged_key_found_when_training_starts_rebuilds_the_cache(tmp_path, caplog):
    data = to_dataset(make_batch(num_rows=8))
    first = cached_trainer(tmp_path, data=data, max_steps=1)
    first.train()
    path = first.teacher_cache.path
    flip_byte(path, tensor_region(path, "keys")[0] + 3)

    second = cached_trainer(tmp_path, data=data, teacher=first.teacher_model, max_steps=2)
    calls = count_forwards(first.teacher_model)
    with caplog.at_level("WARNING", logger=LOGGER):
        second.train()  # before: "the data collator ... changes the inputs between passes"
    assert second.teacher_cache.built and calls[0] == 2 and second.state.global_step == 2
    assert "Deleting and rebuilding the teacher cache" in caplog.text and "tensor 'keys'" in caplog.text


def test_a_damaged_header_rebuilds_the_cache(tmp_path, teacher, caplog):
    batches = make_batches(0)
    path = build(tmp_path, teacher, batches).path
    with open(path, "rb") as file:
        head = file.read(4096)
    at = head.index(b'num_heads\\": 4')  # the layout, a JSON string inside the header's JSON
    overwrite(path, at, b'num_heads\\": 2')  # still valid JSON, and a wrong attention layout
    with caplog.at_level("WARNING", logger=LOGGER):
        cache = build(tmp_path, teacher, batches)
    assert cache.built and "fails its checksum" in caplog.text
    assert_matches_the_teacher(cache, teacher, batches)


def test_a_truncated_file_is_refused_and_rebuilt(tmp_path, teacher, caplog):
    batches = make_batches(0)
    path = build(tmp_path, teacher, batches).path
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=r"teacher cache is damaged: .* truncated"):
        TeacherCache(path, NAMES)
    with caplog.at_level("WARNING", logger=LOGGER):
        cache = build(tmp_path, teacher, batches)
    assert cache.built and "truncated" in caplog.text
    assert_matches_the_teacher(cache, teacher, batches)


def test_blocks_are_checked_lazily_each_once(tmp_path):
    from hf_compress.distillation.mmap_safetensors import (
        MappedSafetensors,
        SafetensorsCorruptedError,
        SafetensorsWriter,
    )

    path = str(tmp_path / "blocks.safetensors")
    writer = SafetensorsWriter(path, {"x": (torch.float32, (100, 4))}, {}, block_bytes=160)  # 10 rows per block
    writer.arrays["x"][:] = np.arange(400, dtype=np.float32).reshape(100, 4)
    writer.finish()
    overwrite(path, tensor_region(path, "x")[0] + 16 * 35, np.float32(np.inf).tobytes())  # row 35, block 3

    file = MappedSafetensors(path)
    file.verify_rows("x", np.array([0, 48]), np.array([25, 52]))  # blocks 0-2 and 4-5: intact
    assert file._verified["x"].tolist() == [True] * 3 + [False] + [True] * 2 + [False] * 4
    with pytest.raises(SafetensorsCorruptedError, match=r"Block 3 of tensor 'x' .* \(rows 30:40, file bytes 7"):
        file.verify_rows("x", np.array([39]), np.array([40]))


# ---- Interrupted builds ----


def fork_build(cache_dir: Path, teacher, batches, delay: float) -> int:
    """Build a cache in a forked child over a teacher that sleeps `delay` s per batch; returns the child's PID.

    The child exits with 0 when the build succeeded, 130 on KeyboardInterrupt, 1 on any other exception.
    """
    pid = os.fork()
    if pid == 0:  # never return into pytest from the child
        code = 1
        try:
            build(cache_dir, teacher, batches, delay)
            code = 0
        except KeyboardInterrupt:
            code = 130
        finally:
            os._exit(code)
    return pid


def wait_for_new_temp_file(cache_dir: Path, before: set[str], timeout: float = 30.0) -> str:
    """The name of a temporary file not in `before` once it holds data (the teacher ran on the first batch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in temp_files(cache_dir) - before:
            try:
                if os.path.getsize(cache_dir / name) > 0:
                    return name
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    raise TimeoutError(f"No temporary file appeared in {cache_dir} within {timeout} s.")


def kill(pid: int, sig: int) -> int:
    """Send `sig` to `pid` and reap it (a zombie still counts as a live process); returns its wait status."""
    os.kill(pid, sig)
    _, status = os.waitpid(pid, 0)
    return status


def test_ctrl_c_during_a_build_leaves_nothing_and_the_next_build_succeeds(tmp_path, teacher):
    batches = make_batches(0, num_batches=6)
    pid = fork_build(tmp_path, teacher, batches, delay=0.3)
    wait_for_new_temp_file(tmp_path, set())
    status = kill(pid, signal.SIGINT)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130  # KeyboardInterrupt reached the build
    assert listing(tmp_path) == []

    cache = build(tmp_path, teacher, batches)
    assert cache.built and listing(tmp_path) == [os.path.basename(cache.path)]
    assert_matches_the_teacher(cache, teacher, batches)


def test_a_build_killed_with_sigkill_leaves_a_temp_file_that_the_next_build_removes(tmp_path, teacher, caplog):
    batches = make_batches(0, num_batches=6)
    pid = fork_build(tmp_path, teacher, batches, delay=0.3)
    temp = wait_for_new_temp_file(tmp_path, set())
    status = kill(pid, signal.SIGKILL)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert listing(tmp_path) == [temp]  # nothing can clean up after SIGKILL: a partial file, but no valid-looking one

    with caplog.at_level("WARNING", logger=LOGGER):
        cache = build(tmp_path, teacher, batches)
    assert cache.built and listing(tmp_path) == [os.path.basename(cache.path)]
    assert f"Removed {tmp_path / temp}" in caplog.text and f"by process {pid} of this host" in caplog.text
    assert_matches_the_teacher(cache, teacher, batches)


def test_a_killed_builds_temp_file_is_removed_while_a_concurrent_build_keeps_its_own(tmp_path, teacher):
    killed = fork_build(tmp_path, teacher, make_batches(1), delay=0.3)
    stale = wait_for_new_temp_file(tmp_path, set())
    kill(killed, signal.SIGKILL)

    live_batches = make_batches(2, num_batches=8)
    live = fork_build(tmp_path, teacher, live_batches, delay=0.4)  # another cache, in the same folder
    live_temp = wait_for_new_temp_file(tmp_path, {stale})
    mine = build(tmp_path, teacher, make_batches(3))  # a third cache, built meanwhile
    assert os.waitpid(live, os.WNOHANG) == (0, 0), "the concurrent build finished too early to test anything"
    assert stale not in temp_files(tmp_path) and live_temp in temp_files(tmp_path)

    _, status = os.waitpid(live, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0  # its file was not pulled from under it
    assert temp_files(tmp_path) == set() and len(listing(tmp_path)) == 2
    live_cache = build(tmp_path, teacher, live_batches)
    assert not live_cache.built and live_cache.path != mine.path
    assert_matches_the_teacher(live_cache, teacher, live_batches)


def test_a_temp_file_is_kept_while_its_lock_is_held_even_if_its_pid_looks_dead(tmp_path, teacher):
    # A build in another PID namespace (a container sharing the folder) has a PID this process cannot see.
    import fcntl

    from hf_compress.distillation import cache_temp_files

    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    name = f"{'0' * 16}-{'0' * 16}.safetensors.{cache_temp_files.host_tag()}-{dead}.abcdefgh.tmp"
    (tmp_path / name).write_bytes(b"partial")
    handle = os.open(tmp_path / name, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        build(tmp_path, teacher, make_batches(0))
        assert name in temp_files(tmp_path)
    finally:
        os.close(handle)
    build(tmp_path, teacher, make_batches(0))
    assert name not in temp_files(tmp_path)
