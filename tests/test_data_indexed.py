"""MMIDIDX v1 reader/builder: byte layout against the documented toy dataset, round trips, errors."""
import struct

import numpy as np
import pytest

from megaocto.data.indexed import (IndexedDatasetError, MMapIndexedDataset, MMapIndexedDatasetBuilder, best_dtype,
                                   dataset_prefix, merge_datasets, write_index)

# Reference §1.7: 3 documents of 4, 3 and 2 uint16 tokens, built with Megatron's own class.
TOY_HEADER_HEX = "4d4d4944494458" "0000" "0100000000000000" "08" "0300000000000000" "0400000000000000"


def _toy_idx_bytes():
    """The .idx assembled by hand from the documented layout (not via our writer)."""
    out = bytes.fromhex(TOY_HEADER_HEX)
    out += b"".join(struct.pack("<i", s) for s in (4, 3, 2))
    out += b"".join(struct.pack("<q", p) for p in (0, 8, 14))
    out += b"".join(struct.pack("<q", d) for d in (0, 1, 2, 3))
    return out


TOY_DOCS = [[1, 2, 3, 4], [5, 6, 7], [65535, 0]]


def test_toy_bytes_match_megatron_layout(tmp_path):
    expected_idx = _toy_idx_bytes()
    assert len(expected_idx) == 102
    b = MMapIndexedDatasetBuilder(str(tmp_path / "t.bin"), np.uint16)
    for doc in TOY_DOCS:
        b.add_item(doc)
        b.end_document()
    b.finalize(str(tmp_path / "t.idx"))
    assert (tmp_path / "t.idx").read_bytes() == expected_idx
    assert (tmp_path / "t.bin").read_bytes() == np.array(sum(TOY_DOCS, []), dtype="<u2").tobytes()
    assert (tmp_path / "t.bin").stat().st_size == 18


def test_reader_on_hand_built_files(tmp_path):
    (tmp_path / "h.idx").write_bytes(_toy_idx_bytes())
    (tmp_path / "h.bin").write_bytes(np.array(sum(TOY_DOCS, []), dtype="<u2").tobytes())
    ds = MMapIndexedDataset(str(tmp_path / "h"))
    assert MMapIndexedDataset.exists(str(tmp_path / "h")) and not MMapIndexedDataset.exists(str(tmp_path / "x"))
    assert len(ds) == 3 and ds.num_docs == 3 and ds.num_tokens == 9
    assert ds.dtype == np.uint16 and ds.dtype_code == 8
    assert ds.sizes.tolist() == [4, 3, 2] and ds.pointers.tolist() == [0, 8, 14] and ds.doc_idx.tolist() == [0, 1, 2, 3]
    for i, doc in enumerate(TOY_DOCS):
        assert ds[i].tolist() == doc
    assert ds.get(0, offset=1, length=2).tolist() == [2, 3]
    assert ds.get(1, offset=1).tolist() == [6, 7]
    assert ds[-1].tolist() == [65535, 0]
    assert [a.tolist() for a in ds[0:2]] == TOY_DOCS[:2]
    with pytest.raises(IndexError):
        ds.get(1, offset=2, length=5)
    with pytest.raises(IndexError):
        ds[3]


def test_round_trip_sentences_merge_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(0, 70000, size=rng.integers(0, 20)) for _ in range(rng.integers(1, 4))] for _ in range(30)]
    b = MMapIndexedDatasetBuilder(str(tmp_path / "a.bin"), best_dtype(70000))
    for sents in docs[:20]:
        b.add_document(np.concatenate(sents), lengths=[len(s) for s in sents])
    b.finalize(str(tmp_path / "a.idx"))
    b = MMapIndexedDatasetBuilder(str(tmp_path / "b.bin"), np.int32)
    for sents in docs[20:]:
        for s in sents:
            b.add_item(s.tolist())
        b.end_document()
    b.finalize(str(tmp_path / "b.idx"))
    ds = merge_datasets([str(tmp_path / "a"), str(tmp_path / "b.idx")], str(tmp_path / "m"))
    flat = [s for sents in docs for s in sents]
    assert ds.dtype == np.int32 and len(ds) == len(flat) and ds.num_docs == 30
    for i, s in enumerate(flat):
        assert ds[i].tolist() == s.tolist()
    for d, sents in enumerate(docs):
        assert ds.document(d).tolist() == np.concatenate(sents).tolist()
    assert ds.num_tokens == sum(len(s) for s in flat)
    # Merged idx equals one written in one go.
    write_index(str(tmp_path / "ref.idx"), np.int32, [len(s) for s in flat],
                np.cumsum([0] + [len(s) for s in docs]))
    assert (tmp_path / "ref.idx").read_bytes() == (tmp_path / "m.idx").read_bytes()
    assert best_dtype(49152) == np.uint16 and best_dtype(65500) == np.int32
    assert dataset_prefix("out/train", "inputs") == "out/train_inputs_document"


