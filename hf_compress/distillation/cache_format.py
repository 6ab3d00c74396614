"""What a teacher cache file holds and what names it: the layout, the example keys and the fingerprints.

Each example is keyed by a 128-bit BLAKE2b hash of the collated inputs the teacher takes, restricted to its non-padding
positions; the file is named after the teacher's fingerprint and the training set's. Outputs are stored at non-padding
positions only, as flat arrays with offsets (see `packed_rows`). `hf_compress.distillation.teacher_cache` describes
the whole design.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

CACHE_FORMAT = "hf_compress.teacher_cache"  # stored in every cache file: a format id, not a module path
# Bump when the key function or the file layout changes: it enters the teacher fingerprint, so old files are unused.
# 2: block and header checksums (files of version 1 have none, so they are not trusted).
CACHE_VERSION = 2
KEY_BYTES = 16
# The tensors that index the file (read into memory when it is opened, so checked in full then).
INDEX_TENSORS = ("keys", "token_offsets", "attention_offsets")
# The way out that every refusal of the cache names.
NO_CACHE_FIX = "set teacher_cache_dir=None to run the teacher live on every batch"


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


def _valid_positions(inputs: Mapping[str, Any], input_names: Iterable[str]) -> np.ndarray:
    """`(B, L)` booleans of the non-padding positions: the attention mask, or every position without one."""
    mask = inputs.get("attention_mask")
    if torch.is_tensor(mask):
        return mask.detach().cpu().numpy() != 0
    tensors = [inputs[name] for name in input_names if torch.is_tensor(inputs.get(name))]
    seq_len = next((tensor.shape[1] for tensor in tensors if tensor.dim() >= 2), 0)
    return np.ones((tensors[0].shape[0], seq_len), dtype=bool)


def example_keys(inputs: Mapping[str, Any], input_names: tuple[str, ...]) -> tuple[list[bytes], np.ndarray]:
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
            f"so it cannot be looked up in the teacher cache; {NO_CACHE_FIX}."
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
        teacher: The teacher, as it will run (after any cast to the training precision); a teacher sharded with
            FSDP2 gives the digest of the whole one.
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
        if hasattr(tensor, "full_tensor"):  # a DTensor
            # A teacher sharded with FSDP2 hashes as the whole one: every process of its mesh gathers each weight in
            # turn (a collective, so every process must compute the fingerprint), holding one whole weight at a time.
            tensor = tensor.full_tensor()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_as_bytes(tensor))
    return digest.hexdigest()


def data_fingerprint(keys: list[bytes]) -> str:
    """A hash of the training set's ordered example keys: a 64-character hex digest."""
    return hashlib.blake2b(b"".join(keys), digest_size=32).hexdigest()


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of `tensor` as a uint8 array (any dtype, bfloat16 included)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def packed_rows(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of `arange(start, start + length)` for each pair, without a Python loop.

    Per-position outputs are stored as one flat array of rows; example `i` owns the rows
    `token_offsets[i]:token_offsets[i + 1]`, so this gives the stored rows of the examples starting at `starts`.
    """
    ends = np.cumsum(lengths)
    return np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)
