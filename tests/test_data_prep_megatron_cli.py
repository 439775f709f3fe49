"""Megatron tools/preprocess_data.py command lines run unchanged on megaocto (preprocess/preprocess_data.py,
`megaocto preprocess-megatron`): same file names, byte-identical to `megaocto preprocess`, refusals named."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megaocto.cli import main
from megaocto.data.indexed import MMapIndexedDataset
from megaocto.data.tokenizer import load_tokenizer
from test_data_prep_tokenizer import train_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("mega")
    tok = train_tiny_tokenizer(d)
    rows = [{"inputs": f"Question: fix f{i}\n\nAnswer: ", "targets": f"def f{i}(x):\r\n    return x * {i} ✓\n",
             "text": f"print({i})\n" * (i % 4 + 1), "extra": i} for i in range(40)]
    path = d / "dedup.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {"dir": d, "tok": tok, "input": str(path), "rows": rows}


def _files(prefix):
    return {ext: open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx")}


def test_octopack_preprocess_sh_runs_unchanged_and_matches_megaocto_preprocess(data, tmp_path):
    """octopack training/preprocess.sh, word for word (its --json-key is argparse's abbreviation of --json-keys),
    through the top-level script as a user runs it."""
    out = str(tmp_path / "train_commits")
    for key in ("inputs", "targets"):
        cmd = [sys.executable, os.path.join(ROOT, "preprocess", "preprocess_data.py"), "--input", data["input"],
               "--output-prefix", out, "--dataset-impl", "mmap", "--json-key", key, "--tokenizer-type",
               "TokenizerFromFile", "--tokenizer-file", data["tok"], "--workers", "2", "--chunk-size", "1000"]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
    # Megatron's naming: {prefix}_{key}_document.bin/.idx, and nothing else left beside them
    assert sorted(os.listdir(tmp_path)) == [f"train_commits_{k}_document.{e}" for k in ("inputs", "targets")
                                            for e in ("bin", "idx")]
    assert main(["preprocess", "--input", data["input"], "--output-prefix", str(tmp_path / "m" / "ref"),
                 "--tokenizer", data["tok"], "--json-keys", "inputs", "targets", "--no-append-eod",
                 "--log-interval", "0"]) == 0
    for key in ("inputs", "targets"):
        assert _files(f"{out}_{key}_document") == _files(tmp_path / "m" / f"ref_{key}_document")
    tok = load_tokenizer(data["tok"])
    ds = MMapIndexedDataset(f"{out}_targets_document")
    assert ds.dtype == np.uint16 and ds.num_docs == 40  # vocab < 65500: uint16, as Megatron
    assert tok.decode(ds[3]) == data["rows"][3]["targets"]  # no EOD without --append-eod (octopack's setting)


def test_append_eod_several_keys_and_worker_counts(data, tmp_path, capsys):
    base = ["preprocess-megatron", "--input", data["input"], "--json-keys", "text", "inputs", "--tokenizer-type",
            "TokenizerFromFile", "--tokenizer-file", data["tok"], "--append-eod", "--log-interval", "100"]
    assert main(base + ["--output-prefix", str(tmp_path / "w1" / "my"), "--workers", "1"]) == 0
    assert main(base + ["--output-prefix", str(tmp_path / "w3" / "my"), "--workers", "3"]) == 0
    assert main(["preprocess", "--input", data["input"], "--output-prefix", str(tmp_path / "ref" / "my"),
                 "--tokenizer", data["tok"], "--json-keys", "text", "inputs", "--log-interval", "0"]) == 0
    assert "rows read 40, written 40, skipped 0" in capsys.readouterr().out
    for key in ("text", "inputs"):
        ref = _files(tmp_path / "ref" / f"my_{key}_document")
        assert _files(tmp_path / "w1" / f"my_{key}_document") == ref == _files(tmp_path / "w3" / f"my_{key}_document")
    tok = load_tokenizer(data["tok"])
    ds = MMapIndexedDataset(str(tmp_path / "w1" / "my_text_document"))
    assert ds[0][-1] == tok.eod and tok.decode(ds[0][:-1]) == data["rows"][0]["text"]


@pytest.mark.parametrize("extra, message", [
    (["--split-sentences"], "--split-sentences: sentence splitting"),
    (["--dataset-impl", "lazy"], "--dataset-impl lazy: only mmap"),
    (["--partitions", "2"], "--partitions 2: not supported"),
    (["--subset", "python"], "--subset: Hugging Face datasets are not loaded"),
    (["--vocab-extra-ids", "100"], "--vocab-extra-ids: extra ids"),
    (["--vocab-size", "1000"], "--vocab-size: only used by the NullTokenizer"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer needs --vocab-file"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{tok}"], "GPT2BPETokenizer needs --merge-file"),
    (["--tokenizer-type", "Llama2Tokenizer"], "prepends BOS"),
    (["--tokenizer-type", "BertWordPieceLowerCase"], "BERT tokenizers are not supported"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model"),
])
def test_unsupported_megatron_flags_are_refused_by_name(data, tmp_path, capsys, extra, message):
    args = ["preprocess-megatron", "--input", data["input"], "--output-prefix", str(tmp_path / "x"),
            "--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", data["tok"], "--workers", "1"]
    args += [a.format(tok=data["tok"]) for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("megaocto preprocess-megatron: error: ") and message in err, err
    assert not os.listdir(tmp_path)  # nothing written


def test_unknown_flag_is_an_argparse_error_and_no_op_flags_are_accepted(data, tmp_path, capsys):
    base = ["preprocess-megatron", "--input", data["input"], "--output-prefix", str(tmp_path / "o"),
            "--tokenizer-type", "TokenizerFromFile", "--tokenizer-file", data["tok"], "--workers", "1"]
    with pytest.raises(SystemExit) as e:
        main(base + ["--find-optimal-num-workers"])
    assert e.value.code == 2 and "unrecognized arguments: --find-optimal-num-workers" in capsys.readouterr().err
    # flags that change nothing in Megatron either (or only its speed) are accepted
    assert main(base + ["--lang", "english", "--keep-newlines", "--keep-sequential-samples", "--chunk-size", "25",
                        "--vocab-file", "vocab.json", "--merge-file", "merges.txt"]) == 0
    err = capsys.readouterr().err
    assert "note: --vocab-file is not used by TokenizerFromFile" in err
    assert os.path.exists(tmp_path / "o_text_document.idx")


def test_huggingface_tokenizer_directory(data, tmp_path):
    """NVIDIA's --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR (a local directory)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_bytes(open(data["tok"], "rb").read())
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    args = ["preprocess-megatron", "--input", data["input"], "--json-keys", "targets", "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", str(hf), "--workers", "1", "--append-eod"]
    assert main(args + ["--output-prefix", str(tmp_path / "a")]) == 0
    assert main(["preprocess", "--input", data["input"], "--output-prefix", str(tmp_path / "b"), "--tokenizer",
                 data["tok"], "--json-keys", "targets", "--log-interval", "0"]) == 0
    assert _files(tmp_path / "a_targets_document") == _files(tmp_path / "b_targets_document")
    # another eos_token in tokenizer_config.json: Megatron's EOD, and megaocto's tokenizer protocol reads the same
    # eos from the folder, so every document ends with that id in both
    (hf / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<fim_pad>"}))
    assert main(args + ["--output-prefix", str(tmp_path / "c")]) == 0
    fim_pad = load_tokenizer(str(hf)).token_to_id("<fim_pad>")
    ds = MMapIndexedDataset(str(tmp_path / "c_targets_document"))
    assert len(ds) == 40 and all(int(ds[i][-1]) == fim_pad for i in range(len(ds)))


def test_gpt2_bpe_vocab_and_merges_as_megatron(data, tmp_path):
    """NVIDIA's examples: --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file
    gpt2-merges.txt. Ids equal the original GPT-2 BPE algorithm (transformers' slow GPT2Tokenizer, a port of
    OpenAI's encoder.py like Megatron's gpt2_tokenization.py); EOD is <|endoftext|>'s id; no temporary file is
    left behind."""
    import glob
    import tempfile

    from tokenizers import Tokenizer
    from transformers import GPT2Tokenizer

    vocab_dir = tmp_path / "gpt2"
    vocab_dir.mkdir()
    vocab, merges = Tokenizer.from_file(data["tok"]).model.save(str(vocab_dir))
    tricky = ["don't  stop:\t12345 x''ll\n\n\n   trailing   ", "naïve café — 東京 ✓✓ 🙂",
              " leading space\r\n", "a" * 300]
    texts = [r["targets"] for r in data["rows"]] + tricky
    src = tmp_path / "g.jsonl"
    src.write_text("".join(json.dumps({"targets": t}) + "\n" for t in texts), encoding="utf-8")
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "megaocto-gpt2-*")))
    assert main(["preprocess-megatron", "--input", str(src), "--output-prefix", str(tmp_path / "g"),
                 "--json-keys", "targets", "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab,
                 "--merge-file", merges, "--append-eod", "--workers", "2"]) == 0
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "megaocto-gpt2-*"))) == before
    ref = GPT2Tokenizer(vocab, merges)
    eod = json.load(open(vocab, encoding="utf-8"))["<|endoftext|>"]
    ds = MMapIndexedDataset(str(tmp_path / "g_targets_document"))
    assert ds.num_docs == len(texts)
    for i, text in enumerate(texts):
        assert ds[i].tolist() == ref.encode(text) + [eod], i
