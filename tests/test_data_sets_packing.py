"""Packing invariants, splits, blending counts and FIM purity."""
import numpy as np
import pytest

from megaocto.data.blending import BlendedDataset, blended_num_samples
from megaocto.data.fim import FIM
from megaocto.data.packed import PackedDataset, kept_lengths, pack_order, packing_epoch_rows
from megaocto.data.splits import split_boundaries, split_ranges


class FakeIndexed:
    def __init__(self, prefix, docs):
        self.prefix, self.docs = prefix, [np.asarray(d, dtype=np.int64) for d in docs]
        self.sizes = np.array([len(d) for d in docs], dtype=np.int32)

    def get(self, i, offset=0, length=None):
        d = self.docs[i]
        return d[offset:] if length is None else d[offset:offset + length]


def make_pairs(tmp_path, n=60, seed=0, max_in=12, max_tgt=8):
    r = np.random.RandomState(seed)
    # example e: input tokens 1000+e (so rows can be traced back), target tokens 2000+e
    ins = [np.full(r.randint(1, max_in), 1000 + e) for e in range(n)]
    tgts = [np.full(r.randint(1, max_tgt), 2000 + e) for e in range(n)]
    return FakeIndexed(str(tmp_path / "sft_inputs_document"), ins), \
        FakeIndexed(str(tmp_path / "sft_targets_document"), tgts)


def test_packing_invariants(tmp_path):
    ins, tgts = make_pairs(tmp_path)
    ins.docs[3] = np.full(40, 1003)  # too long: truncated, counted
    ins.sizes[3] = 40
    tgts.docs[5], tgts.sizes[5] = np.zeros(0, np.int64), 0  # empty target: skipped, counted
    seq = 16
    ds = PackedDataset(ins, tgts, name="train", documents=(0, 50), num_samples=80, seq_length=seq, seed=1, pad_id=7)
    summ = ds.summary()
    assert summ["truncated_examples"] == 1 and summ["skipped_empty_targets"] == 1 and summ["examples"] == 49
    assert ds.built and len(ds) == 80 and summ["epochs"] >= 2
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        assert all(v.shape == (seq,) for v in s.values()) and s["segment_ids"].dtype == np.int64
        full = np.concatenate([s["input_ids"], s["labels"][-1:]])
        seg = s["segment_ids"]
        exs = ds.row_examples(i)
        assert seg.max() == len(exs) or (seg.max() == len(exs) - 1 and len(full[seg == 0]) == 0)
        for k, e in enumerate(exs.tolist(), start=1):
            seen.add(e)
            assert 0 <= e < 50 and e != 5
            where = np.flatnonzero(seg == k)
            if len(where) == 0:  # last example ends exactly at the row's extra (label-only) token
                continue
            assert np.all(np.diff(where) == 1)  # contiguous: no example split
            np.testing.assert_array_equal(s["position_ids"][where], np.arange(len(where)))
            assert set(full[where].tolist()) <= {1000 + e, 2000 + e}
            # loss exactly where the LABEL is a target token of the same example
            lab_tgt = (s["labels"][where] == 2000 + e)
            np.testing.assert_array_equal(s["loss_mask"][where] > 0, lab_tgt)
        pad = seg == 0
        assert np.all(s["loss_mask"][pad] == 0) and np.all(s["input_ids"][pad] == 7)
        assert np.all(np.diff(seg[~pad]) >= 0) and (not pad.any() or np.all(seg[np.argmax(pad):] == 0))
    assert seen == set(range(50)) - {5}
    # the truncated example keeps its input's head+tail and the whole target (rule in packed.py)
    ki, kt = kept_lengths(np.array([40]), np.array([tgts.sizes[3]]), seq + 1)
    assert ki[0] + kt[0] == seq + 1 and kt[0] == tgts.sizes[3]
    # cache reuse, and seq_length is part of the cache key
    again = PackedDataset(ins, tgts, name="train", documents=(0, 50), num_samples=80, seq_length=seq, seed=1,
                          pad_id=7, may_build=False)
    assert not again.built
    np.testing.assert_array_equal(again[3]["input_ids"], ds[3]["input_ids"])
    longer = PackedDataset(ins, tgts, name="train", documents=(0, 50), num_samples=80, seq_length=32, seed=1,
                           pad_id=7)
    assert longer.built


