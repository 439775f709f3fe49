"""Megatron ``MMIDIDX`` v1 indexed datasets (``.bin`` + ``.idx``), byte-compatible with Megatron-LM.

This module is the one owner of the on-disk format. Layout of ``P.idx`` (little-endian, no padding)::

    0   9    magic    b"MMIDIDX\\x00\\x00"
    9   8    version  <Q = 1
    17  1    dtype    <B  legacy code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float32, 7 float64, 8 uint16)
    18  8    N        <Q  number of sequences
    26  8    D        <Q  len(doc_idx) = documents + 1
    34  4N   sizes    int32   tokens per sequence
        8N   pointers int64   byte offset of each sequence in P.bin
        8D   doc_idx  int64   0, then the sequence count at each end_document()

``P.bin`` is the plain concatenation of every sequence's tokens. NVIDIA megatron.core swaps the float codes
(6 float64, 7 float32); the reader accepts that only when the pointers / ``.bin`` size prove which is meant.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
from array import array
from typing import Iterable

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = 34

# Legacy megatron/data/indexed_dataset.py codes (what bigcode Megatron-LM reads and writes).
DTYPES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                           6: np.float32, 7: np.float64, 8: np.uint16}
# megatron/core/datasets/indexed_dataset.py DType enum: float codes swapped.
_NVIDIA_CORE_SWAP = {6: np.float64, 7: np.float32}


class IndexedDatasetError(ValueError):
    """A ``.bin``/``.idx`` pair is missing, malformed or inconsistent (the message names the file)."""


def dtype_code(dtype) -> int:
    """Legacy Megatron dtype code for a numpy dtype."""
    dt = np.dtype(dtype)
    for code, t in DTYPES.items():
        if np.dtype(t) == dt:
            return code
    raise IndexedDatasetError(f"dtype {dt} cannot be stored in an MMIDIDX dataset; use one of "
                              f"{sorted(np.dtype(t).name for t in DTYPES.values())}")


def best_dtype(vocab_size: int | None) -> type:
    """Token dtype Megatron picks: uint16 when ``vocab_size < 65500``, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def dataset_prefix(output_prefix: str, key: str, level: str = "document") -> str:
    """Megatron output naming: ``{output_prefix}_{key}_{level}`` (e.g. ``train_inputs_document``)."""
    return f"{output_prefix}_{key}_{level}"


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))


def _strip_prefix(path: str) -> str:
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def read_index_header(idx_path: str) -> tuple[int, int, int]:
    """``(dtype_code, N, D)`` from an ``.idx`` header, validating magic, version and length."""
    try:
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise IndexedDatasetError(f"{idx_path}: index file not found") from None
    if head[:len(MAGIC)] != MAGIC:
        if head[:8] == b"TNTIDX\x00\x00":
            raise IndexedDatasetError(f"{idx_path}: legacy 'cached'/'lazy' TNTIDX index; re-run preprocessing with "
                                      f"the mmap format (megaocto preprocess writes it)")
        raise IndexedDatasetError(f"{idx_path}: bad magic {head[:9]!r}, expected {MAGIC!r} (not a Megatron mmap index)")
    if len(head) < HEADER_SIZE:
        raise IndexedDatasetError(f"{idx_path}: truncated header ({len(head)} of {HEADER_SIZE} bytes)")
    (version,) = struct.unpack("<Q", head[9:17])
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path}: unsupported index version {version} (only version 1 is defined)")
    code = head[17]
    n, d = struct.unpack("<QQ", head[18:34])
    if code not in DTYPES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
    expected = HEADER_SIZE + 12 * n + 8 * d
    if size < expected:
        raise IndexedDatasetError(f"{idx_path}: truncated index: {size} bytes, header says N={n}, D={d} "
                                  f"which needs {expected} bytes")
    # megatron.core may append sequence_modes (int8 * N) for multimodal data; anything else is corruption.
    if size not in (expected, expected + n):
        raise IndexedDatasetError(f"{idx_path}: index is {size} bytes but N={n}, D={d} implies {expected} "
                                  f"(or {expected + n} with sequence modes); the file is corrupt")
    return code, n, d


