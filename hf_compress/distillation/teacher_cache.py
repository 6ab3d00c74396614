"""Teacher-output caching: run the teacher once over the training set and reuse its outputs every epoch and run.

`DistillationTrainingArguments(teacher_cache_dir=...)` turns it on; `DistillationTrainer.train()` calls
`TeacherCache.load_or_build` before training and serves every training batch from the cache.

**Content keys.** Each example is keyed by a 128-bit BLAKE2b hash of the collated inputs the teacher takes, restricted
to its non-padding positions (`attention_mask != 0`) plus where those positions sit. The key is the teacher's input
itself, so a cached output cannot be stale: an example collated into another batch, padded to another length, gets the
same key, and an example whose inputs changed (random masking, augmentation, random truncation) gets a key the cache
does not hold, which raises a `ValueError` instead of training on stale targets.

**File.** One safetensors file per (teacher, training set), `<cache_dir>/<teacher>-<data>.safetensors`, named after
two fingerprints: the teacher's (config, every weight's bytes and dtype, attention implementation, and which outputs
are stored) and the training set's (its ordered example keys). Any change to either gives another file, so an
existing file is always valid for the run that finds it. Per unique example it holds the logits, and when the
intermediate losses are on the mapped teacher layers' hidden states and attention maps, at non-padding positions only,
as flat arrays with offsets (`tokens` rows for example `i` are `token_offsets[i]:token_offsets[i + 1]`). It is read
through memory maps, so gigabytes of hidden states are paged in on demand rather than loaded.

**Integrity.** The file carries a header checksum and a CRC-32 per block of about 256 KiB of every tensor
(`hf_compress.distillation.mmap_safetensors`). Opening it checks the header and the whole key index (keys and offsets); every data
block is checked the first time a lookup reads it. Damage found when `load_or_build` opens the file (header, index,
truncation) makes it rebuild the file, with a warning; damage found in a data block during training raises
`TeacherCacheCorruptedError` naming the file, tensor and block, and deletes the file so the next run rebuilds it.
Files of an earlier format version (without checksums) are never opened: the version is part of the file name.

**Interrupted builds.** The file is written under a temporary name, `<file>.<host>-<pid>.<random>.tmp`, and renamed
when complete, so an interrupted build never leaves a file that looks valid. An exception or Ctrl-C removes the
temporary file at once; a killed process (SIGKILL, out of memory, power loss) cannot, so every `load_or_build` removes
the temporary files in its folder left by processes of this host that no longer run and hold no lock on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import IterableDataset as TorchIterableDataset
from tqdm.auto import tqdm
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForPermutationLanguageModeling,
    DataCollatorWithFlattening,
    PreTrainedModel,
)
from transformers.utils import ModelOutput, logging

from .mmap_safetensors import MappedSafetensors, SafetensorsCorruptedError, SafetensorsWriter

try:  # POSIX only; elsewhere stale temporary files are never removed (see `_remove_stale_temp_files`)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

logger = logging.get_logger(__name__)

CACHE_FORMAT = "hf_compress.teacher_cache"  # stored in every cache file: a format id, not a module path
# Bump when the key function or the file layout changes: it enters the teacher fingerprint, so old files are unused.
# 2: block and header checksums (files of version 1 have none, so they are not trusted).
CACHE_VERSION = 2
KEY_BYTES = 16
CACHE_DTYPES = ("float32", "float16", "bfloat16")
_NO_CACHE_FIX = "set teacher_cache_dir=None to run the teacher live on every batch"
_INDEX_TENSORS = ("keys", "token_offsets", "attention_offsets")
# `<file>.<host tag>-<pid>.<mkstemp's random part>.tmp`; the random part is letters, digits and underscores.
_TEMP_NAME = re.compile(r"^(?P<final>.+\.safetensors)\.(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[A-Za-z0-9_]+\.tmp$")
# What version 1 wrote (`<file>.<random>.tmp`, no owner in the name): reported, never removed.
_LEGACY_TEMP_NAME = re.compile(r"^.+\.safetensors\.[a-z0-9_]{8}\.tmp$")


class TeacherCacheCorruptedError(SafetensorsCorruptedError):
    """A teacher cache file's bytes are not the ones written (damaged on disk, truncated or modified); a `ValueError`.

    Attributes:
        reason: What failed its check (file, tensor, block), without the advice on how to recover.
    """

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class CachedTeacherOutput(ModelOutput):
    """Teacher outputs served from a `TeacherCache`, shaped like the live teacher's for the batch they serve.

    Args:
        logits: `(B, C)`, or `(B, L, C)` for token-level tasks (zeros at padding positions).
        hidden_states: A tuple indexed like the live `hidden_states`; only the stored (mapped) layers are tensors
            `(B, L, H)` (zeros at padding positions), the others `None`.
        attentions: A tuple indexed like the live `attentions`; stored layers are `(B, nh, L, L)` (zeros at padding
            queries and keys), the others `None`.
    """

    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor | None, ...] | None = None
    attentions: tuple[torch.Tensor | None, ...] | None = None


@dataclass(frozen=True)
class CacheLayout:
    """What a cache stores besides the logits; part of the teacher fingerprint.

    Args:
        token_level: Logits per token (token classification, masked LM) rather than per example.
        hidden_states: Indices into the teacher's `hidden_states` tuple to store (the mapped teacher layers).
        attentions: Indices into the teacher's `attentions` tuple to store.
        intermediate_dtype: Storage dtype of hidden states and attentions; `None` keeps the teacher's.
    """

    token_level: bool
    hidden_states: tuple[int, ...] = ()
    attentions: tuple[int, ...] = ()
    intermediate_dtype: torch.dtype | None = None

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable form, written in the cache file and hashed into the teacher fingerprint."""
        dtype = self.intermediate_dtype
        return {
            "token_level": self.token_level,
            "hidden_states": list(self.hidden_states),
            "attentions": list(self.attentions),
            "intermediate_dtype": None if dtype is None else str(dtype).removeprefix("torch."),
        }


