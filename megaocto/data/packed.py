"""Packed instruction-tuning samples from paired P_inputs_document / P_targets_document datasets.

Row i of the inputs dataset pairs with row i of the targets dataset. Each epoch shuffles the
split's examples with RandomState(seed) (one shuffle per epoch, in order) and packs them greedily:
an example joins the current row while the row's tokens stay <= seq_length + 1, else the row is
closed and the example opens the next one; a partly filled row carries over the epoch boundary
(Megatron mtf). Unlike Megatron the split's document range is respected, the cache name includes
seq_length, and over-long examples (len(input) + len(target) > seq_length + 1) are by default truncated (and
counted), not skipped; ``overlong="drop"`` leaves them out instead (counted too), as Megatron does:

    Truncation rule (L = seq_length + 1): an example with len(input) + len(target) > L keeps
    k = min(len(input), max(L − len(target), L // 2)) input tokens and L − k target tokens.
    The k input tokens are the input's HEAD and TAIL with the middle cut out: the first h = k − k // 2
    and the last t = k // 2 tokens (input_head_tail). Prompts put the instruction at the head
    (commits-finetune "Question: {subject}\n{old}...", qa, magicoder) and the answer cue at the tail
    ("\n\nAnswer: ", "@@ Response\n"), so both survive; keeping only the tail would drop the
    instruction of every long commit. An input that fits is kept whole (h + t = len(input)).
    A cut target keeps its first L − k − 1 tokens and then its end-of-document token (when it ends with
    ``eod_id``, as preprocessed targets do), so the model still learns to stop (truncated_targets counts them).

    ``overlong="head"`` is Magicoder's rule instead (its train.py truncates ``input_ids`` and ``labels`` to
    ``max_training_seq_length``): an example longer than seq_length tokens keeps its first seq_length tokens —
    the input's head, then as much of the target's head as fits (no EOD kept; a prompt of seq_length tokens or
    more keeps no target token at all and the example carries no loss, as in Magicoder). Counted as well.

Examples with an empty target carry no training signal and are left out; their count is reported.

``packing=False`` puts one example per row (Magicoder's batching: no packing, right padding — the padding of a
row is masked out of attention and loss, so padding to seq_length equals padding to the batch maximum); each
epoch is still one shuffle of the split's examples, every example its own row.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from megaocto.data.index_helpers import cached_arrays

log = logging.getLogger(__name__)
PACKING_VERSION = 1
OVERLONG = ("truncate", "drop", "head")  # what happens to an example longer than a row (data.packed_overlong)


def example_limit(row_len: int, overlong: str = "truncate") -> int:
    """Most tokens an example keeps: the row (seq_length + 1), or seq_length for Magicoder's ``head`` rule."""
    return row_len - 1 if overlong == "head" else row_len


