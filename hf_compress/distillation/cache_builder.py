"""Writing a teacher cache file: run the teacher once over the training set and store each distinct example's outputs.

`TeacherCache.load_or_build` fingerprints the training set, then hands its example keys to a `CacheBuilder`, which
runs the teacher batch by batch and writes the outputs straight into memory maps of a temporary file (see
`hf_compress.distillation.cache_temp_files`), renamed to the cache file once complete and checksummed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.utils import ModelOutput

from .cache_format import KEY_BYTES, NO_CACHE_FIX, CacheLayout, example_keys, packed_rows
from .cache_temp_files import create_temp_file
from .mmap_safetensors import SafetensorsWriter, to_stored_array


class CacheBuilder:
    """Runs the teacher over the training set once and writes each distinct example's outputs into the cache file.

    Args:
        keys: The example keys of the whole training set, in order (`example_keys` of each batch of the first pass).
        counts: The number of non-padding positions of each of those examples.
        input_names: The inputs the teacher takes, sorted; the keys hash these.
        layout: What to store besides the logits.
        metadata: The file's metadata (format, version, fingerprints); the layout and output counts are added.
    """

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
        path: str | None,
        batches: Iterable[Mapping[str, Any]],
        teacher_forward: Callable[[Mapping[str, Any]], ModelOutput],
        show_progress: bool,
        lockstep: bool = False,
    ) -> Exception | None:
        """Write the cache to a temporary file beside `path` and rename it to `path` once complete.

        Args:
            path: The cache file; `None` runs the teacher on the same batches without writing (the processes of a
                sharded teacher that do not write, see `lockstep`).
            batches: The second in-order pass over the training set.
            teacher_forward: Runs the teacher on a batch.
            show_progress: Show a tqdm progress bar.
            lockstep: The teacher is sharded over processes that must all run its forward on the same batches
                (each forward is a collective). A failure to write (disk full, ...) then does not stop the teacher:
                it runs on to the last batch like on the other processes, the partial file is removed and the error
                is returned instead of raised, for the caller to agree on with the other processes. Errors of the
                data, which every process sees alike, are still raised.

        Returns:
            The error that stopped the writing with `lockstep`, else `None`.
        """
        handle, temp_path = create_temp_file(path) if path is not None else (None, None)
        failed: Exception | None = None
        try:
            for outputs, valid, rows, todo in self._teacher_outputs(batches, teacher_forward, show_progress):
                if temp_path is None or failed is not None:
                    continue
                try:
                    if self.writer is None:
                        self._allocate(temp_path, outputs)
                    self._write_batch(outputs, valid, rows, todo)
                except Exception as error:
                    if not lockstep:
                        raise
                    failed = error  # keep running the teacher with the other processes
            if temp_path is not None and failed is None:
                try:
                    self.writer.finish()  # checksums, then fsync: the data is on disk before the name says complete
                    self.writer = self.arrays = None
                    os.replace(temp_path, path)
                except Exception as error:
                    if not lockstep:
                        raise
                    failed = error
            if failed is not None:
                self._discard(temp_path)
            return failed
        except BaseException:  # KeyboardInterrupt included: never leave a partial file behind
            self._discard(temp_path)
            raise
        finally:
            if handle is not None:
                os.close(handle)  # releases the lock only now, after the rename or removal

    def _teacher_outputs(
        self,
        batches: Iterable[Mapping[str, Any]],
        teacher_forward: Callable[[Mapping[str, Any]], ModelOutput],
        show_progress: bool,
    ) -> Iterator[tuple[ModelOutput, np.ndarray, np.ndarray, np.ndarray]]:
        """The teacher's outputs of each batch that holds an example not stored yet, with the batch's valid positions,
        cache rows and which of its rows to store; checks that this pass gives the examples of the first."""
        position = 0
        for batch in tqdm(batches, desc="Caching teacher outputs", disable=not show_progress):
            batch_keys, valid = example_keys(batch, self.input_names)
            if batch_keys != self.keys[position : position + len(batch_keys)]:
                raise ValueError(
                    "Two in-order passes over the training set gave different teacher inputs: the data collator "
                    "or a dataset transform is random (masking, augmentation, random truncation, ...), so cached "
                    f"teacher outputs would be stale targets. Make the inputs deterministic, or {NO_CACHE_FIX}."
                )
            position += len(batch_keys)
            rows = np.array([self.row_of[key] for key in batch_keys], dtype=np.int64)
            todo = self._first_occurrences(rows)
            if not todo.any():  # every example of the batch is a repeat: no need to run the teacher
                continue
            with torch.inference_mode():
                outputs = teacher_forward(batch)
            yield outputs, valid, rows, todo
            self.filled[rows[todo]] = True
        if position != len(self.keys):
            raise ValueError(
                f"The second pass over the training set gave {position} examples instead of {len(self.keys)}; it "
                f"must give the same examples in every pass, or {NO_CACHE_FIX}."
            )

    def _discard(self, temp_path: str | None) -> None:
        """Close and remove the temporary file of a build that did not complete."""
        if self.writer is not None:
            self.writer.close()
        self.writer = self.arrays = None
        if temp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp_path)

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
        token_rows = packed_rows(self.token_offsets[cache_rows], self.counts[cache_rows])
        logits = outputs.logits.detach().cpu()[batch_rows]
        if self.layout.token_level:
            self._write_positions("logits", logits, valid_mask, token_rows)
        else:
            self.arrays["logits"][cache_rows] = to_stored_array(logits)
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
                stored[start : start + block.numel()] = to_stored_array(block.to(dtype).reshape(-1))

    def _write_positions(self, name: str, values: torch.Tensor, valid: torch.Tensor, token_rows: np.ndarray) -> None:
        """Store the non-padding positions of `values` `(k, L, ...)` at `token_rows`."""
        if values.shape[:2] != valid.shape:
            raise ValueError(
                f"The teacher's {name} has shape {tuple(values.shape)}, which does not follow the batch's "
                f"{tuple(valid.shape)} positions, so it cannot be stored per token; {NO_CACHE_FIX}."
            )
        stored = self.arrays[name]
        dtype = self.layout.intermediate_dtype if name != "logits" and self.layout.intermediate_dtype else values.dtype
        stored[token_rows] = to_stored_array(values[valid].to(dtype))  # (valid positions, ...)


def _returned(outputs: ModelOutput, name: str, index: int) -> torch.Tensor:
    """`outputs.<name>[index]`, or a ValueError when the teacher did not return it."""
    values = getattr(outputs, name, None)
    if values is None or index >= len(values):
        raise ValueError(
            f"The teacher returned no {name}[{index}], which the intermediate losses need; its forward must honour "
            f"output_{name}=True."
        )
    return values[index]