def check_cacheable(train_dataset: Any, data_collator: Callable | None) -> None:
    """Refuse, with a `ValueError` naming the fix, training sets whose teacher inputs are known to change per pass.

    Args:
        train_dataset: The training set; it must be map-style (enumerable in order), not an `IterableDataset`.
        data_collator: The collator; random-masking and packing collators are refused.
    """
    if isinstance(train_dataset, (TorchIterableDataset, datasets.IterableDataset)):
        raise ValueError(
            f"teacher_cache_dir is set but the training set is a {type(train_dataset).__name__}, which cannot be "
            "enumerated in order before training, so its teacher outputs cannot be cached; use a map-style dataset "
            f"(e.g. `datasets.Dataset`, or `IterableDataset` materialised with `Dataset.from_generator`) or "
            f"{_NO_CACHE_FIX}."
        )
    collator = getattr(data_collator, "data_collator", data_collator)  # inside the Trainer's RemoveColumnsCollator
    reason = None
    if isinstance(collator, DataCollatorForLanguageModeling) and collator.mlm:
        reason = "masks random tokens anew in every batch"
    elif isinstance(collator, DataCollatorForPermutationLanguageModeling):
        reason = "draws random permutations and spans in every batch"
    elif isinstance(collator, DataCollatorWithFlattening):
        reason = "packs each batch into one row whose contents depend on the batch"
    if reason is not None:
        raise ValueError(
            f"teacher_cache_dir is set but the data collator {type(collator).__name__} {reason}, so the teacher's "
            "inputs change between epochs and cached outputs would be stale targets. Mask or pack the dataset once "
            f"beforehand and use a deterministic collator (e.g. DataCollatorWithPadding), or {_NO_CACHE_FIX}."
        )


def _valid_positions(inputs: Mapping[str, Any], input_names: Iterable[str]) -> np.ndarray:
    """`(B, L)` booleans of the non-padding positions: the attention mask, or every position without one."""
    mask = inputs.get("attention_mask")
    if torch.is_tensor(mask):
        return mask.detach().cpu().numpy() != 0
    tensors = [inputs[name] for name in input_names if torch.is_tensor(inputs.get(name))]
    seq_len = next((tensor.shape[1] for tensor in tensors if tensor.dim() >= 2), 0)
    return np.ones((tensors[0].shape[0], seq_len), dtype=bool)