def kept_lengths(len_in: np.ndarray, len_tgt: np.ndarray, row_len: int,
                 overlong: str = "truncate") -> tuple[np.ndarray, np.ndarray]:
    """(input tokens kept, target tokens kept) per example under the truncation rule (``overlong``)."""
    len_in, len_tgt = np.asarray(len_in, np.int64), np.asarray(len_tgt, np.int64)
    if overlong == "head":
        limit = example_limit(row_len, overlong)
        keep_in = np.minimum(len_in, limit)
        return keep_in, np.minimum(len_tgt, limit - keep_in)
    keep_in = np.minimum(len_in, np.maximum(row_len - len_tgt, row_len // 2))
    keep_tgt = np.minimum(len_tgt, row_len - keep_in)
    return keep_in, keep_tgt


def input_head_tail(keep_in: int) -> tuple[int, int]:
    """(h, t): a kept input of keep_in tokens is input[:h] followed by input[len(input) - t:]."""
    keep_in = int(keep_in)
    return keep_in - keep_in // 2, keep_in // 2


def truncated_target(tokens: np.ndarray, keep_tgt: int, eod_id: int | None) -> np.ndarray:
    """The kept target tokens: all when it fits; else its first keep_tgt − 1 tokens and its final EOD (when the
    target ends with ``eod_id``; without one, its first keep_tgt tokens)."""
    tokens = np.asarray(tokens)
    if keep_tgt >= len(tokens):
        return tokens
    if keep_tgt > 0 and eod_id is not None and int(tokens[-1]) == eod_id:
        return np.concatenate([tokens[:keep_tgt - 1], tokens[-1:]])
    return tokens[:keep_tgt]


def overlong_examples(len_in: np.ndarray, len_tgt: np.ndarray, row_len: int, overlong: str = "truncate") -> np.ndarray:
    """Mask of the examples longer than an example may be (a row; seq_length for ``head``)."""
    return np.asarray(len_in, np.int64) + np.asarray(len_tgt, np.int64) > example_limit(row_len, overlong)


def truncated_input(tokens: np.ndarray, keep_in: int, overlong: str = "truncate") -> np.ndarray:
    """The kept input tokens under the truncation rule: head and tail, middle cut (whole when it fits); the head
    only for ``head``."""
    tokens = np.asarray(tokens)
    if keep_in >= len(tokens):
        return tokens
    if overlong == "head":
        return tokens[:keep_in]
    h, t = input_head_tail(keep_in)
    return np.concatenate([tokens[:h], tokens[len(tokens) - t:]])


def pack_order(lengths: np.ndarray, examples: np.ndarray, num_rows: int, row_len: int, seed: int,
               max_epochs: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy packing over per-epoch shuffles of `examples` (ids into `lengths`).

    Returns (order, rows, epochs): order = the concatenated shuffles (example ids); row r holds
    order[rows[r]:rows[r+1]]. Stops once num_rows rows are closed, or after max_epochs epochs (then
    the last partial row is closed too).
    """
    if len(examples) == 0:
        raise ValueError("no examples to pack (the split's document range is empty or every target is empty)")
    rng = np.random.RandomState(seed)
    chunks, bounds = [], [0]
    fill, pos, epochs = 0, 0, 0
    while len(bounds) - 1 < num_rows and (max_epochs is None or epochs < max_epochs):
        perm = np.array(examples, dtype=np.int64)
        rng.shuffle(perm)
        epochs += 1
        for n in lengths[perm].tolist():
            if fill + n > row_len:
                bounds.append(pos)
                fill = 0
            fill += n
            pos += 1
        chunks.append(perm)
    if max_epochs is not None and fill > 0:
        bounds.append(pos)
    return np.concatenate(chunks), np.asarray(bounds, dtype=np.int64), epochs


def packed_cache_paths(data_prefix: str, name: str, documents: tuple[int, int], len_in: np.ndarray,
                       len_tgt: np.ndarray, num_samples: int, seq_length: int, seed: int,
                       cache_dir: str = "", overlong: str = "truncate", packing: bool = True) -> dict[str, str]:
    import hashlib

    h = hashlib.blake2b(digest_size=6)
    h.update(f"packed-v{PACKING_VERSION}:{len(len_in)}:".encode())
    if overlong != "truncate":  # the default keeps the cache names it always had
        h.update(f"overlong={overlong}:".encode())
    if not packing:
        h.update(b"one-per-row:")
    h.update(np.ascontiguousarray(len_in, np.int32).tobytes())
    h.update(np.ascontiguousarray(len_tgt, np.int32).tobytes())
    directory = cache_dir or os.path.dirname(os.path.abspath(data_prefix))
    stem = (f"{os.path.basename(data_prefix)}_{name}_packed_{int(num_samples)}ns_{int(seq_length)}sl_{int(seed)}s_"
            f"{int(documents[0])}-{int(documents[1])}docs_{h.hexdigest()}")
    return {k: os.path.join(directory, f"{stem}_{k}.npy") for k in ("order", "rows")}


def pair_name(inputs_prefix: str, targets_prefix: str, data_prefix: str | None = None) -> str:
    """The (inputs, targets) pair as the user configured it: ``P (P_inputs_document + P_targets_document)``."""
    if data_prefix is None:
        ins, tgt = os.path.basename(inputs_prefix), os.path.basename(targets_prefix)
        common = os.path.commonprefix([inputs_prefix, targets_prefix])
        stripped = common.rstrip("_")
        data_prefix = stripped if ins.endswith("inputs_document") and tgt.endswith("targets_document") and stripped \
            else None
    if data_prefix is None:
        return f"{inputs_prefix} + {targets_prefix}"
    return f"{data_prefix} ({os.path.basename(inputs_prefix)} + {os.path.basename(targets_prefix)})"


class PackedDataset:
    """Rows of packed (input, target) examples in the design.md sample format with segment_ids (one example
    per row with ``packing=False``).

    `inputs` / `targets` need `prefix`, `sizes` and `get(i)` (MMapIndexedDataset). Loss is on target
    tokens only (or on every token of an example after its first with loss_on_inputs); with
    norm_target_loss each example's mask sums to 1 so every example weighs the same. ``overlong`` says what
    happens to an example longer than a row: ``truncate`` (the rule above; a cut target keeps its final
    ``eod_id``) or ``drop``; both are counted in ``summary()`` and logged.
    """

    def __init__(self, inputs, targets, *, name: str, documents: tuple[int, int], num_samples: int,
                 seq_length: int, seed: int, pad_id: int, loss_on_inputs: bool = False,
                 norm_target_loss: bool = False, cache_dir: str = "", may_build: bool = True,
                 data_prefix: str | None = None, eod_id: int | None = None, overlong: str = "truncate",
                 packing: bool = True):
        if len(inputs.sizes) != len(targets.sizes):
            raise ValueError(f"{inputs.prefix} has {len(inputs.sizes)} rows but {targets.prefix} has "
                             f"{len(targets.sizes)}; inputs and targets must pair row by row (re-run preprocessing)")
        start, end = int(documents[0]), int(documents[1])
        if not 0 <= start < end <= len(inputs.sizes):
            raise ValueError(f"{inputs.prefix}: {name} document range [{start}, {end}) is empty or outside the "
                             f"{len(inputs.sizes)} examples; change data.split or add data")
        if overlong not in OVERLONG:
            raise ValueError(f"overlong must be one of {OVERLONG} (data.packed_overlong), got {overlong!r}")
        self.inputs, self.targets, self.name, self.documents = inputs, targets, name, (start, end)
        self.eod_id, self.overlong, self.packing = (None if eod_id is None else int(eod_id)), overlong, bool(packing)
        self.num_samples, self.seq_length, self.seed = int(num_samples), int(seq_length), int(seed)
        self.pad_id, self.loss_on_inputs, self.norm_target_loss = int(pad_id), loss_on_inputs, norm_target_loss
        self.row_len = self.seq_length + 1
        len_in = np.asarray(inputs.sizes, np.int64)
        len_tgt = np.asarray(targets.sizes, np.int64)
        self.keep_in, self.keep_tgt = kept_lengths(len_in, len_tgt, self.row_len, overlong)
        limit = example_limit(self.row_len, overlong)
        docs = np.arange(start, end, dtype=np.int64)
        empty = len_tgt[docs] == 0
        long = overlong_examples(len_in[docs], len_tgt[docs], self.row_len, overlong) & ~empty
        dropped = long if overlong == "drop" else np.zeros_like(long)
        truncated = long & ~dropped
        self.examples = docs[~empty & ~dropped]
        cut = docs[truncated & (self.keep_tgt[docs] < len_tgt[docs])]
        cut_without_eod = sum(1 for ex in cut.tolist()
                              if self.eod_id is None or int(targets.get(int(ex))[-1]) != self.eod_id)
        self.stats = {"documents": int(end - start), "examples": int(len(self.examples)),
                      "skipped_empty_targets": int(empty.sum()), "truncated_examples": int(truncated.sum()),
                      "truncated_tokens": int((len_in[docs] + len_tgt[docs] - limit)[truncated].sum()),
                      "truncated_targets": int(len(cut)), "truncated_targets_without_eod": int(cut_without_eod),
                      "dropped_overlong_examples": int(dropped.sum()),
                      "truncated_to_no_target": int((truncated & (self.keep_tgt[docs] == 0)).sum())}
        if truncated.any() or dropped.any() or empty.any():
            what = (f"{self.stats['dropped_overlong_examples']} of {end - start} examples longer than "
                    f"seq_length+1={self.row_len} tokens dropped (data.packed_overlong=drop)" if overlong == "drop"
                    else f"{self.stats['truncated_examples']} of {end - start} examples truncated to their first "
                         f"seq_length={limit} tokens (data.packed_overlong=head, Magicoder's rule; "
                         f"{self.stats['truncated_tokens']} tokens cut; {self.stats['truncated_to_no_target']} keep "
                         f"no target token and carry no loss)" if overlong == "head"
                    else f"{self.stats['truncated_examples']} of {end - start} examples truncated to "
                         f"seq_length+1={self.row_len} tokens ({self.stats['truncated_tokens']} tokens cut; "
                         f"{self.stats['truncated_targets']} targets cut, each keeping its end-of-document token"
                         + (f" except {cut_without_eod} that do not end with one" if cut_without_eod else "") + ")")
            log.warning("packed dataset %s, %s split: %s, %d skipped with an empty target",
                        pair_name(inputs.prefix, targets.prefix, data_prefix), name, what,
                        self.stats["skipped_empty_targets"])
        if len(self.examples) == 0 and dropped.any():
            raise ValueError(f"{pair_name(inputs.prefix, targets.prefix, data_prefix)}: every example of the {name} "
                             f"split is longer than seq_length+1={self.row_len} tokens and data.packed_overlong=drop "
                             f"drops them; raise seq_length or use data.packed_overlong=truncate")
        # packing=False: every example "fills" a row, so the greedy packer closes a row after each one
        lengths = self.keep_in + self.keep_tgt if self.packing else np.full(len(len_in), self.row_len, np.int64)
        paths = packed_cache_paths(data_prefix or inputs.prefix, name, self.documents, len_in, len_tgt,
                                   self.num_samples, self.seq_length, self.seed, cache_dir, overlong, self.packing)

        def build():
            order, rows, _ = pack_order(lengths, self.examples, self.num_samples, self.row_len, self.seed)
            return {"order": order, "rows": rows}

        arrays, self.built = cached_arrays(paths, build, may_build=may_build)
        self.order, self.rows = arrays["order"], arrays["rows"]
        self.epochs = -(-int(self.rows[self.num_samples]) // len(self.examples)) if self.num_samples else 0

    def __len__(self) -> int:
        return self.num_samples

    def row_examples(self, idx: int) -> np.ndarray:
        return np.asarray(self.order[int(self.rows[idx]):int(self.rows[idx + 1])])

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"row {idx} out of range for {self.inputs.prefix} {self.name} ({self.num_samples})")
        L = self.row_len
        tokens = np.full(L, self.pad_id, dtype=np.int64)
        seg = np.zeros(L, dtype=np.int64)
        pos = np.zeros(L, dtype=np.int64)
        is_target = np.zeros(L, dtype=bool)
        at = 0
        for k, ex in enumerate(self.row_examples(idx).tolist(), start=1):
            ki, kt = int(self.keep_in[ex]), int(self.keep_tgt[ex])
            if ki:
                tokens[at:at + ki] = truncated_input(self.inputs.get(ex), ki, self.overlong)
            tokens[at + ki:at + ki + kt] = truncated_target(self.targets.get(ex), kt,
                                                            None if self.overlong == "head" else self.eod_id)
            seg[at:at + ki + kt] = k
            pos[at:at + ki + kt] = np.arange(ki + kt)
            is_target[at + ki:at + ki + kt] = True
            at += ki + kt
        same = (seg[1:] == seg[:-1]) & (seg[:-1] != 0)  # label j is the next token of the same example
        mask = same if self.loss_on_inputs else same & is_target[1:]
        loss_mask = mask.astype(np.float32)
        if self.norm_target_loss:
            counts = np.bincount(seg[:-1], weights=loss_mask, minlength=seg.max() + 1)
            denom = counts[seg[:-1]]
            loss_mask = np.where(denom > 0, loss_mask / np.maximum(denom, 1), 0).astype(np.float32)
        return {"input_ids": tokens[:-1], "labels": tokens[1:].copy(), "loss_mask": loss_mask,
                "position_ids": pos[:-1], "segment_ids": seg[:-1]}

    def summary(self) -> dict:
        used = int(self.rows[self.num_samples]) if self.num_samples else 0
        return {"kind": "packed" if self.packing else "one_example_per_row", "prefix": self.inputs.prefix,
                "split": self.name,
                "document_range": list(self.documents), **self.stats, "rows": self.num_samples,
                "epochs": self.epochs, "examples_per_row": used / max(self.num_samples, 1),
                "index_built_here": self.built}


def packing_epoch_rows(inputs_sizes: np.ndarray, targets_sizes: np.ndarray, documents: tuple[int, int],
                       seq_length: int, seed: int, overlong: str = "truncate", packing: bool = True) -> int:
    """Rows produced by packing one epoch of the document range (the last partial row included); with
    packing=False one row per kept example."""
    keep_in, keep_tgt = kept_lengths(inputs_sizes, targets_sizes, seq_length + 1, overlong)
    docs = np.arange(int(documents[0]), int(documents[1]), dtype=np.int64)
    keep = np.asarray(targets_sizes)[docs] > 0
    if overlong == "drop":
        keep &= ~overlong_examples(np.asarray(inputs_sizes)[docs], np.asarray(targets_sizes)[docs], seq_length + 1)
    docs = docs[keep]
    if not packing:
        return int(len(docs))
    _, rows, _ = pack_order(keep_in + keep_tgt, docs, 1 << 62, seq_length + 1, seed, max_epochs=1)
    return len(rows) - 1
