"""GPT index mappings vs a plain-Python transcription of Megatron (§1.8); C++ == numpy; caches."""
import os

import numpy as np
import pytest

from megaocto.data import index_helpers
from megaocto.data.gpt_dataset import (GPTDataset, build_index_mappings, get_index_mappings, index_cache_paths,
                                       separate_last_epoch)

needs_cpp = pytest.mark.skipif(index_helpers._cpp is None, reason="megaocto._helpers not compiled")


# ---- plain Python reference, written from the algorithm description -------------------------
def ref_mappings(documents, sizes, num_samples, seq_length, seed):
    tpe = sum(int(sizes[d]) for d in documents)
    epochs, total = 0, 0
    while True:
        epochs += 1
        total += tpe
        if (total - 1) // seq_length >= num_samples:
            break
    if epochs == 1:
        separate = False
    else:
        nse = ((epochs - 1) * tpe - 1) // seq_length
        separate = (num_samples - nse) < int(0.80 * ((tpe - 1) // seq_length))
    rng = np.random.RandomState(seed)

    def doc_idx_for(n):
        arr = np.array([d for _ in range(n) for d in documents], dtype=np.int32)
        rng.shuffle(arr)
        return list(arr)

    doc_idx = doc_idx_for(epochs - 1) + doc_idx_for(1) if separate else doc_idx_for(epochs)
    n = (epochs * tpe - 1) // seq_length
    sample_idx = ref_sample_idx(sizes, doc_idx, seq_length, n)
    k = ((epochs - 1) * tpe - 1) // seq_length if separate else n
    first = np.arange(k, dtype=np.uint32)
    rng.shuffle(first)
    shuffle = list(first)
    if k < n:
        last = np.arange(k, n, dtype=np.uint32)
        rng.shuffle(last)
        shuffle += list(last)
    return doc_idx, sample_idx, shuffle, separate


def ref_sample_idx(sizes, doc_idx, seq_length, n):
    sample_idx = [(0, 0)]
    di, off = 0, 0
    while len(sample_idx) <= n:
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[di]]) - off
            remaining -= length
            if remaining <= 0:
                off += remaining + length - 1
                remaining = 0
            else:
                di += 1
                off = 0
        sample_idx.append((di, off))
    return sample_idx


def ref_sample_tokens(docs_tokens, doc_idx, sample_idx, j):
    (d0, o0), (d1, o1) = sample_idx[j], sample_idx[j + 1]
    stream = []
    for k in range(d0, d1 + 1):
        toks = docs_tokens[doc_idx[k]]
        lo = o0 if k == d0 else 0
        hi = o1 + 1 if k == d1 else len(toks)
        stream += list(toks[lo:hi])
    return stream