def _example_keys(inputs: Mapping[str, Any], input_names: tuple[str, ...]) -> tuple[list[bytes], np.ndarray]:
    """The content key of every row of a collated batch, and the `(B, L)` mask of its non-padding positions.

    A key is a BLAKE2b hash of the teacher's inputs at the row's non-padding positions and of where those positions
    sit (the mask up to its last non-padding position): the same example gives the same key in any batch, padded to
    any length, and any change to what the teacher reads gives another key.
    """
    names = [name for name in input_names if name in inputs]
    arrays = {name: inputs[name].detach().cpu().numpy() for name in names if torch.is_tensor(inputs[name])}
    if not arrays:
        raise ValueError(
            f"The batch holds none of the teacher's inputs {list(input_names)} as tensors (keys: {sorted(inputs)}), "
            f"so it cannot be looked up in the teacher cache; {_NO_CACHE_FIX}."
        )
    valid = _valid_positions(inputs, names)  # (B, L)
    rows, seq_len = valid.shape
    counts = valid.sum(1)
    trimmed = np.where(counts > 0, seq_len - np.argmax(valid[:, ::-1], axis=1), 0)  # drops trailing padding only
    splits = np.cumsum(counts)[:-1]
    per_input_rows, batch_level = [], []
    for name in names:
        array = arrays.get(name)
        if array is None:  # a non-tensor input: the same for every row
            batch_level.append((name, repr(inputs[name])))
        elif array.shape[:2] == valid.shape:  # per-position input: its non-padding positions, split by row
            per_input_rows.append(np.split(np.ascontiguousarray(array[valid]), splits))
            batch_level.append((name, str(array.dtype), array.shape[2:]))
        else:  # one value (or vector) per row
            per_input_rows.append([np.ascontiguousarray(row) for row in array])
            batch_level.append((name, str(array.dtype), array.shape[1:]))
    # What is the same for every row (names, dtypes, shapes) is hashed once; each row's hash continues from a copy.
    prefix = hashlib.blake2b(repr(batch_level).encode(), digest_size=KEY_BYTES)
    keys = []
    for row in range(rows):
        digest = prefix.copy()
        digest.update(np.ascontiguousarray(valid[row, : trimmed[row]]))
        for chunks in per_input_rows:
            digest.update(chunks[row])
        keys.append(digest.digest())
    return keys, valid


def teacher_fingerprint(teacher: PreTrainedModel, layout: CacheLayout) -> str:
    """A hash of everything the cached outputs depend on: config, weights (bytes and dtypes), attention kernel, layout.

    Args:
        teacher: The teacher, as it will run (after any cast to the training precision).
        layout: What the cache stores.

    Returns:
        A 64-character hex digest.
    """
    config = teacher.config.to_dict()
    config.pop("_name_or_path", None)  # the same weights loaded from another folder give the same outputs
    described = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "class": type(teacher).__name__,
        "config": config,
        "attn_implementation": getattr(teacher.config, "_attn_implementation", None),
        "layout": layout.describe(),
    }
    digest = hashlib.blake2b(digest_size=32)
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_as_bytes(tensor))
    return digest.hexdigest()


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of `tensor` as a uint8 array (any dtype, bfloat16 included)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if not array.flags.writeable:  # a slice of the read-only map (fancy indexing already copies)
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of `arange(start, start + length)` for each pair, without a Python loop."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


# ---- Temporary files of builds ----


def _host_tag() -> str:
    """8 hex digits naming this machine in temporary file names: a PID means nothing on another host of a shared disk."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _process_alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (a zombie counts: its parent has not collected it yet)."""
    if os.name != "posix":  # os.kill(pid, 0) terminates the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _create_temp_file(path: str) -> tuple[int, str]:
    """Create and exclusively lock the temporary file of a build of `path`; returns its descriptor and path.

    The name holds this host and process, so a later build can tell that the process is gone; the `flock`, held until
    the descriptor is closed, guards a live build whose PID the cleaner cannot see (another PID namespace). On NFS,
    where Linux emulates `flock` with POSIX locks that any `close` of the file by the process releases (the memory
    maps open and close it), only the host and PID check protects a live build.
    """
    handle, temp_path = tempfile.mkstemp(
        dir=os.path.dirname(path), prefix=f"{os.path.basename(path)}.{_host_tag()}-{os.getpid()}.", suffix=".tmp"
    )
    if fcntl is not None:
        fcntl.flock(handle, fcntl.LOCK_EX)
    return handle, temp_path