def test_packing_loss_options_and_split_range(tmp_path):
    ins, tgts = make_pairs(tmp_path, n=40, seed=3)
    common = dict(name="valid", documents=(30, 40), num_samples=12, seq_length=24, seed=2, pad_id=0)
    ds = PackedDataset(ins, tgts, **common, norm_target_loss=True)
    for i in range(len(ds)):
        s = ds[i]
        exs = ds.row_examples(i)
        assert all(30 <= e < 40 for e in exs.tolist())  # never documents outside the split (mtf bug)
        for k in range(1, s["segment_ids"].max() + 1):
            total = s["loss_mask"][s["segment_ids"] == k].sum()
            assert total == pytest.approx(1.0) or total == 0
    both = PackedDataset(ins, tgts, **common, loss_on_inputs=True, cache_dir=str(tmp_path / "c"))
    s = both[0]
    seg = s["segment_ids"]
    expect = (np.concatenate([seg[1:] == seg[:-1], [True]]) & (seg != 0))
    # last position: label is the row's extra token; same segment iff the row continues it
    np.testing.assert_array_equal(s["loss_mask"][:-1] > 0, expect[:-1])


def test_pack_order_carries_rows_over_epochs_and_epoch_rows():
    lengths = np.array([5, 5, 5, 5, 5])
    order, rows, epochs = pack_order(lengths, np.arange(5), 7, 11, seed=0)
    assert epochs == 3 and len(rows) - 1 == 7  # 15 examples, the 7th row closes in epoch 3
    # two examples per row (5+5 <= 11), including rows that straddle an epoch boundary
    assert np.all(np.diff(rows[:8]) == 2)
    assert packing_epoch_rows(np.full(5, 2), np.full(5, 3), (0, 5), 10, seed=0) == 3
    with pytest.raises(ValueError, match="no examples"):
        pack_order(lengths, np.arange(0), 1, 11, seed=0)


def test_splits_never_overlap():
    assert split_boundaries("98,2,0", 1000) == [0, 980, 1000, 1000]
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    r = np.random.RandomState(0)
    for _ in range(300):
        n = int(r.randint(0, 50))
        split = ",".join(str(int(x)) for x in r.randint(0, 5, size=3)) if r.rand() < 0.9 else "1"
        if split.replace(",", "").strip("0") == "":
            continue
        rng = split_ranges(split, n)
        covered = [d for s in ("train", "valid", "test") for d in range(*rng[s])]
        assert covered == list(range(n)), (split, n, rng)  # disjoint, ordered, complete


def test_blending_counts_and_sizes():
    assert blended_num_samples(1000, [0.3, 0.7]) == [302, 704]

    class Ds:
        def __init__(self, tag, n):
            self.tag, self.n = tag, n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            assert 0 <= i < self.n
            return (self.tag, i)

    sizes = blended_num_samples(500, [0.25, 0.75])
    blend = BlendedDataset([Ds("a", sizes[0]), Ds("b", sizes[1])], [1, 3], 500)
    items = [blend[i] for i in range(500)]
    assert sum(1 for t, _ in items if t == "a") == 125
    assert [i for t, i in items if t == "b"] == list(range(375))
    with pytest.raises(ValueError, match="blended dataset 0"):
        BlendedDataset([Ds("a", 10), Ds("b", 1000)], [1, 1], 500)


class CharTok:
    """Tiny tokenizer: one token per character (ids = ord + 10), FIM tokens 1..4."""
    special = {"<fim_prefix>": 1, "<fim_middle>": 2, "<fim_suffix>": 3, "<fim_pad>": 4}

    def encode(self, text):
        return [ord(c) + 10 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i >= 10)

    def token_to_id(self, t):
        return self.special.get(t)


def test_fim_pure_function_of_seed_and_index():
    tok = CharTok()
    fim = FIM.from_tokenizer(tok, rate=0.5, spm_rate=0.5, seed=9, eod=0)
    r = np.random.RandomState(0)
    text = np.array(tok.encode("abcdefghij") + [0] + tok.encode("klmnopq") + [0] + tok.encode("rstu"))
    outs = {i: fim.apply(text, i) for i in range(40)}
    permuted = 0
    for i in r.permutation(40):  # any order (any worker / DP layout) gives the same result
        out = fim.apply(text, int(i))
        np.testing.assert_array_equal(out, outs[int(i)])
        assert len(out) == len(text)
        permuted += int(not np.array_equal(out, text))
    assert 5 < permuted < 40
    other = FIM.from_tokenizer(tok, rate=0.5, spm_rate=0.5, seed=10, eod=0)
    assert any(not np.array_equal(other.apply(text, i), outs[i]) for i in range(40))
    # a permuted segment has the same characters once the FIM tokens are removed; PSM and SPM both occur
    orders = set()
    for i in range(40):
        out = outs[i]
        if 1 in out.tolist():
            first = out.tolist()[:out.tolist().index(0)] if 0 in out.tolist() else out.tolist()
            orders.add("spm" if first[1] == 3 else "psm")
    assert orders == {"psm", "spm"}
    always = FIM.from_tokenizer(tok, rate=1.0, spm_rate=0.0, seed=1, eod=None)
    out = always.apply(np.array(tok.encode("hello world")), 3)
    assert out[0] == 1 and len(out) == 11  # 3 FIM tokens added -> truncated to the exact length
    short = always.apply(np.array(tok.encode("ab") + [0, 0, 0, 0, 0]), 0)
    assert len(short) == 7


