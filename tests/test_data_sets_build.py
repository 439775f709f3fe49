"""build_datasets / epoch_num_samples / build-index on real .bin/.idx files."""
import numpy as np
import pytest

from megaocto.config.data import DataConfig
from megaocto.data.blending import BlendedDataset
from megaocto.data.build import build_datasets, epoch_num_samples, prebuild_indices
from megaocto.data.indexed import MMapIndexedDatasetBuilder, dataset_prefix


def write_indexed(prefix, docs, dtype=np.uint16):
    b = MMapIndexedDatasetBuilder(prefix + ".bin", dtype)
    for d in docs:
        b.add_document(np.asarray(d))
    b.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megaocto.data.tokenizer import load_tokenizer, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(60)]
    tok_path = str(root / "tokenizer.json")
    train_bpe_tokenizer(texts, 300, tok_path, min_frequency=1)
    tok = load_tokenizer(tok_path)
    a = write_indexed(str(root / "a_text_document"), [tok.encode(t) + [tok.eod] for t in texts[:40]])
    b = write_indexed(str(root / "b_text_document"), [tok.encode(t) + [tok.eod] for t in texts[40:]])
    r = np.random.RandomState(0)
    sft = str(root / "sft")
    write_indexed(dataset_prefix(sft, "inputs"), [np.full(r.randint(1, 9), 100 + i) for i in range(50)])
    write_indexed(dataset_prefix(sft, "targets"), [np.full(r.randint(1, 6), 200 + i) for i in range(50)])
    return {"tok": tok_path, "a": a, "b": b, "sft": sft, "eod": tok.eod}


def test_gpt_blend_splits_and_fim(corpus, tmp_path):
    cfg = DataConfig(kind="gpt", paths=[corpus["a"], corpus["b"]], weights=[1, 3], split="80,20,0",
                     tokenizer=corpus["tok"], fim_rate=0.5, eod_mask_loss=True, cache_dir=str(tmp_path / "cache"))
    ds = build_datasets(cfg, seq_length=32, num_samples={"train": 120, "valid": 20, "test": 5}, seed=7)
    assert ds["test"] is None  # the split gives test no documents
    train, valid = ds["train"], ds["valid"]
    assert isinstance(train, BlendedDataset) and len(train) == 120 and len(valid) == 20
    assert train.summary()["samples_per_dataset"] == [30, 90]
    for part, n_docs in zip(train.datasets, (40, 20)):
        split_end = part.documents[1]
        assert part.documents == (0, round(0.8 * n_docs))
        assert np.all(np.asarray(part.doc_idx) < split_end)  # train never reads valid documents
    for part, n_docs in zip(valid.datasets, (40, 20)):
        assert part.documents == (round(0.8 * n_docs), n_docs)
        assert np.all(np.asarray(part.doc_idx) >= part.documents[0])
    fim_prefix = 1  # StarCoder order: <fim_prefix> is id 1
    n_fim = 0
    for i in range(len(train)):
        s = train[i]
        assert s["input_ids"].shape == (32,) and s["loss_mask"].dtype == np.float32
        assert np.all(s["loss_mask"][s["input_ids"] == corpus["eod"]] == 0)
        n_fim += int(fim_prefix in s["input_ids"])
    assert n_fim > 10
    # FIM draws depend on the split: train and valid of the same path use different salts, so sample i of
    # each does not share its FIM decisions
    for tp, vp in zip(train.datasets, valid.datasets):
        assert tp.fim.salt != vp.fim.salt
        text = np.arange(100, 140)
        assert any(not np.array_equal(tp.fim.apply(text, i), vp.fim.apply(text, i)) for i in range(8))
    again = build_datasets(cfg, seq_length=32, num_samples={"train": 120, "valid": 20}, seed=7, may_build=False)
    for i in (0, 5, 119):
        np.testing.assert_array_equal(again["train"][i]["input_ids"], train[i]["input_ids"])
    tokens = sum(int(np.sum(p.indexed.sizes[slice(*p.documents)])) for p in train.datasets)
    assert epoch_num_samples(cfg, seq_length=32, seed=7) == (tokens - 1) // 32


def test_packed_build_and_prebuild_ranks(corpus, tmp_path):
    cfg = DataConfig(kind="packed", paths=[corpus["sft"]], split="90,10", eod_id=0, pad_id=3,
                     cache_dir=str(tmp_path / "c"))
    counts = {"train": 30, "valid": 4}
    r0 = prebuild_indices(cfg, seq_length=16, num_samples=counts, seed=1, rank=0, world_size=2)
    r1 = prebuild_indices(cfg, seq_length=16, num_samples=counts, seed=1, rank=1, world_size=2)
    assert [s["split"] for s in r0] == ["train"] and [s["split"] for s in r1] == ["valid"]
    assert r0[0]["index_built_here"] and r0[0]["document_range"] == [0, 45]
    ds = build_datasets(cfg, seq_length=16, num_samples=counts, seed=1, may_build=False)
    assert not ds["train"].built and not ds["valid"].built and ds["test"] is None
    s = ds["valid"][0]
    assert set(s) == {"input_ids", "labels", "loss_mask", "position_ids", "segment_ids"}
    assert np.all((s["input_ids"] >= 145) & (s["input_ids"] < 150) | (s["input_ids"] >= 245) |
                  (s["segment_ids"] == 0))  # valid rows only hold documents 45..49
    rows = epoch_num_samples(cfg, seq_length=16, seed=1)
    assert 0 < rows <= 45 and ds["train"].summary()["truncated_examples"] == 0


def test_build_index_command(corpus, tmp_path, capsys):
    from megaocto.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{preset: tiny-bigcode}}\n"
                   f"data: {{kind: gpt, paths: [{corpus['a']}], split: '90,10,0', eod_id: 0, "
                   f"cache_dir: {tmp_path / 'cache'}}}\n"
                   f"train: {{iters: 3, micro_batch_size: 2}}\n")
    assert main(["build-index", "--config", str(cfg), "--dp", "2", "--valid-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 dataset(s) indexed" in out and '"samples": 12' in out
    assert len(list((tmp_path / "cache").glob("*_train_indexmap_12ns_*_shuffle_idx.npy"))) == 1


def test_separate_valid_paths(corpus, tmp_path):
    from megaocto.config.base import ConfigError

    with pytest.raises(ConfigError, match="valid no share"):
        DataConfig(kind="gpt", paths=[corpus["a"]], valid_paths=[corpus["b"]], eod_id=0).validate()
    with pytest.raises(ConfigError, match="training documents"):
        DataConfig(kind="gpt", paths=[corpus["a"]], valid_paths=[corpus["a"]], split="100,0,0", eod_id=0).validate()
    cfg = DataConfig(kind="gpt", paths=[corpus["a"]], valid_paths=[corpus["b"]], split="100,0,0", eod_id=0,
                     cache_dir=str(tmp_path))
    ds = build_datasets(cfg, seq_length=16, num_samples={"train": 10, "valid": 6}, seed=0)
    assert ds["train"].documents == (0, 40) and ds["valid"].documents == (0, 20)
    assert ds["valid"].indexed.prefix == corpus["b"]