def _remove_stale_temp_files(cache_dir: str) -> None:
    """Remove the temporary files in `cache_dir` of builds that were killed (their process is gone), and only those.

    A file is removed only when it names this host, its process no longer runs, and no one holds its lock, so a
    concurrent build of another process (of any cache, on any host) keeps its file.
    """
    if fcntl is None:
        return
    legacy = []
    for entry in os.scandir(cache_dir):
        match = _TEMP_NAME.match(entry.name)
        if match is None:
            if _LEGACY_TEMP_NAME.match(entry.name):
                legacy.append(entry.name)
            continue
        if match["host"] != _host_tag() or _process_alive(int(match["pid"])):
            continue
        try:
            handle = os.open(entry.path, os.O_RDONLY)
        except FileNotFoundError:  # removed meanwhile by another process's cleanup
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = os.fstat(handle).st_size
            os.remove(entry.path)
        except (BlockingIOError, FileNotFoundError):  # held by a live build, or removed meanwhile
            continue
        finally:
            os.close(handle)
        logger.warning(
            f"Removed {entry.path} ({size} bytes), the temporary file of a teacher cache build by process "
            f"{match['pid']} of this host, which was killed before it finished."
        )
    if legacy:
        logger.warning(
            f"{cache_dir} holds temporary files of teacher cache builds by an earlier hf-compress version "
            f"({', '.join(sorted(legacy))}); they are not used and cannot be told apart from a build still running, "
            "so they are kept: delete them once no older hf-compress is building a cache there."
        )


# ---- The cache ----


