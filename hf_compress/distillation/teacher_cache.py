"""Teacher-output caching: run the teacher once over the training set and reuse its outputs every epoch and run.

`DistillationTrainingArguments(teacher_cache_dir=...)` turns it on; `DistillationTrainer.train()` calls
`TeacherCache.load_or_build` before training and serves every training batch from the cache.

This module opens and reads the cache (`TeacherCache`) and refuses training sets it cannot serve; the file's layout,
keys and fingerprints are in `cache_format`, writing it in `cache_builder`, its temporary files in `cache_temp_files`,
and the checksummed memory-mapped I/O in `mmap_safetensors` (all in `hf_compress.distillation`).

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
(`mmap_safetensors`). Opening it checks the header and the whole key index (keys and offsets); every data block is
checked the first time a lookup reads it. Damage found when `load_or_build` opens the file (header, index,
truncation) makes it rebuild the file, with a warning; damage found in a data block during training raises
`TeacherCacheCorruptedError` naming the file, tensor and block, and deletes the file so the next run rebuilds it.
Files of an earlier format version (without checksums) are never opened: the version is part of the file name.

**Interrupted builds.** The file is written under a temporary name, `<file>.<host>-<pid>.<random>.tmp`, and renamed
when complete, so an interrupted build never leaves a file that looks valid. An exception or Ctrl-C removes the
temporary file at once; a killed process (SIGKILL, out of memory, power loss) cannot, so every `load_or_build` removes
the temporary files in its folder left by processes of this host that no longer run and hold no lock on them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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

from .cache_builder import CacheBuilder
from .cache_format import (
    CACHE_FORMAT,
    CACHE_VERSION,
    INDEX_TENSORS,
    KEY_BYTES,
    NO_CACHE_FIX,
    CacheLayout,
    data_fingerprint,
    example_keys,
    packed_rows,
    teacher_fingerprint,
)
from .cache_temp_files import remove_stale_temp_files
from .mmap_safetensors import MappedSafetensors, SafetensorsCorruptedError, from_stored_array

if TYPE_CHECKING:
    from .distributed import Lockstep

logger = logging.get_logger(__name__)


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
            f"{NO_CACHE_FIX}."
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
            f"beforehand and use a deterministic collator (e.g. DataCollatorWithPadding), or {NO_CACHE_FIX}."
        )


def check_labels_inside_mask(inputs: Mapping[str, Any], token_level: bool) -> None:
    """Refuse a batch whose labels point at padding: the cache holds token-level outputs at non-padding positions only.

    Args:
        inputs: A training batch.
        token_level: Whether the task predicts per token (only then are outputs stored per position).
    """
    labels, attention_mask = inputs.get("labels"), inputs.get("attention_mask")
    if not token_level or labels is None or attention_mask is None:
        return
    if (labels.ne(-100) & attention_mask.eq(0)).any():
        raise ValueError(
            "The batch has labels at positions whose attention_mask is 0, but the teacher cache stores the "
            "teacher's outputs at non-padding positions only; label padding with -100 (as "
            "DataCollatorForTokenClassification does) or set teacher_cache_dir=None."
        )


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
            for name in INDEX_TENSORS:
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
        keys, valid = example_keys(inputs, self.input_names)
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
                    f"teacher outputs would be stale targets. Make the inputs deterministic, or {NO_CACHE_FIX}."
                )
            rows[row] = index
        layout = self._layout
        valid_mask = torch.from_numpy(valid)  # (B, L)
        token_starts, counts = self._token_offsets[rows], valid.sum(1)
        token_rows = packed_rows(token_starts, counts)  # the stored rows of every valid position

        # Every block this batch reads is checked before its values are used (each block once per opened file).
        token_stops = token_starts + counts
        if layout["token_level"]:
            self._verify("logits", token_starts, token_stops)
            logits = self._per_position("logits", token_rows, valid_mask)  # (B, L, C)
        else:
            self._verify("logits", rows, rows + 1)
            logits = from_stored_array(self._arrays["logits"][rows], self._dtypes["logits"])  # (B, C)
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
        values = from_stored_array(stored[token_rows], self._dtypes[name])  # (valid positions, ...)
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
            block = from_stored_array(stored[start : start + num_heads * n * n], dtype).view(num_heads, n, n)
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
        lockstep: Lockstep | None = None,
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
            lockstep: For a teacher sharded over processes (FSDP2), whose every forward and fingerprint is a
                collective: every process of the run then calls `load_or_build` with the same batches. They agree on
                whether to build (any writer without a valid file makes all build), run the teacher together on every
                batch while the writers (`lockstep.writes`, one process per node) write the file, agree on whether
                every write succeeded (a failed write is raised on every process, never left waiting), then all
                open the file. `None`: this process alone decides, builds and writes.

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
            batch_keys, valid = example_keys(batch, input_names)
            keys += batch_keys
            counts.append(valid.sum(1))
        if not keys:
            raise ValueError(f"The training set is empty, so there is nothing to cache; {NO_CACHE_FIX}.")
        data_digest = data_fingerprint(keys)
        teacher_digest = teacher_fingerprint(teacher, layout)
        path = os.path.join(cache_dir, f"{teacher_digest[:16]}-{data_digest[:16]}.safetensors")
        writes = lockstep is None or lockstep.writes
        cache = cls._reuse(path, input_names, teacher_digest, data_digest) if writes else None
        # Also a barrier: the other processes open the file only once their writer has checked or rebuilt it.
        build = cache is None if lockstep is None else lockstep.any(writes and cache is None)
        if not build:
            return cache if cache is not None else cls(path, input_names)
        metadata = {
            "format": CACHE_FORMAT,
            "version": str(CACHE_VERSION),
            "teacher_fingerprint": teacher_digest,
            "data_fingerprint": data_digest,
            "num_training_examples": str(len(keys)),
        }
        builder = CacheBuilder(keys, np.concatenate(counts), input_names, layout, metadata)
        if lockstep is None:
            builder.write(path, batches, teacher_forward, show_progress)
        else:
            error = builder.write(path if writes else None, batches, teacher_forward, show_progress, lockstep=True)
            if lockstep.any(error is not None):
                if error is not None:
                    raise error
                raise RuntimeError(
                    f"Writing the teacher cache {path} failed on another process (its error says why), so this "
                    "process stops too. Fix the cause (often the disk of teacher_cache_dir) and rerun, or set "
                    "teacher_cache_dir=None to run the teacher live."
                )
        cache = cls(path, input_names, built=True)
        logger.info(f"Cached the teacher outputs of {cache.num_examples} examples in {path}.")
        return cache

    @classmethod
    def _reuse(
        cls, path: str, input_names: tuple[str, ...], teacher_digest: str, data_digest: str
    ) -> TeacherCache | None:
        """The valid cache at `path`, or `None` when it must be built (a damaged file is deleted); first creates the
        folder and removes the temporary files of killed builds in it."""
        os.makedirs(os.path.dirname(path), exist_ok=True)
        remove_stale_temp_files(os.path.dirname(path))
        if not os.path.isfile(path):
            return None
        try:
            cache = cls(path, input_names)
        except TeacherCacheCorruptedError as error:
            # Found before training: rebuilding costs one teacher pass, and a damaged file is worth nothing.
            logger.warning(f"Deleting and rebuilding the teacher cache {path}, which is damaged: {error.reason}")
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile by another process
                os.remove(path)
            return None
        except (ValueError, KeyError, OSError) as error:  # JSONDecodeError is a ValueError
            logger.warning(f"Rebuilding the teacher cache {path}, which cannot be read ({error}).")
            return None
        if (cache.teacher_fingerprint, cache.data_fingerprint) == (teacher_digest, data_digest):
            logger.info(f"Reusing the cached teacher outputs of {cache.num_examples} examples in {path}.")
            return cache
        logger.warning(f"Rebuilding the teacher cache {path}: its full fingerprints differ from this run's.")
        return None
