"""Magicoder's tokenization and batching (reference §1.8) through `megaocto preprocess` + data.kind=packed:
BOS + prompt and response + EOS encoded separately, loss on the response and EOS only, truncation to the first
seq_length tokens (counted); one example per row (data.packing=false) or packed rows with the same per-example
losses (segment isolation)."""
import json

import numpy as np
import pytest
import torch

from llama_reference import write_codellama_tokenizer
from megaocto.cli import main as cli_main
from megaocto.config.data import DataConfig
from megaocto.data.build import build_datasets, epoch_num_samples
from megaocto.data.formats import MAGICODER_OSS_PREFIX, magicoder_prompt
from megaocto.data.tokenizer import load_tokenizer

SEQ = 320
ROWS_OSS = [{"lang": "python", "seed": "x = 1", "problem": f"Add {i} to a number.",
             "solution": f"def add{i}(x):\n    return x + {i}\n" * (1 + 30 * (i == 3))} for i in range(8)]
ROWS_EVOL = [{"instruction": f"Print {i} times hello.", "response": f"for _ in range({i}):\n    print('hello')\n"}
             for i in range(5)]


def magicoder_reference(tok, instruction: str, response: str, max_len: int) -> tuple[list[int], list[int]]:
    """Magicoder train.py, restated: prompt = BOS + encode(template with empty response), completion =
    encode(response) + EOS, labels -100 on the prompt, both cut to max_training_seq_length."""
    prompt = [tok.bos] + tok.encode(magicoder_prompt(instruction))
    completion = tok.encode(response) + [tok.eod]
    ids = (prompt + completion)[:max_len]
    labels = ([-100] * len(prompt) + completion)[:max_len]
    return ids, labels


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("magicoder")
    tok_dir = write_codellama_tokenizer(str(tmp / "tok"))
    paths = {}
    for name, rows, fmt in (("oss", ROWS_OSS, "magicoder"), ("evol", ROWS_EVOL, "instruction-response")):
        src = tmp / f"{name}.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
        prefix = str(tmp / "data" / name)
        assert cli_main(["preprocess", "--input", str(src), "--format", fmt, "--output-prefix", prefix,
                         "--tokenizer", tok_dir, "--log-interval", "0"]) == 0
        paths[name] = prefix
    return tmp, tok_dir, paths


def _config(tmp, tok_dir, prefix, **kw):
    return DataConfig(kind="packed", paths=[prefix], split="100,0,0", tokenizer=tok_dir, packed_overlong="head",
                      cache_dir=str(tmp / "cache"), num_workers=0, **kw)


@pytest.mark.parametrize("name", ["oss", "evol"])
def test_one_example_per_row_is_magicoder_tokenization(prepared, name):
    tmp, tok_dir, paths = prepared
    tok = load_tokenizer(tok_dir)
    rows = ROWS_OSS if name == "oss" else ROWS_EVOL
    pairs = [(MAGICODER_OSS_PREFIX + r["problem"], r["solution"]) if name == "oss" else (r["instruction"], r["response"])
             for r in rows]
    cfg = _config(tmp, tok_dir, paths[name], packing=False)
    assert epoch_num_samples(cfg, seq_length=SEQ, seed=3) == len(rows)  # one row per example
    ds = build_datasets(cfg, seq_length=SEQ, num_samples={"train": len(rows)}, seed=3)["train"]
    summary = ds.summary()
    assert summary["kind"] == "one_example_per_row"
    long = [i for i, (ins, out) in enumerate(pairs) if len(magicoder_reference(tok, ins, out, 10**6)[0]) > SEQ]
    assert summary["truncated_examples"] == len(long) and (name == "evol" or long == [3])
    seen = []
    for r in range(len(ds)):
        (ex,) = ds.row_examples(r).tolist()
        seen.append(ex)
        ids, labels = magicoder_reference(tok, *pairs[ex], SEQ)
        s = ds[r]
        n = len(ids)
        assert s["input_ids"][:n].tolist() == ids  # BOS + prompt + response + EOS (cut), then right padding
        assert ids[0] == tok.bos and (n == SEQ or ids[-1] == tok.eod)
        # HF shifts inside the model: position j predicts ids[j+1] with label labels[j+1]
        want_mask = [lab != -100 for lab in labels[1:]] + [False] * (SEQ - n + 1)
        assert (s["loss_mask"] > 0).tolist() == want_mask
        assert s["labels"][:n - 1][np.array(want_mask[:n - 1])].tolist() == [lab for lab in labels[1:] if lab != -100]
        assert s["segment_ids"].tolist() == [1] * n + [0] * (SEQ - n)
    assert sorted(seen) == list(range(len(rows)))


def test_packed_rows_give_the_same_per_example_losses(prepared):
    from megaocto.config.model import ModelConfig
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    tmp, tok_dir, paths = prepared
    tok = load_tokenizer(tok_dir)  # rows of 2*SEQ tokens hold 2-3 of these examples
    single = build_datasets(_config(tmp, tok_dir, paths["oss"], packing=False), seq_length=2 * SEQ,
                            num_samples={"train": len(ROWS_OSS)}, seed=3)["train"]
    packed_cfg = _config(tmp, tok_dir, paths["oss"])
    rows = epoch_num_samples(packed_cfg, seq_length=2 * SEQ, seed=3)
    packed = build_datasets(packed_cfg, seq_length=2 * SEQ, num_samples={"train": rows}, seed=3)["train"]
    assert rows < len(ROWS_OSS) and packed.summary()["truncated_examples"] == 1
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size, seq_length=2 * SEQ,
                                                max_position_embeddings=2 * SEQ), ParallelContext.single()).eval()

    def per_example(ds):
        out = {}
        for r in range(len(ds)):
            s = {k: torch.from_numpy(np.asarray(v))[None] for k, v in ds[r].items()}
            with torch.no_grad():
                loss = model(s["input_ids"], labels=s["labels"], position_ids=s["position_ids"],
                             segment_ids=s["segment_ids"])[0]
            for k, ex in enumerate(ds.row_examples(r).tolist(), start=1):
                here = (s["segment_ids"][0] == k) & (s["loss_mask"][0] > 0)
                out.setdefault(ex, (float(loss[here].sum()), int(here.sum())))
        return out

    a, b = per_example(single), per_example(packed)
    assert set(a) == set(b) == set(range(len(ROWS_OSS)))
    for ex in a:
        assert a[ex][1] == b[ex][1] > 0
        assert a[ex][0] == pytest.approx(b[ex][0], rel=1e-5, abs=1e-5), ex