class TeacherCache:
    """The teacher's outputs over one training set, memory-mapped from a safetensors file and looked up by content.

    `TeacherCache.load_or_build` opens the file of a teacher and training set, computing it first when there is none
    (what `DistillationTrainer.train()` does when `teacher_cache_dir` is set); `lookup(batch)` returns the outputs of
    a collated training batch, in any order, batch size or padding.

    Attributes:
        path: The cache file.
        teacher_fingerprint: Hash of the teacher and of what is stored (see `teacher_fingerprint`).
        data_fingerprint: Hash of the training set's ordered example keys.
        num_examples: Number of distinct examples stored (repeated examples share one entry).
        built: Whether the teacher ran to write the file (`False`: an existing file was reused).

    Example:
        ```python
        args = DistillationTrainingArguments(output_dir="student", teacher_cache_dir="teacher_cache")
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_dataset)
        trainer.train()  # runs the teacher once over train_dataset, then every epoch reads the cache
        trainer.teacher_cache  # TeacherCache(path='teacher_cache/3f0c...-9a1e....safetensors', num_examples=67349, ...)
        ```
    """

    def __init__(self, path: str, input_names: Iterable[str], built: bool = False):
        """Open a cache file, checking its header and key index.

        Args:
            path: The cache file.
            input_names: The inputs the teacher takes; the example keys hash these.
            built: Whether the teacher just ran to write the file.

        Raises:
            TeacherCacheCorruptedError: when the file is truncated, or its header or key index fails its checksum.
            ValueError: when the file is not a teacher cache of this format version.
        """
        self.path = path
        try:
            file = MappedSafetensors(path)
        except SafetensorsCorruptedError as error:
            raise self._corrupted(error) from None
        metadata = file.metadata
        if metadata.get("format") != CACHE_FORMAT or metadata.get("version") != str(CACHE_VERSION):
            raise ValueError(
                f"{path} is not an hf-compress teacher cache of version {CACHE_VERSION} (its format and version: "
                f"{metadata.get('format')!r}, {metadata.get('version')!r})."
            )
        if not file.checksummed:  # this version always writes them: the header lost them
            raise self._corrupted(SafetensorsCorruptedError(f"{path} has no checksums."))
        # The whole index is read into memory below, so it is checked in full now: a damaged key must not later look
        # like an input the cache does not hold.
        try:
            for name in _INDEX_TENSORS:
                file.verify_tensor(name)
        except SafetensorsCorruptedError as error:
            raise self._corrupted(error) from None
        self._file = file
        self._inode = os.stat(path).st_ino  # to delete this file, not a rebuilt one, if a data block is damaged
        self.built = built
        self.teacher_fingerprint = metadata["teacher_fingerprint"]
        self.data_fingerprint = metadata["data_fingerprint"]
        self.input_names = tuple(sorted(input_names))
        self._layout = json.loads(metadata["layout"])
        self._num_hidden_states = int(metadata["num_hidden_states"])
        self._num_attentions = int(metadata["num_attentions"])
        self._arrays, self._dtypes = file.arrays, file.dtypes
        keys = file.arrays["keys"].tobytes()
        self.num_examples = len(keys) // KEY_BYTES
        self._index = {keys[i * KEY_BYTES : (i + 1) * KEY_BYTES]: i for i in range(self.num_examples)}
        self._token_offsets = np.asarray(file.arrays["token_offsets"])
        self._attention_offsets = np.asarray(file.arrays["attention_offsets"])

    def _corrupted(self, error: SafetensorsCorruptedError, deleted: bool = False) -> TeacherCacheCorruptedError:
        """`error` as a `TeacherCacheCorruptedError` that says how to recover."""
        if deleted:
            fix = "The file was deleted: the next run (`train()` or `prepare_teacher_cache()`) rebuilds it."
        else:
            fix = f"Delete {self.path}; the next run (`train()` or `prepare_teacher_cache()`) rebuilds it."
        return TeacherCacheCorruptedError(
            f"The teacher cache is damaged: {error} Its outputs cannot be trusted as distillation targets. {fix} If "
            "cache files keep getting damaged, check the disk (or set teacher_cache_dir=None to run the teacher live).",
            reason=str(error),
        )

    def _verify(self, name: str, starts: np.ndarray, stops: np.ndarray) -> None:
        """Check the blocks of tensor `name` that rows `starts[i]:stops[i]` sit in; on damage delete the file and raise."""
        try:
            self._file.verify_rows(name, starts, stops)
        except SafetensorsCorruptedError as error:
            raise self._corrupted(error, deleted=self._delete()) from None

    def _delete(self) -> bool:
        """Delete the damaged file, unless its path now names another file (rebuilt meanwhile by another process)."""
        try:
            if os.stat(self.path).st_ino != self._inode:
                return False
            os.remove(self.path)
        except FileNotFoundError:  # another process of the run found the damage first
            return True
        except OSError:
            return False
        logger.warning(f"Deleted the damaged teacher cache {self.path}.")
        return True

    def __repr__(self) -> str:
        return f"TeacherCache(path={self.path!r}, num_examples={self.num_examples}, layout={self._layout})"

    def lookup(self, inputs: Mapping[str, Any], device: torch.device | str | None = None) -> CachedTeacherOutput:
        """The cached teacher outputs of a collated batch, re-padded to the batch's shape.

        Args:
            inputs: A batch from the collator the cache was built with.
            device: Where to put the outputs (default: CPU).

        Returns:
            A `CachedTeacherOutput` indexed like the live teacher's output.

        Raises:
            TeacherCacheCorruptedError: when a block of the file read for this batch fails its checksum (the file is
                then deleted, so that the next run rebuilds it).
            ValueError: when a row's inputs are not in the cache (the collator or a dataset transform changed them).
        """
        keys, valid = _example_keys(inputs, self.input_names)
        rows = np.empty(len(keys), dtype=np.int64)
        for row, key in enumerate(keys):
            index = self._index.get(key)
            if index is None:
                # The index was checked when the file was opened; check the keys on disk again before blaming the
                # inputs, since a file changed under a running job is a damaged file, not a changed collator.
                try:
                    self._file.verify_tensor("keys", force=True)
                except SafetensorsCorruptedError as error:
                    raise self._corrupted(error, deleted=self._delete()) from None
                raise ValueError(
                    f"Row {row} of this training batch is not in the teacher cache {self.path}: its inputs differ "
                    "from every example the cache was built from, so the data collator or a dataset transform changes "
                    "the inputs between passes (random masking, augmentation, random truncation, ...) and cached "
                    f"teacher outputs would be stale targets. Make the inputs deterministic, or {_NO_CACHE_FIX}."
                )
            rows[row] = index
        layout = self._layout
        valid_mask = torch.from_numpy(valid)  # (B, L)
        token_starts, counts = self._token_offsets[rows], valid.sum(1)
        token_rows = _ranges(token_starts, counts)  # the stored rows of every valid position

        # Every block this batch reads is checked before its values are used (each block once per opened file).
        token_stops = token_starts + counts
        if layout["token_level"]:
            self._verify("logits", token_starts, token_stops)
            logits = self._per_position("logits", token_rows, valid_mask)  # (B, L, C)
        else:
            self._verify("logits", rows, rows + 1)
            logits = _to_torch(self._arrays["logits"][rows], self._dtypes["logits"])  # (B, C)
        output = CachedTeacherOutput(logits=logits.to(device))
        if layout["hidden_states"]:
            hidden_states = [None] * self._num_hidden_states
            for index in layout["hidden_states"]:
                self._verify(f"hidden_states.{index}", token_starts, token_stops)
                hidden_states[index] = self._per_position(f"hidden_states.{index}", token_rows, valid_mask).to(device)
            output.hidden_states = tuple(hidden_states)
        if layout["attentions"]:
            attentions = [None] * self._num_attentions
            for index in layout["attentions"]:
                self._verify(f"attentions.{index}", self._attention_offsets[rows], self._attention_offsets[rows + 1])
                attentions[index] = self._attention(f"attentions.{index}", rows, valid_mask).to(device)
            output.attentions = tuple(attentions)
        return output

    def _per_position(self, name: str, token_rows: np.ndarray, valid: torch.Tensor) -> torch.Tensor:
        """Scatter the stored non-padding rows of `name` back into a zero-padded `(B, L, ...)` tensor."""
        stored = self._arrays[name]
        values = _to_torch(stored[token_rows], self._dtypes[name])  # (valid positions, ...)
        padded = values.new_zeros((*valid.shape, *stored.shape[1:]))  # (B, L, ...)
        padded[valid] = values  # boolean indexing walks row-major, the order they were stored in
        return padded

    def _attention(self, name: str, rows: np.ndarray, valid: torch.Tensor) -> torch.Tensor:
        """Each row's stored `(nh, n, n)` block between its valid positions, in a zero `(B, nh, L, L)` tensor."""
        stored, dtype, num_heads = self._arrays[name], self._dtypes[name], self._layout["num_heads"]
        batch, seq_len = valid.shape
        padded = torch.zeros((batch, num_heads, seq_len, seq_len), dtype=dtype)
        for row, index in enumerate(rows):
            positions = valid[row].nonzero().squeeze(1)  # (n,)
            n = len(positions)
            start = self._attention_offsets[index]
            block = _to_torch(stored[start : start + num_heads * n * n], dtype).view(num_heads, n, n)
            padded[row][:, positions[:, None], positions[None, :]] = block  # (nh, n, n) into (nh, L, L)
        return padded

    @classmethod
    def load_or_build(
        cls,
        cache_dir: str,
        batches: Iterable[Mapping[str, Any]],
        teacher: PreTrainedModel,
        teacher_forward: Callable[[Mapping[str, Any]], ModelOutput],
        input_names: Iterable[str],
        layout: CacheLayout,
        show_progress: bool = True,
    ) -> TeacherCache:
        """Open the cache of this teacher and training set, computing it first when no valid file exists.

        Args:
            cache_dir: The folder of cache files (created if missing).
            batches: An in-order pass over the training set, collated as in training. It is iterated twice when the
                cache is built (to fingerprint the data, then to run the teacher), so it must be re-iterable, such as
                a `DataLoader`.
            teacher: The teacher as it will run, for its fingerprint.
            teacher_forward: Runs the teacher on a batch in the training precision and returns its output: `logits`,
                plus `hidden_states` / `attentions` when `layout` stores them. Called under `torch.inference_mode()`.
            input_names: The inputs the teacher takes; the example keys hash these.
            layout: What to store besides the logits.
            show_progress: Show tqdm progress bars.

        Returns:
            The opened `TeacherCache`; its `built` says whether the teacher had to run.

        Before anything else it removes the temporary files of killed builds in `cache_dir` (see the module
        docstring). A file that fails its header or index checks is deleted and rebuilt, with a warning.

        Raises:
            ValueError: for an empty training set, or when two in-order passes give different teacher inputs.
        """
        input_names = tuple(sorted(input_names))
        keys, counts = [], []
        for batch in tqdm(batches, desc="Fingerprinting the training set", disable=not show_progress):
            batch_keys, valid = _example_keys(batch, input_names)
            keys += batch_keys
            counts.append(valid.sum(1))
        if not keys:
            raise ValueError(f"The training set is empty, so there is nothing to cache; {_NO_CACHE_FIX}.")
        data_digest = hashlib.blake2b(b"".join(keys), digest_size=32).hexdigest()
        teacher_digest = teacher_fingerprint(teacher, layout)
        os.makedirs(cache_dir, exist_ok=True)
        _remove_stale_temp_files(cache_dir)
        path = os.path.join(cache_dir, f"{teacher_digest[:16]}-{data_digest[:16]}.safetensors")
        if os.path.isfile(path):
            try:
                cache = cls(path, input_names)
            except TeacherCacheCorruptedError as error:
                # Found before training: rebuilding costs one teacher pass, and a damaged file is worth nothing.
                logger.warning(f"Deleting and rebuilding the teacher cache {path}, which is damaged: {error.reason}")
                try:
                    os.remove(path)
                except FileNotFoundError:  # removed meanwhile by another process
                    pass
            except (ValueError, KeyError, OSError) as error:  # JSONDecodeError is a ValueError
                logger.warning(f"Rebuilding the teacher cache {path}, which cannot be read ({error}).")
            else:
                if (cache.teacher_fingerprint, cache.data_fingerprint) == (teacher_digest, data_digest):
                    logger.info(f"Reusing the cached teacher outputs of {cache.num_examples} examples in {path}.")
                    return cache
                logger.warning(f"Rebuilding the teacher cache {path}: its full fingerprints differ from this run's.")
        metadata = {
            "format": CACHE_FORMAT,
            "version": str(CACHE_VERSION),
            "teacher_fingerprint": teacher_digest,
            "data_fingerprint": data_digest,
            "num_training_examples": str(len(keys)),
        }
        builder = _Builder(keys, np.concatenate(counts), input_names, layout, metadata)
        builder.write(path, batches, teacher_forward, show_progress)
        cache = cls(path, input_names, built=True)
        logger.info(f"Cached the teacher outputs of {cache.num_examples} examples in {path}.")
        return cache