def test_fim_missing_tokens_error():
    class NoFim(CharTok):
        special = {"<fim_prefix>": 1}

    with pytest.raises(ValueError, match="<fim_middle>, <fim_suffix>, <fim_pad>"):
        FIM.from_tokenizer(NoFim(), rate=0.1, spm_rate=0.5, seed=0)


def test_truncated_commit_keeps_instruction_and_answer_cue(tmp_path):
    """A long commits-finetune example keeps its input's head (the subject) AND tail (the answer cue)."""
    import json

    from megaocto.data.indexed import MMapIndexedDataset
    from megaocto.data.packed import input_head_tail, truncated_input
    from megaocto.data.preprocess import PreprocessConfig, preprocess
    from megaocto.data.tokenizer import load_tokenizer
    from test_data_prep_tokenizer import train_tiny_tokenizer

    assert input_head_tail(7) == (4, 3) and input_head_tail(0) == (0, 0)
    np.testing.assert_array_equal(truncated_input(np.arange(10), 4), [0, 1, 8, 9])
    np.testing.assert_array_equal(truncated_input(np.arange(3), 5), [0, 1, 2])
    tok_path = train_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tok_path)
    old = "".join(f"x{i} = {i} * 2\n" for i in range(200))  # far longer than the row
    row = {"old_contents": old, "new_contents": old.replace("* 2", "* 3"), "subject": "Triple the values"}
    (tmp_path / "c.jsonl").write_text(json.dumps(row) + "\n")
    preprocess(PreprocessConfig(inputs=[str(tmp_path / "c.jsonl")], output_prefix=str(tmp_path / "ft"),
                                tokenizer=tok_path, format="commits-finetune", log_interval=0))
    ins = MMapIndexedDataset(str(tmp_path / "ft_inputs_document"))
    tgts = MMapIndexedDataset(str(tmp_path / "ft_targets_document"))
    seq = 96
    assert ins.sizes[0] > seq and tgts.sizes[0] > seq
    ds = PackedDataset(ins, tgts, name="train", documents=(0, 1), num_samples=2, seq_length=seq, seed=0,
                       pad_id=tok.pad, cache_dir=str(tmp_path / "cache"))
    assert ds.summary()["truncated_examples"] == 1
    assert ds.summary()["truncated_tokens"] == int(ins.sizes[0] + tgts.sizes[0]) - (seq + 1)
    s = ds[0]
    ki = int(ds.keep_in[0])
    tokens = np.concatenate([s["input_ids"], s["labels"][-1:]])
    prompt = tok.decode(tokens[:ki].tolist())
    assert prompt.startswith("Question: Triple the values\n")  # the instruction (head)
    assert prompt.endswith("99 * 2\n\n\nAnswer: ")  # the answer cue (tail)
    assert tok.decode(tokens[ki:].tolist()).startswith("x0 = 0 * 3\n")  # the target's start
    assert s["loss_mask"][ki - 1] == 1 and s["loss_mask"][:ki - 1].sum() == 0


def test_truncation_warning_names_the_dataset_pair(tmp_path, caplog):
    import logging
    ins, tgts = make_pairs(tmp_path)
    ins.docs[3], ins.sizes[3] = np.full(40, 1003), 40
    with caplog.at_level(logging.WARNING, logger="megaocto.data.packed"):
        PackedDataset(ins, tgts, name="train", documents=(0, 50), num_samples=8, seq_length=16, seed=1, pad_id=7)
    msg = caplog.records[-1].getMessage()
    assert msg.startswith(f"packed dataset {tmp_path / 'sft'} (sft_inputs_document + sft_targets_document), "
                          f"train split: 1 of 50 examples truncated"), msg


def _long_target_pairs(tmp_path, eod=0):
    """Example 2's target (ending in EOD like every preprocessed target) is far longer than a row."""
    ins, tgts = make_pairs(tmp_path, n=20, seed=4)
    for d in tgts.docs:
        d[-1] = eod
    tgts.docs[2] = np.concatenate([np.full(30, 2002), [eod]])
    tgts.sizes[2] = 31
    return ins, tgts