def test_builder_rejects_ids_that_do_not_fit(tmp_path):
    b = MMapIndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="do not fit"):
        b.add_item(np.array([1, 70000], dtype=np.int64))
    with pytest.raises(IndexedDatasetError):
        b.add_item(np.array([-1], dtype=np.int32))
    b.abort()


def _float_dataset(tmp_path, name, code, itemsize):
    data = np.arange(5, dtype="<f4" if itemsize == 4 else "<f8")
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, 2, 3)
    idx += struct.pack("<ii", 3, 2) + struct.pack("<qq", 0, 3 * itemsize) + struct.pack("<qqq", 0, 1, 2)
    (tmp_path / f"{name}.idx").write_bytes(idx)
    (tmp_path / f"{name}.bin").write_bytes(data.tobytes())
    return str(tmp_path / name)


def test_float_codes_legacy_and_nvidia_swap(tmp_path):
    legacy = MMapIndexedDataset(_float_dataset(tmp_path, "l6", 6, 4))
    assert legacy.dtype == np.float32 and legacy.dtype_convention == "legacy"
    swapped = MMapIndexedDataset(_float_dataset(tmp_path, "n6", 6, 8))  # core: 6 = float64
    assert swapped.dtype == np.float64 and swapped.dtype_convention == "nvidia-core"
    assert swapped[1].tolist() == [3.0, 4.0]
    swapped7 = MMapIndexedDataset(_float_dataset(tmp_path, "n7", 7, 4))  # core: 7 = float32
    assert swapped7.dtype == np.float32 and swapped7.dtype_convention == "nvidia-core"


def test_errors_name_the_file(tmp_path):
    good = _toy_idx_bytes()
    binb = np.array(sum(TOY_DOCS, []), dtype="<u2").tobytes()

    def make(name, idx, bin_=binb):
        (tmp_path / f"{name}.idx").write_bytes(idx)
        if bin_ is not None:
            (tmp_path / f"{name}.bin").write_bytes(bin_)
        return str(tmp_path / name)

    cases = {
        "magic": (make("magic", b"XXIDIDX\x00\x00" + good[9:]), "bad magic"),
        "version": (make("version", good[:9] + struct.pack("<Q", 2) + good[17:]), "version 2"),
        "trunc_idx": (make("trunc_idx", good[:90]), "truncated index"),
        "trunc_hdr": (make("trunc_hdr", good[:20]), "truncated header"),
        "trunc_bin": (make("trunc_bin", good, binb[:10]), "truncated data file"),
        "no_bin": (make("no_bin", good, None), "data file not found"),
        "code": (make("code", good[:17] + bytes([9]) + good[18:]), "unknown dtype code 9"),
        "extra": (make("extra", good + b"\x00" * 7), "corrupt"),
    }
    for name, (prefix, msg) in cases.items():
        with pytest.raises(IndexedDatasetError, match=msg) as e:
            MMapIndexedDataset(prefix)
        assert name in str(e.value), str(e.value)
    with pytest.raises(IndexedDatasetError, match="not found"):
        MMapIndexedDataset(str(tmp_path / "missing"))
    # megatron.core multimodal sequence_modes (N extra bytes) are accepted.
    assert len(MMapIndexedDataset(make("modes", good + b"\x00" * 3))) == 3


def test_empty_dataset(tmp_path):
    b = MMapIndexedDatasetBuilder(str(tmp_path / "e.bin"), np.uint16)
    b.finalize(str(tmp_path / "e.idx"))
    ds = MMapIndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.num_docs == 0 and ds.num_tokens == 0
    assert (tmp_path / "e.idx").stat().st_size == 34 + 8