class _Builder:
    """Runs the teacher over the training set once and writes each distinct example's outputs into the cache file."""

    def __init__(
        self,
        keys: list[bytes],
        counts: np.ndarray,
        input_names: tuple[str, ...],
        layout: CacheLayout,
        metadata: dict[str, str],
    ):
        self.keys, self.input_names, self.layout, self.metadata = keys, input_names, layout, metadata
        self.row_of: dict[bytes, int] = {}  # key -> its cache row; repeats of an example share the first one's
        for key in keys:
            self.row_of.setdefault(key, len(self.row_of))
        self.counts = np.zeros(len(self.row_of), dtype=np.int64)  # non-padding positions of each cache row
        for key, count in zip(keys, counts, strict=True):
            self.counts[self.row_of[key]] = count
        self.token_offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.attention_offsets = np.zeros(len(self.counts) + 1, dtype=np.int64)  # set once the head count is known
        self.filled = np.zeros(len(self.counts), dtype=bool)
        self.writer: SafetensorsWriter | None = None
        self.arrays: dict[str, np.ndarray] | None = None  # the writer's maps

    def write(
        self,
        path: str,
        batches: Iterable[Mapping[str, Any]],
        teacher_forward: Callable[[Mapping[str, Any]], ModelOutput],
        show_progress: bool,
    ) -> None:
        """Write the cache to a temporary file beside `path` and rename it to `path` once complete."""
        handle, temp_path = _create_temp_file(path)
        try:
            position = 0
            for batch in tqdm(batches, desc="Caching teacher outputs", disable=not show_progress):
                batch_keys, valid = _example_keys(batch, self.input_names)
                if batch_keys != self.keys[position : position + len(batch_keys)]:
                    raise ValueError(
                        "Two in-order passes over the training set gave different teacher inputs: the data collator "
                        "or a dataset transform is random (masking, augmentation, random truncation, ...), so cached "
                        f"teacher outputs would be stale targets. Make the inputs deterministic, or {_NO_CACHE_FIX}."
                    )
                position += len(batch_keys)
                rows = np.array([self.row_of[key] for key in batch_keys], dtype=np.int64)
                todo = self._first_occurrences(rows)
                if not todo.any():  # every example of the batch is a repeat: no need to run the teacher
                    continue
                with torch.inference_mode():
                    outputs = teacher_forward(batch)
                if self.writer is None:
                    self._allocate(temp_path, outputs)
                self._write_batch(outputs, valid, rows, todo)
            if position != len(self.keys):
                raise ValueError(
                    f"The second pass over the training set gave {position} examples instead of {len(self.keys)}; it "
                    f"must give the same examples in every pass, or {_NO_CACHE_FIX}."
                )
            self.writer.finish()  # checksums, then fsync: the data is on disk before the name says it is complete
            self.writer = self.arrays = None
            os.replace(temp_path, path)
        except BaseException:  # KeyboardInterrupt included: never leave a partial file behind
            if self.writer is not None:
                self.writer.close()
            self.writer = self.arrays = None
            os.remove(temp_path)
            raise
        finally:
            os.close(handle)  # releases the lock only now, after the rename or removal

    def _first_occurrences(self, rows: np.ndarray) -> np.ndarray:
        """Which batch rows hold an example whose outputs are not written yet (the first of repeats in the batch)."""
        todo = np.zeros(len(rows), dtype=bool)
        seen = set()
        for i, row in enumerate(rows.tolist()):
            if not self.filled[row] and row not in seen:
                todo[i] = True
                seen.add(row)
        return todo

    def _allocate(self, path: str, outputs: ModelOutput) -> None:
        """Create the file, now that the first batch's outputs give the shapes and dtypes."""
        layout, num_rows, num_tokens = self.layout, len(self.counts), int(self.token_offsets[-1])
        logits = outputs.logits
        specs = {
            "keys": (torch.uint8, (num_rows, KEY_BYTES)),
            "token_offsets": (torch.int64, (num_rows + 1,)),
            "attention_offsets": (torch.int64, (num_rows + 1,)),
            # token-level: (tokens, C) at non-padding positions; else (examples, C)
            "logits": (
                logits.dtype,
                (num_tokens, *logits.shape[2:]) if layout.token_level else (num_rows, *logits.shape[1:]),
            ),
        }
        for index in layout.hidden_states:
            hidden = _returned(outputs, "hidden_states", index)
            specs[f"hidden_states.{index}"] = (
                layout.intermediate_dtype or hidden.dtype,
                (num_tokens, *hidden.shape[2:]),
            )
        num_heads = 0
        for index in layout.attentions:
            attention = _returned(outputs, "attentions", index)  # (B, nh, L, L)
            num_heads = attention.shape[1]
            self.attention_offsets = np.concatenate([[0], np.cumsum(num_heads * self.counts**2)])
            specs[f"attentions.{index}"] = (
                layout.intermediate_dtype or attention.dtype,
                (int(self.attention_offsets[-1]),),
            )
        self.metadata["layout"] = json.dumps({**layout.describe(), "num_heads": num_heads})
        self.metadata["num_hidden_states"] = str(len(outputs.hidden_states or ()))
        self.metadata["num_attentions"] = str(len(outputs.attentions or ()))
        self.writer = SafetensorsWriter(path, specs, self.metadata)
        self.arrays = self.writer.arrays
        self.arrays["keys"][:] = np.frombuffer(b"".join(self.row_of), dtype=np.uint8).reshape(num_rows, KEY_BYTES)
        self.arrays["token_offsets"][:] = self.token_offsets
        self.arrays["attention_offsets"][:] = self.attention_offsets

    def _write_batch(self, outputs: ModelOutput, valid: np.ndarray, rows: np.ndarray, todo: np.ndarray) -> None:
        """Copy the outputs of the batch rows in `todo` to their cache rows."""
        batch_rows = torch.from_numpy(np.flatnonzero(todo))
        cache_rows = rows[todo]
        valid_mask = torch.from_numpy(valid)[batch_rows]  # (k, L)
        # The stored rows of every valid position of the rows written, in row-major order.
        token_rows = _ranges(self.token_offsets[cache_rows], self.counts[cache_rows])
        logits = outputs.logits.detach().cpu()[batch_rows]
        if self.layout.token_level:
            self._write_positions("logits", logits, valid_mask, token_rows)
        else:
            self.arrays["logits"][cache_rows] = _to_numpy(logits)
        for index in self.layout.hidden_states:
            hidden = _returned(outputs, "hidden_states", index).detach().cpu()[batch_rows]
            self._write_positions(f"hidden_states.{index}", hidden, valid_mask, token_rows)
        for index in self.layout.attentions:
            attention = _returned(outputs, "attentions", index).detach().cpu()[batch_rows]  # (k, nh, L, L)
            dtype, stored = self.layout.intermediate_dtype or attention.dtype, self.arrays[f"attentions.{index}"]
            for row, cache_row in enumerate(cache_rows):
                positions = valid_mask[row].nonzero().squeeze(1)  # (n,)
                block = attention[row][:, positions[:, None], positions[None, :]]  # (nh, n, n)
                start = self.attention_offsets[cache_row]
                stored[start : start + block.numel()] = _to_numpy(block.to(dtype).reshape(-1))
        self.filled[cache_rows] = True

    def _write_positions(self, name: str, values: torch.Tensor, valid: torch.Tensor, token_rows: np.ndarray) -> None:
        """Store the non-padding positions of `values` `(k, L, ...)` at `token_rows`."""
        if values.shape[:2] != valid.shape:
            raise ValueError(
                f"The teacher's {name} has shape {tuple(values.shape)}, which does not follow the batch's "
                f"{tuple(valid.shape)} positions, so it cannot be stored per token; {_NO_CACHE_FIX}."
            )
        stored = self.arrays[name]
        dtype = self.layout.intermediate_dtype if name != "logits" and self.layout.intermediate_dtype else values.dtype
        stored[token_rows] = _to_numpy(values[valid].to(dtype))  # (valid positions, ...)


def _returned(outputs: ModelOutput, name: str, index: int) -> torch.Tensor:
    """`outputs.<name>[index]`, or a ValueError when the teacher did not return it."""
    values = getattr(outputs, name, None)
    if values is None or index >= len(values):
        raise ValueError(
            f"The teacher returned no {name}[{index}], which the intermediate losses need; its forward must honour "
            f"output_{name}=True."
        )
    return values[index]