def test_truncated_target_keeps_its_end_of_document_token(tmp_path):
    """A cut target used to end mid-answer (its EOD cut off), teaching the model never to stop."""
    ins, tgts = _long_target_pairs(tmp_path)
    seq = 16
    ds = PackedDataset(ins, tgts, name="train", documents=(0, 20), num_samples=40, seq_length=seq, seed=1,
                       pad_id=7, eod_id=0)
    summ = ds.summary()
    assert summ["truncated_examples"] == 1 and summ["truncated_targets"] == 1 and summ["dropped_overlong_examples"] == 0
    assert summ["truncated_targets_without_eod"] == 0
    row = next(i for i in range(len(ds)) if 2 in ds.row_examples(i).tolist())
    s = ds[row]
    full = np.concatenate([s["input_ids"], s["labels"][-1:]])
    k = list(ds.row_examples(row)).index(2) + 1
    where = np.flatnonzero(np.concatenate([s["segment_ids"], s["segment_ids"][-1:]]) == k)
    ex = full[where]
    assert len(ex) == seq + 1 and ex[-1] == 0 and set(ex[:-1].tolist()) <= {1002, 2002}  # ... 2002, 2002, EOD
    assert s["labels"][-1] == 0 and s["loss_mask"][-1] == 1  # the EOD is a trained target token
    # a target that does not end with the EOD id (preprocessed with --no-append-eod) is cut as is, and counted
    plain = PackedDataset(ins, tgts, name="train", documents=(0, 20), num_samples=40, seq_length=seq, seed=1,
                          pad_id=7, eod_id=99, cache_dir=str(tmp_path / "plain"))
    assert plain.summary()["truncated_targets_without_eod"] == 1 and plain[row]["labels"][-1] == 2002
    # every other example keeps its whole target, EOD included
    for i in range(len(ds)):
        s = ds[i]
        for k, e in enumerate(ds.row_examples(i).tolist(), start=1):
            seg = np.concatenate([s["segment_ids"], [s["segment_ids"][-1]]])
            full = np.concatenate([s["input_ids"], s["labels"][-1:]])
            if e != 2 and (seg == k).any():
                assert full[seg == k][-1] == 0


def test_overlong_examples_can_be_dropped_and_are_counted(tmp_path, caplog):
    import logging

    ins, tgts = _long_target_pairs(tmp_path)
    with caplog.at_level(logging.WARNING, logger="megaocto.data.packed"):
        ds = PackedDataset(ins, tgts, name="train", documents=(0, 20), num_samples=30, seq_length=16, seed=1,
                           pad_id=7, eod_id=0, overlong="drop")
    summ = ds.summary()
    assert summ["dropped_overlong_examples"] == 1 and summ["truncated_examples"] == 0 and summ["examples"] == 19
    assert all(2 not in ds.row_examples(i).tolist() for i in range(len(ds)))
    assert "1 of 20 examples longer than seq_length+1=17 tokens dropped" in caplog.records[-1].getMessage()
    assert packing_epoch_rows(ins.sizes, tgts.sizes, (0, 20), 16, 1, "drop") <= \
        packing_epoch_rows(ins.sizes, tgts.sizes, (0, 20), 16, 1)
    truncating = PackedDataset(ins, tgts, name="train", documents=(0, 20), num_samples=30, seq_length=16, seed=1,
                               pad_id=7, eod_id=0)
    assert truncating.built  # the policy is part of the cache key
    with pytest.raises(ValueError, match="overlong"):
        PackedDataset(ins, tgts, name="train", documents=(0, 20), num_samples=3, seq_length=16, seed=1, pad_id=7,
                      overlong="skip")


def test_data_config_packed_overlong_reaches_the_dataset(tmp_path):
    from megaocto.config.base import ConfigError
    from megaocto.config.data import DataConfig
    from megaocto.data.build import build_datasets, epoch_num_samples
    from megaocto.data.indexed import MMapIndexedDatasetBuilder, dataset_prefix

    ins, tgts = _long_target_pairs(tmp_path)
    sft = str(tmp_path / "real")
    for key, src in (("inputs", ins), ("targets", tgts)):
        b = MMapIndexedDatasetBuilder(dataset_prefix(sft, key) + ".bin", np.uint16)
        for d in src.docs:
            b.add_document(d)
        b.finalize(dataset_prefix(sft, key) + ".idx")
    with pytest.raises(ConfigError, match="packed_overlong"):
        DataConfig(kind="packed", paths=[sft], pad_id=7, eod_id=0, packed_overlong="cut").validate()
    for policy in ("truncate", "drop"):
        cfg = DataConfig(kind="packed", paths=[sft], split="100,0,0", pad_id=7, eod_id=0, packed_overlong=policy,
                         cache_dir=str(tmp_path / "c"))
        train = build_datasets(cfg, seq_length=16, num_samples={"train": 10}, seed=1)["train"]
        summ = train.summary()
        expected = (1, 0) if policy == "drop" else (0, 1)
        assert (summ["dropped_overlong_examples"], summ["truncated_targets"]) == expected
        assert epoch_num_samples(cfg, seq_length=16, seed=1) == packing_epoch_rows(ins.sizes, tgts.sizes, (0, 20), 16,
                                                                                 1, policy)
