"""Sample-index and blending-index builders: C++ (megaocto._helpers) with identical numpy fallbacks.

Set MEGAOCTO_NO_CPP_HELPERS=1 to force the numpy path.
"""
from __future__ import annotations

import os
import time
import uuid
from typing import Callable

import numpy as np

try:
    from megaocto import _helpers as _cpp
except ImportError:  # not compiled (no C++ compiler at install time)
    _cpp = None


def cpp_available() -> bool:
    return _cpp is not None and os.environ.get("MEGAOCTO_NO_CPP_HELPERS", "0") != "1"


def _want_cpp(use_cpp: bool | None) -> bool:
    if use_cpp and _cpp is None:
        raise RuntimeError("megaocto._helpers is not compiled; run `pip install -e .` with a C++ compiler "
                           "or pass use_cpp=None to use the numpy fallback")
    return cpp_available() if use_cpp is None else bool(use_cpp)


def _narrow(idx: np.ndarray) -> np.ndarray:
    """int32 like Megatron when every value fits, else int64."""
    if idx.size == 0 or int(idx.max()) < np.iinfo(np.int32).max:
        return idx.astype(np.int32)
    return idx


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int,
                     tokens_per_epoch: int, *, use_cpp: bool | None = None) -> np.ndarray:
    """Megatron's sample_idx [n+1, 2]: (index into doc_idx, offset) where sample i starts.

    n = (num_epochs·tokens_per_epoch − 1) // seq_length; each sample spans seq_length+1 tokens and
    consecutive samples share one token.
    """
    num_samples = (int(num_epochs) * int(tokens_per_epoch) - 1) // int(seq_length)
    if _want_cpp(use_cpp):
        sizes_c = np.ascontiguousarray(sizes if sizes.dtype in (np.int32, np.int64) else sizes.astype(np.int64))
        doc_c = np.ascontiguousarray(doc_idx if doc_idx.dtype in (np.int32, np.int64) else doc_idx.astype(np.int64))
        out = np.empty((num_samples + 1, 2), dtype=np.int64)
        _cpp.build_sample_idx(sizes_c, doc_c, int(seq_length), int(num_epochs), int(tokens_per_epoch), out)
        return _narrow(out)
    return _narrow(_sample_idx_numpy(sizes, doc_idx, seq_length, num_samples))


def _sample_idx_numpy(sizes, doc_idx, seq_length, num_samples) -> np.ndarray:
    # Sample s (s >= 1) starts at global token s·seq_length of the doc_idx stream, inside the
    # document whose cumulative end exceeds it (zero-length documents are skipped, as in the loop).
    cum = np.cumsum(np.asarray(sizes, dtype=np.int64)[np.asarray(doc_idx)], dtype=np.int64)
    starts = np.arange(1, num_samples + 1, dtype=np.int64) * int(seq_length)
    if num_samples and starts[-1] >= (cum[-1] if cum.size else 0):
        raise ValueError("doc_idx holds fewer tokens than num_epochs * tokens_per_epoch")
    which = np.searchsorted(cum, starts, side="right")
    before = np.where(which > 0, cum[np.maximum(which - 1, 0)], 0)
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    out[1:, 0] = which
    out[1:, 1] = starts - before
    return out


def build_blending_indices(weights, size: int, *, use_cpp: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: (dataset_index uint8[size], dataset_sample_index int64[size])."""
    w = np.ascontiguousarray(np.asarray(weights, dtype=np.float64))
    if not 1 <= w.size <= 255:
        raise ValueError(f"blending needs 1 to 255 datasets (got {w.size})")
    dataset_index = np.zeros(int(size), dtype=np.uint8)
    sample_index = np.zeros(int(size), dtype=np.int64)
    if _want_cpp(use_cpp):
        _cpp.build_blending_indices(w, dataset_index, sample_index)
        return dataset_index, sample_index
    wl = [float(x) for x in w]
    count = [0] * len(wl)
    pick_d, pick_s = [0] * int(size), [0] * int(size)
    for t in range(int(size)):
        tt = float(max(t, 1))
        best, best_err = 0, wl[0] * tt - count[0]
        for i in range(1, len(wl)):
            e = wl[i] * tt - count[i]
            if e > best_err:
                best, best_err = i, e
        pick_d[t], pick_s[t] = best, count[best]
        count[best] += 1
    dataset_index[:] = pick_d
    sample_index[:] = pick_s
    return dataset_index, sample_index


def save_atomic(path: str, array: np.ndarray) -> None:
    """np.save to a private temp file, then rename: readers never see a partial file."""
    tmp = f"{path}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cached_arrays(paths: dict[str, str], build: Callable[[], dict], *, may_build: bool = True,
                  wait_timeout_s: float = 3600.0) -> tuple[dict[str, np.ndarray], bool]:
    """Load {key: .npy path} (memory-mapped) or build + save them atomically; returns (arrays, built).

    With may_build=False the caller waits (polling) for another process, e.g. local rank 0 or a
    `megaocto build-index` run, to write them. Concurrent builders are safe: writes are atomic and
    the content is deterministic.
    """
    built = False
    if not all(os.path.isfile(p) for p in paths.values()):
        if may_build:
            arrays = build()
            first = next(iter(paths.values()))
            try:
                os.makedirs(os.path.dirname(first) or ".", exist_ok=True)
                for key, path in paths.items():
                    save_atomic(path, arrays[key])
            except OSError as e:
                raise OSError(f"cannot write index cache {first}: {e}; set data.cache_dir to a writable "
                              f"directory") from e
            built = True
        else:
            deadline = time.monotonic() + wait_timeout_s
            while not all(os.path.isfile(p) for p in paths.values()):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"index cache {next(iter(paths.values()))} (and siblings) did not appear "
                                       f"within {wait_timeout_s:.0f}s; prebuild it with `megaocto build-index`")
                time.sleep(0.5)
    return {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}, built
