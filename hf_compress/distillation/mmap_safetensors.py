"""Safetensors files written and read through memory maps, with per-block CRC-32 checksums verified on first read.

safetensors' own writer needs every tensor in memory at once and its reader cannot say whether bytes changed on disk.
`SafetensorsWriter` lays out a file of known shapes and hands out a writable memory map of each tensor, so data can go
straight to disk piece by piece; `MappedSafetensors` opens one read-only and checks, the first time a part of a tensor
is read, that its bytes are the ones written.

**Integrity data**, both in the standard `__metadata__` (str to str), so any safetensors reader still opens the file:

- `block_checksums`: a JSON object `{"algorithm": "crc32", "tensors": {name: {"rows_per_block": k, "crc32": hex}}}`.
  Each tensor is cut along its first dimension into blocks of `k` rows (about `block_bytes` bytes; the last may be
  shorter) and `hex` holds the 8-hex-digit CRC-32 of each block's raw bytes, in order. Blocks rather than one hash per
  file because files can be many GB and are read batch by batch: a block is hashed once, when it is first read.
- `header_checksum`: BLAKE2b-64 of the canonical JSON (sorted keys, no spaces) of the whole header without this entry,
  so shapes, offsets, metadata and the block checksums themselves are covered, and checked when the file is opened.

Both are written last, over same-length placeholders, so a file whose writer died still fails its checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from typing import Any

import numpy as np
import torch

# safetensors dtype code and the numpy dtype a memory map reads it as (numpy has no bfloat16: its bits go as int16).
STORAGE = {
    torch.float64: ("F64", np.float64),
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.bfloat16: ("BF16", np.int16),
    torch.int64: ("I64", np.int64),
    torch.uint8: ("U8", np.uint8),
}
TORCH_DTYPES = {code: dtype for dtype, (code, _) in STORAGE.items()}
# 256 KiB: hashing a block costs ~0.1 ms (CRC-32 runs at ~2 GB/s), small next to reading it cold from disk, and the
# table stays small (32 hex digits per MiB: 3.2 MB of header for a 100 GB file).
DEFAULT_BLOCK_BYTES = 256 * 1024
_CRC_DIGITS = 8
_HEADER_DIGEST_BYTES = 8
# safetensors refuses larger headers; a damaged size field must not make us read gigabytes as JSON.
_MAX_HEADER_BYTES = 100_000_000


class SafetensorsCorruptedError(ValueError):
    """A file's bytes are not the ones written: it was damaged on disk, truncated, or modified after it was written."""