class MMapIndexedDataset:
    """Read-only view of ``prefix.bin/.idx`` (np.memmap; nothing is loaded eagerly).

    ``ds[i]`` is sequence ``i`` as a numpy array; ``ds.get(i, offset, length)`` a slice of it.
    ``sizes``/``pointers``/``doc_idx`` are the raw index arrays (views into the mmapped ``.idx``).
    """

    def __init__(self, prefix: str):
        self.prefix = _strip_prefix(prefix)
        idx_path, bin_path = index_file_path(self.prefix), data_file_path(self.prefix)
        code, n, d = read_index_header(idx_path)
        self._idx = np.memmap(idx_path, mode="r", dtype=np.uint8)
        off = HEADER_SIZE
        self.sizes = np.frombuffer(self._idx, dtype=np.int32, count=n, offset=off)
        off += 4 * n
        self.pointers = np.frombuffer(self._idx, dtype=np.int64, count=n, offset=off)
        off += 8 * n
        self.doc_idx = np.frombuffer(self._idx, dtype=np.int64, count=d, offset=off)
        if not os.path.isfile(bin_path):
            raise IndexedDatasetError(f"{bin_path}: data file not found (index {idx_path} exists)")
        bin_size = os.path.getsize(bin_path)
        self.dtype_code = code
        self.dtype_convention = "legacy"
        self.dtype = self._resolve_dtype(code, bin_size, idx_path)
        self._validate(n, d, bin_size, idx_path, bin_path)
        itemsize = np.dtype(self.dtype).itemsize
        if bin_size:
            self._bin = np.memmap(bin_path, mode="r", dtype=self.dtype, shape=(bin_size // itemsize,))
        else:  # np.memmap cannot map an empty file
            self._bin = np.empty(0, dtype=self.dtype)

    def _resolve_dtype(self, code: int, bin_size: int, idx_path: str):
        if code not in _NVIDIA_CORE_SWAP:
            return DTYPES[code]
        # Float code: legacy (6=float32, 7=float64) unless the byte offsets prove the NVIDIA-core swap.
        itemsize = None
        nz = np.flatnonzero(self.sizes)
        if len(nz):
            first = int(nz[0])
            end = int(self.pointers[first + 1]) if first + 1 < len(self.sizes) else bin_size
            itemsize = (end - int(self.pointers[first])) / int(self.sizes[first])
        legacy, swapped = DTYPES[code], _NVIDIA_CORE_SWAP[code]
        if itemsize is None or itemsize == np.dtype(legacy).itemsize:
            return legacy
        if itemsize == np.dtype(swapped).itemsize:
            self.dtype_convention = "nvidia-core"
            return swapped
        raise IndexedDatasetError(f"{idx_path}: dtype code {code} but pointers imply {itemsize} bytes per element")

    def _validate(self, n: int, d: int, bin_size: int, idx_path: str, bin_path: str) -> None:
        if d < 1 or self.doc_idx[0] != 0:
            raise IndexedDatasetError(f"{idx_path}: doc_idx must start with 0 (D={d})")
        if d > 1 and (np.any(np.diff(self.doc_idx) < 0) or self.doc_idx[-1] > n):
            raise IndexedDatasetError(f"{idx_path}: doc_idx is not a non-decreasing list of sequence indices <= N={n}")
        if self.doc_idx[-1] != n:
            raise IndexedDatasetError(f"{idx_path}: doc_idx ends at {int(self.doc_idx[-1])} but there are {n} "
                                      f"sequences (the writer did not call end_document() after its last item)")
        if n and np.any(self.sizes < 0):
            raise IndexedDatasetError(f"{idx_path}: negative sequence size")
        itemsize = np.dtype(self.dtype).itemsize
        needed = int(self.pointers[-1]) + int(self.sizes[-1]) * itemsize if n else 0
        if bin_size < needed:
            raise IndexedDatasetError(f"{bin_path}: truncated data file: {bin_size} bytes, index needs {needed}")
        if bin_size % itemsize:
            raise IndexedDatasetError(f"{bin_path}: size {bin_size} is not a multiple of the {itemsize}-byte dtype")

    @staticmethod
    def exists(prefix: str) -> bool:
        """Both ``prefix.bin`` and ``prefix.idx`` exist (Megatron's ``MMapIndexedDataset.exists``)."""
        return dataset_exists(_strip_prefix(prefix))

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_docs(self) -> int:
        return len(self.doc_idx) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self[i] for i in range(*idx.indices(len(self)))]
        return self.get(int(idx))

    def get(self, idx: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``idx`` (a read-only view into the mmap)."""
        n = len(self.sizes)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"sequence {idx} out of range for {self.prefix} ({n} sequences)")
        size = int(self.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset + length}) out of range for sequence {idx} of size {size}")
        start = int(self.pointers[idx]) // np.dtype(self.dtype).itemsize + offset
        return self._bin[start:start + length]

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document ``doc`` (its sequences concatenated)."""
        lo, hi = int(self.doc_idx[doc]), int(self.doc_idx[doc + 1])
        if hi == lo:
            return np.empty(0, dtype=self.dtype)
        itemsize = np.dtype(self.dtype).itemsize
        start = int(self.pointers[lo]) // itemsize
        end = int(self.pointers[hi - 1]) // itemsize + int(self.sizes[hi - 1])
        return self._bin[start:end]

    def __repr__(self) -> str:
        return (f"MMapIndexedDataset({self.prefix!r}, sequences={len(self)}, docs={self.num_docs}, "
                f"tokens={self.num_tokens}, dtype={np.dtype(self.dtype).name})")


def write_index(idx_path: str, dtype, sizes, doc_idx) -> None:
    """Write an ``.idx`` for a ``.bin`` that holds ``sizes`` sequences back to back."""
    sizes = np.asarray(sizes, dtype=np.int32)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", dtype_code(dtype)))
        f.write(struct.pack("<QQ", len(sizes), len(doc_idx)))
        f.write(sizes.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(doc_idx.astype("<i8").tobytes(order="C"))


class MMapIndexedDatasetBuilder:
    """Streaming writer: tokens go straight to ``bin_path``; ``finalize(idx_path)`` writes the index.

    ``add_item(tokens)`` appends one sequence, ``end_document()`` closes a document,
    ``add_document(tokens)`` does both. Memory is 12 bytes per sequence, independent of token count.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._bounds = (int(info.min), int(info.max)) if info else None
        self._file = open(bin_path, "wb")
        self._sizes = array("q")
        self._doc_idx = array("q", [0])

    def _as_array(self, tokens) -> np.ndarray:
        if hasattr(tokens, "detach"):  # torch tensor
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            if arr.size and self._bounds and arr.dtype.kind in "iub":
                lo, hi = int(arr.min()), int(arr.max())
                if lo < self._bounds[0] or hi > self._bounds[1]:
                    raise IndexedDatasetError(f"{self.bin_path}: token ids in [{lo}, {hi}] do not fit {self.dtype}; "
                                              f"use int32 (best_dtype(vocab_size) picks it for vocab >= 65500)")
            arr = arr.astype(self.dtype)
        return arr.reshape(-1)

    def add_item(self, tokens) -> None:
        arr = self._as_array(tokens)
        self._file.write(arr.tobytes(order="C"))
        self._sizes.append(arr.size)

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens, lengths: Iterable[int] | None = None) -> None:
        """Append one document; ``lengths`` splits it into several sequences (sentences)."""
        arr = self._as_array(tokens)
        self._file.write(arr.tobytes(order="C"))
        if lengths is None:
            self._sizes.append(arr.size)
        else:
            lengths = list(lengths)
            if sum(lengths) != arr.size:
                raise IndexedDatasetError(f"{self.bin_path}: lengths sum to {sum(lengths)} but the document has "
                                          f"{arr.size} tokens")
            self._sizes.extend(lengths)
        self.end_document()

    def merge_file_(self, prefix: str) -> None:
        """Append another dataset (same dtype): its tokens, sequences and documents."""
        prefix = _strip_prefix(prefix)
        other = MMapIndexedDataset(prefix)
        if np.dtype(other.dtype) != self.dtype:
            raise IndexedDatasetError(f"{index_file_path(prefix)}: dtype {np.dtype(other.dtype)} differs from the "
                                      f"builder's {self.dtype}; all merged datasets must share one dtype")
        offset = len(self._sizes)
        self._sizes.frombytes(other.sizes.astype(np.int64).tobytes())
        self._doc_idx.frombytes((other.doc_idx[1:] + offset).astype(np.int64).tobytes())
        nbytes = int(other.pointers[-1]) + int(other.sizes[-1]) * self.dtype.itemsize if len(other) else 0
        del other
        with open(data_file_path(prefix), "rb") as src:
            _copy_bytes(src, self._file, nbytes)

    @property
    def num_sequences(self) -> int:
        return len(self._sizes)

    @property
    def num_docs(self) -> int:
        return len(self._doc_idx) - 1

    def finalize(self, idx_path: str) -> None:
        self._file.close()
        write_index(idx_path, self.dtype, np.frombuffer(self._sizes, dtype=np.int64) if self._sizes else [],
                    np.frombuffer(self._doc_idx, dtype=np.int64))

    def abort(self) -> None:
        """Close and delete the partial ``.bin`` (on error)."""
        self._file.close()
        if os.path.exists(self.bin_path):
            os.remove(self.bin_path)


def _copy_bytes(src, dst, nbytes: int, chunk: int = 16 << 20) -> None:
    left = nbytes
    while left > 0:
        buf = src.read(min(chunk, left))
        if not buf:
            raise IndexedDatasetError(f"{getattr(src, 'name', '?')}: ended {left} bytes early")
        dst.write(buf)
        left -= len(buf)


def merge_datasets(prefixes: list[str], output_prefix: str) -> MMapIndexedDataset:
    """Concatenate datasets (documents in the given order) into ``output_prefix.bin/.idx``."""
    if not prefixes:
        raise IndexedDatasetError("merge_datasets: no input datasets given")
    first = MMapIndexedDataset(prefixes[0])
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    builder = MMapIndexedDatasetBuilder(data_file_path(output_prefix), first.dtype)
    del first
    try:
        for p in prefixes:
            builder.merge_file_(p)
    except BaseException:
        builder.abort()
        raise
    builder.finalize(index_file_path(output_prefix))
    return MMapIndexedDataset(output_prefix)


def remove_dataset(prefix: str) -> None:
    for path in (data_file_path(prefix), index_file_path(prefix)):
        if os.path.exists(path):
            os.remove(path)


def move_dataset(src_prefix: str, dst_prefix: str) -> None:
    for f in (data_file_path, index_file_path):
        shutil.move(f(src_prefix), f(dst_prefix))


_SHARD_NAME = re.compile(r"^(\d+)_(.+)_document$")


def natural_key(name: str) -> list:
    """Sort key that orders digit runs numerically ('9_x' before '10_x'; zero-padded names are unaffected)."""
    return [(0, int(p), p) if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _directory_groups(directory: str, pattern: str) -> dict[str | None, list[str]]:
    """A directory's datasets matching ``pattern``, grouped by output key.

    Shard names ``{index}_{key}_document`` (``preprocess --no-join``) group exactly by key, in numeric index
    order. Other names form one group (key None), in natural order; if one prefix P appears with several keys
    (``P_inputs_document`` and ``P_targets_document``) that is an error: pass --pattern '*_KEY_document.idx'.
    """
    import glob

    found = [_strip_prefix(f) for f in glob.glob(os.path.join(directory, pattern))]
    if not found:
        raise IndexedDatasetError(f"{directory}: no datasets matching {pattern!r}")
    groups: dict[str | None, list[tuple]] = {}
    others = []
    for prefix in found:
        m = _SHARD_NAME.match(os.path.basename(prefix))
        if m:
            groups.setdefault(m.group(2), []).append((int(m.group(1)), prefix))
        else:
            others.append(prefix)
    if groups and others:
        raise IndexedDatasetError(
            f"{directory}: {pattern!r} matches preprocess shards (keys {', '.join(sorted(groups))}) and other "
            f"datasets ({', '.join(sorted(os.path.basename(o) for o in others)[:5])}); narrow --pattern")
    if others:
        by_prefix: dict[str, set] = {}
        for prefix in others:
            m = re.match(r"^(.+)_([^_]+)_document$", os.path.basename(prefix))
            if m:
                by_prefix.setdefault(m.group(1), set()).add(m.group(2))
        mixed = {p: k for p, k in by_prefix.items() if len(k) > 1}
        if mixed:
            p, k = sorted(mixed.items())[0]
            raise IndexedDatasetError(
                f"{directory}: {pattern!r} matches datasets of several keys ({', '.join(sorted(k))} of {p}); "
                f"merging them into one dataset would mix e.g. inputs and targets. Merge one key at a time with "
                f"--pattern '*_KEY_document.idx'")
        return {None: sorted(others, key=lambda p: natural_key(os.path.basename(p)))}
    return {k: [p for _, p in sorted(v)] for k, v in sorted(groups.items())}


def resolve_dataset_groups(inputs: list[str], pattern: str = "*.idx") -> dict[str | None, list[str]]:
    """Dataset prefixes from prefixes / ``.idx``/``.bin`` paths / directories, grouped by output key.

    Returns {None: prefixes} for a single dataset stream, or {key: prefixes} when directories hold
    ``preprocess --no-join`` shards of several keys (e.g. ``inputs`` and ``targets``); every directory must then
    hold the same keys, and no plain prefix may be mixed in. Order: inputs in the given order, each directory's
    datasets numerically (shards) or naturally sorted.
    """
    parts: list[dict[str | None, list[str]]] = []
    for item in inputs:
        if os.path.isdir(item):
            parts.append(_directory_groups(item, pattern))
        else:
            parts.append({None: [_strip_prefix(item)]})
    keyed = [set(p) for p in parts if None not in p]
    if not keyed or (all(len(k) == 1 for k in keyed) and len(set.union(*keyed)) == 1):
        return {None: [x for p in parts for v in p.values() for x in v]}
    keys = keyed[0]
    if len(keyed) != len(parts) or any(k != keys for k in keyed):
        raise IndexedDatasetError(
            f"inputs hold datasets of different keys ({'; '.join(', '.join(sorted(map(str, p))) for p in parts)}); "
            f"every input directory must hold the same keys, or pass --pattern '*_KEY_document.idx'")
    return {k: [x for p in parts for x in p[k]] for k in sorted(keys)}


def resolve_dataset_inputs(inputs: list[str], pattern: str = "*.idx") -> list[str]:
    """Prefixes of a single dataset stream (see :func:`resolve_dataset_groups`); several keys are an error."""
    groups = resolve_dataset_groups(inputs, pattern)
    if len(groups) > 1:
        raise IndexedDatasetError(f"inputs hold datasets of several keys ({', '.join(sorted(groups))}); "
                                  f"merge each key separately with --pattern '*_KEY_document.idx'")
    return next(iter(groups.values()))
