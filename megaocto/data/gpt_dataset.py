"""GPT pretraining samples: Megatron's index mappings (doc / sample / shuffle) over an indexed dataset."""
from __future__ import annotations

import os

import numpy as np


def text_to_sample(text: np.ndarray, eod: int | None, *, eod_mask_loss: bool = False,
                   reset_position_ids: bool = False) -> dict[str, np.ndarray]:
    """seq_length+1 tokens -> the design.md sample dict (Megatron get_batch semantics).

    `eod_mask_loss` zeroes the loss where the INPUT token is EOD; `reset_position_ids` restarts
    positions at 0 after every EOD input token.
    """
    text = np.asarray(text, dtype=np.int64)
    tokens, labels = text[:-1].copy(), text[1:].copy()
    n = tokens.shape[0]
    loss_mask = np.ones(n, dtype=np.float32)
    position_ids = np.arange(n, dtype=np.int64)
    if eod is not None and (eod_mask_loss or reset_position_ids):
        is_eod = tokens == eod
        if eod_mask_loss:
            loss_mask[is_eod] = 0.0
        if reset_position_ids:
            # start of the segment containing j = (index of the last EOD before j) + 1
            starts = np.where(is_eod, position_ids + 1, 0)
            starts = np.maximum.accumulate(np.concatenate([[0], starts[:-1]]))
            position_ids = position_ids - starts
    return {"input_ids": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


# ---------------------------------------------------------------------------------------------
# Index mappings (Megatron gpt_dataset.py §1.8). RandomState(seed) is consumed in this order:
# doc_idx shuffle(s) (all-but-last epochs, then the last), then shuffle_idx shuffle(s).

def num_epochs_for(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Smallest e with (e·tokens_per_epoch − 1) // seq_length >= num_samples."""
    if tokens_per_epoch <= 1:
        raise ValueError(f"the document range holds {tokens_per_epoch} tokens; at least 2 are needed "
                         f"to form a sample")
    epochs = max(1, -(-(int(num_samples) * int(seq_length) + 1) // int(tokens_per_epoch)))
    while epochs > 1 and ((epochs - 1) * tokens_per_epoch - 1) // seq_length >= num_samples:
        epochs -= 1
    while (epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        epochs += 1
    return epochs


def separate_last_epoch(tokens_per_epoch: int, seq_length: int, num_samples: int, num_epochs: int) -> bool:
    """Megatron's 0.80 rule: shuffle the last epoch separately when it is used for < 80% of its samples."""
    if num_epochs == 1:
        return False
    from_full = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    last = num_samples - from_full
    per_epoch = (tokens_per_epoch - 1) // seq_length
    return last < int(0.80 * per_epoch)


def build_doc_idx(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                  separate_last: bool) -> np.ndarray:
    if not separate_last or num_epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_doc_idx(documents, num_epochs - 1, rng, False)
    last = build_doc_idx(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_shuffle_idx(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """arange(num_samples) shuffled, then arange(num_samples, total_size) shuffled (uint32 or int64)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_index_mappings(documents: np.ndarray, sizes: np.ndarray, num_samples: int, seq_length: int, seed: int,
                         *, use_cpp: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc_idx, sample_idx, shuffle_idx) exactly as Megatron builds them for these inputs."""
    from megaocto.data.index_helpers import build_sample_idx

    documents = np.asarray(documents)
    tokens_per_epoch = int(np.sum(np.asarray(sizes)[documents], dtype=np.int64))
    num_epochs = num_epochs_for(tokens_per_epoch, seq_length, num_samples)
    separate = separate_last_epoch(tokens_per_epoch, seq_length, num_samples, num_epochs)
    rng = np.random.RandomState(seed)
    doc_idx = build_doc_idx(documents, num_epochs, rng, separate)
    sample_idx = build_sample_idx(np.asarray(sizes), doc_idx, seq_length, num_epochs, tokens_per_epoch,
                                  use_cpp=use_cpp)
    total = sample_idx.shape[0] - 1
    first = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length if separate else total
    shuffle_idx = build_shuffle_idx(first, total, rng)
    return doc_idx, sample_idx, shuffle_idx


# ---------------------------------------------------------------------------------------------
# Cache: .npy files whose names include every parameter that changes them, written atomically.

MAPPING_VERSION = 1
_KINDS = ("doc_idx", "sample_idx", "shuffle_idx")


def sizes_digest(sizes: np.ndarray) -> str:
    """Short hash of a dataset's sequence sizes (changes when the data changes)."""
    import hashlib

    h = hashlib.blake2b(digest_size=6)
    h.update(f"v{MAPPING_VERSION}:{len(sizes)}:".encode())
    h.update(np.ascontiguousarray(sizes, dtype=np.int32).tobytes())
    return h.hexdigest()


def index_cache_paths(data_prefix: str, name: str, documents: tuple[int, int], sizes: np.ndarray, num_samples: int,
                      seq_length: int, seed: int, cache_dir: str = "") -> dict[str, str]:
    """{'doc_idx'|'sample_idx'|'shuffle_idx': path}; beside the data unless `cache_dir` is set."""
    directory = cache_dir or os.path.dirname(os.path.abspath(data_prefix))
    stem = (f"{os.path.basename(data_prefix)}_{name}_indexmap_{int(num_samples)}ns_{int(seq_length)}sl_"
            f"{int(seed)}s_{int(documents[0])}-{int(documents[1])}docs_{sizes_digest(sizes)}")
    return {k: os.path.join(directory, f"{stem}_{k}.npy") for k in _KINDS}


def get_index_mappings(data_prefix: str, name: str, documents: tuple[int, int], sizes: np.ndarray, num_samples: int,
                       seq_length: int, seed: int, *, cache_dir: str = "", may_build: bool = True,
                       wait_timeout_s: float = 3600.0, use_cpp: bool | None = None):
    """Load the cached mappings, or build + save them (may_build), or wait for another process to.

    Returns (doc_idx, sample_idx, shuffle_idx, built). Pass may_build=(local_rank == 0) so one process
    per node builds (concurrent builders are also safe: the content is deterministic, writes atomic).
    """
    from megaocto.data.index_helpers import cached_arrays

    paths = index_cache_paths(data_prefix, name, documents, sizes, num_samples, seq_length, seed, cache_dir)

    def build():
        docs = np.arange(int(documents[0]), int(documents[1]), dtype=np.int64)
        return dict(zip(_KINDS, build_index_mappings(docs, sizes, num_samples, seq_length, seed, use_cpp=use_cpp)))

    arrays, built = cached_arrays(paths, build, may_build=may_build, wait_timeout_s=wait_timeout_s)
    return (*(arrays[k] for k in _KINDS), built)


class GPTDataset:
    """Megatron GPT samples over documents [start, end) of one indexed dataset.

    `indexed` needs `prefix`, `sizes` and `get(i, offset, length)` (MMapIndexedDataset). Item i is
    sample shuffle_idx[i] (seq_length+1 tokens, optionally FIM-permuted) as a design.md sample dict.
    """

    def __init__(self, indexed, *, name: str, documents: tuple[int, int], num_samples: int, seq_length: int,
                 seed: int, eod: int | None = None, eod_mask_loss: bool = False, reset_position_ids: bool = False,
                 fim=None, cache_dir: str = "", may_build: bool = True, use_cpp: bool | None = None):
        start, end = int(documents[0]), int(documents[1])
        if not 0 <= start < end <= len(indexed.sizes):
            raise ValueError(f"{indexed.prefix}: {name} document range [{start}, {end}) is empty or outside the "
                             f"{len(indexed.sizes)} documents; change data.split or add data")
        self.indexed, self.name, self.documents = indexed, name, (start, end)
        self.num_samples, self.seq_length, self.seed = int(num_samples), int(seq_length), int(seed)
        self.eod, self.eod_mask_loss, self.reset_position_ids = eod, eod_mask_loss, reset_position_ids
        self.fim = fim
        self.doc_idx, self.sample_idx, self.shuffle_idx, self.built = get_index_mappings(
            indexed.prefix, name, self.documents, indexed.sizes, self.num_samples, self.seq_length, self.seed,
            cache_dir=cache_dir, may_build=may_build, use_cpp=use_cpp)
        self.tokens_per_epoch = int(np.sum(indexed.sizes[start:end], dtype=np.int64))
        self.num_epochs = num_epochs_for(self.tokens_per_epoch, self.seq_length, self.num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def text(self, idx: int) -> np.ndarray:
        """The raw seq_length+1 tokens of item idx (before FIM)."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.indexed.prefix} {self.name} ({self.num_samples})")
        j = int(self.shuffle_idx[idx])
        d0, o0 = (int(x) for x in self.sample_idx[j])
        d1, o1 = (int(x) for x in self.sample_idx[j + 1])
        get = self.indexed.get
        if d0 == d1:
            return np.asarray(get(int(self.doc_idx[d0]), o0, o1 - o0 + 1), dtype=np.int64)
        parts = [get(int(self.doc_idx[d0]), o0)]
        parts += [get(int(self.doc_idx[k])) for k in range(d0 + 1, d1)]
        parts.append(get(int(self.doc_idx[d1]), 0, o1 + 1))
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        text = self.text(int(idx))
        if self.fim is not None:
            text = self.fim.apply(text, int(idx))
        sample = text_to_sample(text, self.eod, eod_mask_loss=self.eod_mask_loss,
                                reset_position_ids=self.reset_position_ids)
        if self.fim is not None and self.fim.pad_id is not None:
            sample["loss_mask"][sample["labels"] == self.fim.pad_id] = 0.0
        return sample

    def summary(self) -> dict:
        return {"kind": "gpt", "prefix": self.indexed.prefix, "split": self.name,
                "documents": self.documents[1] - self.documents[0], "document_range": list(self.documents),
                "tokens_per_epoch": self.tokens_per_epoch, "epochs": self.num_epochs, "samples": self.num_samples,
                "index_built_here": self.built}