def to_stored_array(tensor: torch.Tensor) -> np.ndarray:
    """`tensor` (on CPU) as the numpy array a memory map of its dtype holds (`STORAGE`: bfloat16's bits as int16)."""
    tensor = tensor.detach().cpu()
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def from_stored_array(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `dtype` that values read from a memory map hold (a copy when `array` is a read-only map)."""
    if not array.flags.writeable:  # a slice of the read-only map (fancy indexing already copies)
        array = array.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def _header_digest(header: dict[str, Any]) -> str:
    """BLAKE2b-64 of the canonical JSON of `header` minus its own `header_checksum` entry."""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != "header_checksum"}
    canonical = json.dumps({**header, "__metadata__": metadata}, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=_HEADER_DIGEST_BYTES).hexdigest()


def _encode_header(header: dict[str, Any]) -> bytes:
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return header_bytes + b" " * (-len(header_bytes) % 8)  # 8-byte aligned data, as safetensors' own writer pads it


def _map_tensors(
    path: str, header: dict[str, Any], data_start: int, mode: str
) -> tuple[dict[str, np.ndarray], dict[str, torch.dtype]]:
    arrays, dtypes = {}, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtypes[name] = TORCH_DTYPES[entry["dtype"]]
        numpy_dtype = STORAGE[dtypes[name]][1]
        shape, (start, end) = tuple(entry["shape"]), entry["data_offsets"]
        if end == start:  # numpy cannot map zero bytes
            arrays[name] = np.zeros(shape, dtype=numpy_dtype)
        else:
            arrays[name] = np.memmap(path, dtype=numpy_dtype, mode=mode, offset=data_start + start, shape=shape)
    return arrays, dtypes


def _block_crcs(array: np.ndarray, rows_per_block: int) -> str:
    """The hex CRC-32 of each block of `rows_per_block` first-dimension rows of `array`, concatenated."""
    return "".join(
        f"{zlib.crc32(array[start : start + rows_per_block]):08x}" for start in range(0, len(array), rows_per_block)
    )


class SafetensorsWriter:
    """Lay out a safetensors file of the given tensors, hand out a writable memory map of each, then checksum it.

    Args:
        path: The file to create (overwritten).
        specs: Name to `(dtype, shape)` of every tensor, in file order. Every shape has at least one dimension.
        metadata: The `__metadata__` strings; `block_checksums` and `header_checksum` are added.
        block_bytes: About how many bytes each checksummed block holds.

    Attributes:
        arrays: Name to a writable `np.memmap` (bfloat16 as int16); `None` after `finish()`.
    """

    def __init__(
        self,
        path: str,
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str],
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ):
        self.path = path
        self._header: dict[str, Any] = {"__metadata__": dict(metadata)}
        self._rows_per_block: dict[str, int] = {}
        offset = 0
        for name, (dtype, shape) in specs.items():
            row_bytes = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
            nbytes = shape[0] * row_bytes
            self._header[name] = {
                "dtype": STORAGE[dtype][0],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._rows_per_block[name] = max(1, block_bytes // max(row_bytes, 1))
            offset += nbytes
        # Placeholders of the final length, so that the header can be rewritten in place once the data is known.
        num_blocks = {name: -(-shape[0] // self._rows_per_block[name]) for name, (_, shape) in specs.items()}
        self._set_checksums({name: "0" * _CRC_DIGITS * count for name, count in num_blocks.items()})
        self._header["__metadata__"]["header_checksum"] = "0" * 2 * _HEADER_DIGEST_BYTES
        self._header_bytes = _encode_header(self._header)
        with open(path, "wb") as file:
            file.write(struct.pack("<Q", len(self._header_bytes)))
            file.write(self._header_bytes)
            file.truncate(8 + len(self._header_bytes) + offset)
        arrays, _ = _map_tensors(path, self._header, 8 + len(self._header_bytes), mode="r+")
        self.arrays: dict[str, np.ndarray] | None = arrays

    def _set_checksums(self, crcs: dict[str, str]) -> None:
        tensors = {name: {"rows_per_block": self._rows_per_block[name], "crc32": crc} for name, crc in crcs.items()}
        self._header["__metadata__"]["block_checksums"] = json.dumps(
            {"algorithm": "crc32", "tensors": tensors}, separators=(",", ":")
        )

    def finish(self) -> None:
        """Flush the data, checksum every block, write the checksums into the header and sync the file to disk."""
        if self.arrays is None:
            raise RuntimeError(f"SafetensorsWriter.finish() was already called for {self.path}.")
        for array in self.arrays.values():
            if isinstance(array, np.memmap):
                array.flush()
        # Hashed from the maps just written, whose pages are usually still in memory.
        self._set_checksums(
            {name: _block_crcs(array, self._rows_per_block[name]) for name, array in self.arrays.items()}
        )
        self._header["__metadata__"]["header_checksum"] = _header_digest(self._header)
        header_bytes = _encode_header(self._header)
        if len(header_bytes) != len(self._header_bytes):  # cannot happen: every field has a fixed width
            raise RuntimeError(f"The header of {self.path} changed length when its checksums were written.")
        self.arrays = None  # unmap before the final write and sync
        with open(self.path, "rb+") as file:
            file.seek(8)
            file.write(header_bytes)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the caller's rename says the file is complete

    def close(self) -> None:
        """Unmap the tensors without finishing (the caller removes the file)."""
        self.arrays = None


class MappedSafetensors:
    """A safetensors file opened read-only through memory maps, its header checked, its blocks checked on first read.

    Opening checks that the header parses, that the tensors tile the data region and fill the file exactly (a
    truncated or extended file fails here), and, when the file has one, the header checksum. `verify_rows` then checks
    the blocks a read touches, each once.

    Args:
        path: The file.
        verify: Check block checksums in `verify_rows` / `verify_tensor` (the header is always checked).

    Attributes:
        metadata: The `__metadata__` strings.
        arrays: Name to a read-only `np.memmap` (bfloat16 as int16).
        dtypes: Name to the torch dtype.
        checksummed: Whether the file has a header checksum and block checksums (files of other writers do not).

    Raises:
        SafetensorsCorruptedError: when the header does not parse, does not describe the file, or fails its checksum.
    """

    def __init__(self, path: str, verify: bool = True):
        self.path = path
        self.verify = verify
        file_size = os.path.getsize(path)
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise SafetensorsCorruptedError(f"{path} is {file_size} bytes, too short for a safetensors header.")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(_MAX_HEADER_BYTES, file_size - 8):
                raise SafetensorsCorruptedError(
                    f"{path} declares a {header_size}-byte header but is {file_size} bytes long: it is truncated or "
                    "its first bytes are damaged."
                )
            try:
                header = json.loads(file.read(header_size))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise SafetensorsCorruptedError(f"The header of {path} is not valid JSON ({error}).") from None
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
            raise SafetensorsCorruptedError(f"The header of {path} is not a safetensors header.")
        self.metadata: dict[str, str] = header.get("__metadata__", {})
        self.checksummed = "header_checksum" in self.metadata and "block_checksums" in self.metadata
        if "header_checksum" in self.metadata and self.metadata["header_checksum"] != _header_digest(header):
            raise SafetensorsCorruptedError(
                f"The header of {path} (tensor shapes, offsets and metadata) fails its checksum: it was damaged or "
                "modified after it was written."
            )
        data_size = self._check_layout(header)
        if file_size != 8 + header_size + data_size:
            raise SafetensorsCorruptedError(
                f"{path} is {file_size} bytes but its header describes {8 + header_size + data_size}: it is "
                f"{'truncated' if file_size < 8 + header_size + data_size else 'longer than written'}."
            )
        self.arrays, self.dtypes = _map_tensors(path, header, 8 + header_size, mode="r")
        self._rows_per_block: dict[str, int] = {}
        self._crcs: dict[str, str] = {}
        self._verified: dict[str, np.ndarray] = {}  # name -> bitmap of the blocks checked so far
        self._all_verified: set[str] = set()
        if self.checksummed:
            self._load_checksums()

    def _check_layout(self, header: dict[str, Any]) -> int:
        """The size of the data region, after checking that the tensors tile it in order without gaps or overlaps."""
        spans = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = TORCH_DTYPES[entry["dtype"]]
                shape, (start, stop) = [int(size) for size in entry["shape"]], [int(o) for o in entry["data_offsets"]]
            except (KeyError, TypeError, ValueError):
                raise SafetensorsCorruptedError(
                    f"The header entry of tensor {name!r} in {self.path} is malformed: {entry!r}."
                ) from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            if min(shape, default=0) < 0 or stop - start != nbytes:
                raise SafetensorsCorruptedError(
                    f"Tensor {name!r} of {self.path} has shape {shape} ({nbytes} bytes) but data offsets "
                    f"[{start}, {stop}]: the header is damaged."
                )
            spans.append((start, stop, name))
        end = 0
        for start, stop, name in sorted(spans):
            if start != end:
                raise SafetensorsCorruptedError(
                    f"Tensor {name!r} of {self.path} starts at data offset {start}, not where the previous tensor "
                    f"ends ({end}): the header is damaged."
                )
            end = stop
        return end

    def _load_checksums(self) -> None:
        try:
            table = json.loads(self.metadata["block_checksums"])
            if table["algorithm"] != "crc32" or set(table["tensors"]) != set(self.arrays):
                raise ValueError("names or algorithm")
            for name, entry in table["tensors"].items():
                rows_per_block, crcs = int(entry["rows_per_block"]), entry["crc32"]
                num_blocks = -(-len(self.arrays[name]) // rows_per_block)
                if rows_per_block < 1 or len(crcs) != _CRC_DIGITS * num_blocks:
                    raise ValueError(f"{name}: {num_blocks} blocks")
                self._rows_per_block[name], self._crcs[name] = rows_per_block, crcs
                self._verified[name] = np.zeros(num_blocks, dtype=bool)
        except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise SafetensorsCorruptedError(
                f"The block checksum table of {self.path} does not match its tensors ({error})."
            ) from None

    def verify_rows(self, name: str, starts: np.ndarray, stops: np.ndarray) -> None:
        """Check the blocks of tensor `name` holding first-dimension rows `starts[i]:stops[i]` that are not checked yet.

        Args:
            name: The tensor.
            starts: First rows of the ranges to be read.
            stops: Ends (exclusive) of the ranges; empty ranges are skipped.

        Raises:
            SafetensorsCorruptedError: naming the tensor, the block, its rows and its byte range in the file.
        """
        if not self.verify or not self.checksummed or name in self._all_verified:
            return
        starts, stops = np.asarray(starts, dtype=np.int64), np.asarray(stops, dtype=np.int64)
        nonempty = stops > starts
        if not nonempty.any():
            return
        rows_per_block, verified = self._rows_per_block[name], self._verified[name]
        first, last = starts[nonempty] // rows_per_block, (stops[nonempty] - 1) // rows_per_block
        counts = last - first + 1
        ends = np.cumsum(counts)
        blocks = np.repeat(first - (ends - counts), counts) + np.arange(ends[-1])  # every block of every range
        for block in np.unique(blocks[~verified[blocks]]).tolist():
            self._verify_block(name, block)
        if verified.all():
            self._all_verified.add(name)

    def verify_tensor(self, name: str, force: bool = False) -> None:
        """Check every block of tensor `name`; with `force`, also those already checked (to catch later changes)."""
        if not self.verify or not self.checksummed:
            return
        if force:
            self._verified[name][:] = False
            self._all_verified.discard(name)
        self.verify_rows(name, np.array([0]), np.array([len(self.arrays[name])]))

    def _verify_block(self, name: str, block: int) -> None:
        rows_per_block, array = self._rows_per_block[name], self.arrays[name]
        start, stop = block * rows_per_block, min((block + 1) * rows_per_block, len(array))
        expected = self._crcs[name][_CRC_DIGITS * block : _CRC_DIGITS * (block + 1)]
        actual = f"{zlib.crc32(array[start:stop]):08x}"
        if actual != expected:
            row_bytes = array.itemsize * math.prod(array.shape[1:])
            offset = array.offset + start * row_bytes  # the memmap's offset in the file
            raise SafetensorsCorruptedError(
                f"Block {block} of tensor {name!r} in {self.path} (rows {start}:{stop}, file bytes "
                f"{offset}:{offset + (stop - start) * row_bytes}) fails its checksum (CRC-32 {actual}, written "
                f"{expected}): the file was damaged or modified after it was written."
            )
        self._verified[name][block] = True