@pytest.mark.parametrize("use_cpp", [False, pytest.param(True, marks=needs_cpp)])
def test_mappings_match_reference_both_epoch_regimes(use_cpp):
    regimes = set()
    for seed in range(6):
        r = np.random.RandomState(100 + seed)
        sizes = r.randint(1, 40, size=r.randint(5, 30)).astype(np.int32)
        lo = r.randint(0, 3)
        documents = np.arange(lo, len(sizes))
        seq = int(r.randint(3, 17))
        tpe = int(sizes[lo:].sum())
        per_epoch = (tpe - 1) // seq
        # 1 epoch, 2.1 epochs (separate last) and 2.95 epochs (not separate)
        for num_samples in (max(1, per_epoch // 2), int(per_epoch * 2.1), int(per_epoch * 2.95) + 1):
            doc_idx, sample_idx, shuffle_idx = build_index_mappings(documents, sizes, num_samples, seq, seed,
                                                                    use_cpp=use_cpp)
            rd, rs, rsh, sep = ref_mappings(list(documents), sizes, num_samples, seq, seed)
            regimes.add(sep)
            assert doc_idx.dtype == np.int32 and sample_idx.dtype == np.int32
            np.testing.assert_array_equal(doc_idx, rd)
            np.testing.assert_array_equal(sample_idx, np.array(rs))
            np.testing.assert_array_equal(shuffle_idx, rsh)
            assert shuffle_idx.dtype == np.uint32 and len(sample_idx) - 1 >= num_samples
            tpe_ = int(sizes[documents].sum())
            assert separate_last_epoch(tpe_, seq, num_samples, len(rd) // len(documents)) == sep
    assert regimes == {True, False}


@needs_cpp
def test_cpp_equals_numpy_on_random_sizes_with_empty_docs():
    for seed in range(4):
        r = np.random.RandomState(seed)
        sizes = r.randint(0, 300, size=2000).astype(np.int32)
        sizes[:3] = 0  # empty documents, one of them first: row 0 stays (0, 0) like Megatron's loop
        doc_idx = np.tile(np.arange(2000, dtype=np.int32), 2)
        r.shuffle(doc_idx)
        first = int(np.flatnonzero(doc_idx == 1)[0])
        doc_idx[[0, first]] = doc_idx[[first, 0]]
        tpe = int(sizes.sum())
        for seq in (1, 7, 128, 4096):
            a = index_helpers.build_sample_idx(sizes, doc_idx, seq, 2, tpe, use_cpp=True)
            b = index_helpers.build_sample_idx(sizes, doc_idx.astype(np.int64), seq, 2, tpe, use_cpp=False)
            np.testing.assert_array_equal(a, b)
            if seq == 128:
                np.testing.assert_array_equal(a, ref_sample_idx(sizes, doc_idx, seq, len(a) - 1))
    small = np.array([0, 3, 0, 4, 5], dtype=np.int32)
    docs = np.arange(5, dtype=np.int64)
    for use_cpp in (True, False):
        out = index_helpers.build_sample_idx(small, docs, 2, 1, 12, use_cpp=use_cpp)
        np.testing.assert_array_equal(out, ref_sample_idx(small, docs, 2, 5))
        with pytest.raises(ValueError, match="fewer tokens"):
            index_helpers.build_sample_idx(small, docs[:3], 2, 1, 12, use_cpp=use_cpp)


@pytest.mark.parametrize("use_cpp", [False, pytest.param(True, marks=needs_cpp)])
def test_blending_greedy_rule(use_cpp):
    for weights in ([0.5, 0.5], [0.2, 0.3, 0.5], [0.7, 0.1, 0.1, 0.1], [1.0]):
        d, s = index_helpers.build_blending_indices(weights, 997, use_cpp=use_cpp)
        count = [0] * len(weights)
        for t in range(997):
            errs = [w * max(t, 1) - c for w, c in zip(weights, count)]
            best = errs.index(max(errs))  # first max = lowest index on ties
            assert d[t] == best and s[t] == count[best]
            count[best] += 1
        assert d.dtype == np.uint8 and s.dtype == np.int64
        np.testing.assert_allclose(np.bincount(d, minlength=len(weights)) / 997, weights, atol=2 / 997)


def test_cache_names_change_with_every_parameter(tmp_path):
    sizes = np.array([5, 6, 7, 8], dtype=np.int32)
    base = dict(data_prefix=str(tmp_path / "ds_text_document"), name="train", documents=(0, 4), sizes=sizes,
                num_samples=10, seq_length=4, seed=1)
    ref = index_cache_paths(**base)["shuffle_idx"]
    assert os.path.dirname(ref) == str(tmp_path)
    variants = dict(name="valid", documents=(0, 3), num_samples=11, seq_length=5, seed=2,
                    sizes=np.array([5, 6, 7, 9], dtype=np.int32), data_prefix=str(tmp_path / "other"))
    for k, v in variants.items():
        assert index_cache_paths(**{**base, k: v})["shuffle_idx"] != ref, k
    other_dir = index_cache_paths(**base, cache_dir=str(tmp_path / "cache"))["shuffle_idx"]
    assert os.path.dirname(other_dir) == str(tmp_path / "cache")


class FakeIndexed:
    def __init__(self, prefix, docs):
        self.prefix, self.docs = prefix, [np.asarray(d) for d in docs]
        self.sizes = np.array([len(d) for d in docs], dtype=np.int32)

    def get(self, i, offset=0, length=None):
        d = self.docs[i]
        return d[offset:] if length is None else d[offset:offset + length]


def test_gpt_dataset_samples_cache_and_wait(tmp_path):
    r = np.random.RandomState(0)
    docs = [r.randint(1, 1000, size=r.randint(1, 30)) for _ in range(40)]
    ind = FakeIndexed(str(tmp_path / "c_text_document"), docs)
    ds = GPTDataset(ind, name="train", documents=(5, 40), num_samples=90, seq_length=8, seed=3, eod=0)
    assert ds.built and len(ds) == 90
    rd, rs, rsh, _ = ref_mappings(list(range(5, 40)), ind.sizes, 90, 8, 3)
    for i in (0, 1, 17, 89):
        want = ref_sample_tokens(docs, rd, rs, int(rsh[i]))
        assert len(want) == 9
        np.testing.assert_array_equal(ds.text(i), want)
        s = ds[i]
        np.testing.assert_array_equal(s["input_ids"], want[:-1])
        np.testing.assert_array_equal(s["labels"], want[1:])
    again = GPTDataset(ind, name="train", documents=(5, 40), num_samples=90, seq_length=8, seed=3, eod=0,
                       may_build=False)
    assert not again.built and again.summary()["documents"] == 35
    np.testing.assert_array_equal(again.text(5), ds.text(5))
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]
    with pytest.raises(TimeoutError, match="build-index"):
        get_index_mappings(ind.prefix, "valid", (0, 5), ind.sizes, 3, 8, 3, may_build=False, wait_timeout_s=0)
    with pytest.raises(ValueError, match="document range"):
        GPTDataset(ind, name="test", documents=(40, 40), num_samples=1, seq_length=8, seed=3)


def _concurrent_worker(prefix, sizes, may_build, queue):
    doc_idx, sample_idx, shuffle_idx, built = get_index_mappings(prefix, "train", (0, len(sizes)), sizes, 5000, 16,
                                                                 11, may_build=may_build, wait_timeout_s=60)
    queue.put((may_build, built, np.asarray(sample_idx).tobytes() + np.asarray(shuffle_idx).tobytes()))


def test_concurrent_builders_and_waiter_agree(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    sizes = np.random.RandomState(0).randint(1, 200, size=3000).astype(np.int32)
    q = ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(str(tmp_path / "d"), sizes, mb, q))
             for mb in (False, True, True)]
    for p in procs:
        p.start()
    results = [q.get(timeout=90) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len({r[2] for r in results}) == 1
    assert [r[1] for r in results if not r[0]] == [False]
    assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]
    ref = build_index_mappings(np.arange(3000), sizes, 5000, 16, 11)
    assert results[0][2] == ref[1].tobytes() + ref[2].tobytes()


def test_fallback_when_extension_missing(monkeypatch):
    monkeypatch.setattr(index_helpers, "_cpp", None)
    assert not index_helpers.cpp_available()
    sizes = np.array([3, 4, 5], dtype=np.int32)
    out = index_helpers.build_sample_idx(sizes, np.arange(3), 2, 1, 12)
    np.testing.assert_array_equal(out, ref_sample_idx(sizes, [0, 1, 2], 2, 5))
    with pytest.raises(RuntimeError, match="not compiled"):
        index_helpers.build_sample_idx(sizes, np.arange(3), 2, 1, 12, use_cpp=True)
