import numpy as np
import pytest

from megaocto.config.base import ConfigError, field_docs
from megaocto.config.data import DataConfig
from megaocto.data.build import build_datasets, epoch_num_samples
from megaocto.data.gpt_dataset import text_to_sample


def test_config_fields_documented_and_validated():
    assert all(doc for doc in field_docs(DataConfig).values())
    DataConfig().validate()
    for bad in (dict(kind="nope"), dict(kind="gpt"), dict(split="a,b"), dict(paths=["a"], weights=[1, 2]),
                dict(fim_rate=1.5), dict(kind="gpt", paths=["a"], eod_id=0, fim_rate=0.5),
                dict(kind="gpt", paths=["a"], eod_mask_loss=True)):
        with pytest.raises(ConfigError):
            DataConfig(**bad).validate()
    assert DataConfig(split="98,2").split_fractions() == pytest.approx([0.98, 0.02, 0.0])


def test_synthetic_deterministic_disjoint_and_format():
    cfg = DataConfig(kind="synthetic", synthetic_vocab_size=64, synthetic_epoch_samples=77)
    ds = build_datasets(cfg, seq_length=16, num_samples={"train": 50, "valid": 20, "test": 0}, seed=3)
    assert ds["test"] is None and len(ds["train"]) == 50 and len(ds["valid"]) == 20
    again = build_datasets(cfg, seq_length=16, num_samples={"train": 50, "valid": 20}, seed=3)
    other = build_datasets(cfg, seq_length=16, num_samples={"train": 50}, seed=4)
    s = ds["train"][7]
    assert set(s) == {"input_ids", "labels", "loss_mask", "position_ids"}
    assert s["input_ids"].dtype == np.int64 and s["loss_mask"].dtype == np.float32
    assert all(v.shape == (16,) for v in s.values())
    np.testing.assert_array_equal(s["labels"][:-1], s["input_ids"][1:])
    np.testing.assert_array_equal(s["input_ids"], again["train"][7]["input_ids"])
    assert not np.array_equal(s["input_ids"], other["train"][7]["input_ids"])
    train = {ds["train"][i]["input_ids"].tobytes() for i in range(50)}
    valid = {ds["valid"][i]["input_ids"].tobytes() for i in range(20)}
    assert not train & valid and len(train) > 40
    assert max(int(ds["train"][i]["labels"].max()) for i in range(50)) < 64
    assert epoch_num_samples(cfg, seq_length=16, seed=3) == 77
    with pytest.raises(IndexError):
        ds["train"][50]


def test_text_to_sample_masks_and_positions():
    text = np.array([5, 6, 0, 7, 8, 9, 0, 4, 3])
    s = text_to_sample(text, 0, eod_mask_loss=True, reset_position_ids=True)
    np.testing.assert_array_equal(s["input_ids"], text[:-1])
    np.testing.assert_array_equal(s["labels"], text[1:])
    np.testing.assert_array_equal(s["loss_mask"], [1, 1, 0, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(s["position_ids"], [0, 1, 2, 0, 1, 2, 3, 0])
    plain = text_to_sample(text, 0)
    np.testing.assert_array_equal(plain["position_ids"], np.arange(8))
    assert plain["loss_mask"].sum() == 8
