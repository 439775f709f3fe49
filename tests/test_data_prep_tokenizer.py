"""Tokenizers: StarCoder-order special tokens, HF/sentencepiece loading, CLI training."""
import json
import os

import pytest

from megaocto.data.tokenizer import (GLM2_SPECIAL_TOKENS, STARCODER_SPECIAL_TOKENS, TokenizerError, load_tokenizer,
                                     train_bpe_tokenizer)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def sub(a, b):\n    return a - b  # 12345\n",
    "Fix the parser so that it handles CRLF line endings.\r\n",
    "function hello() { console.log('héllo wörld'); }\n",
    "fn main() { println!(\"{}\", 42); }\n",
] * 20


def train_tiny_tokenizer(directory, vocab_size=400):
    """A small byte-level BPE with the 19 StarCoder special tokens (used by the other prep tests)."""
    path = os.path.join(str(directory), "tokenizer.json")
    if not os.path.exists(path):
        train_bpe_tokenizer(CORPUS, vocab_size, path)
    return path


def test_bpe_training_and_hf_loading(tmp_path):
    info = train_bpe_tokenizer(CORPUS, 400, str(tmp_path / "tok.json"))
    assert 275 < info["vocab_size"] <= 400
    tok = load_tokenizer(str(tmp_path / "tok.json"))
    for i, t in enumerate(STARCODER_SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i
    assert tok.eod == 0 and tok.pad == 4 and tok.token_to_id("<not-a-token>") is None
    assert tok.vocab_size == info["vocab_size"]
    text = "<commit_before>x = 1\r\n<commit_msg>Fix ünïcode 2024<commit_after>x = 2<|endoftext|>"
    ids = tok.encode(text)
    assert ids[0] == 15 and ids[-1] == 0 and 16 in ids and 17 in ids
    assert tok.decode(ids) == text
    # Digits are split individually (StarCoder pre-tokenizer).
    assert len(tok.encode("2024")) == 4
    assert tok.encode_batch(["a b", text]) == [tok.encode("a b"), ids]
    # Loading a directory finds tokenizer.json.
    os.rename(tmp_path / "tok.json", tmp_path / "tokenizer.json")
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size


def test_training_from_jsonl_files_skips_bad_rows(tmp_path):
    p = tmp_path / "c.jsonl"
    with open(p, "w") as f:
        for t in CORPUS:
            f.write(json.dumps({"old_contents": t, "new_contents": t.upper()}) + "\n")
        f.write("{broken\n")
    info = train_bpe_tokenizer([str(p)], 300, str(tmp_path / "t.json"), json_keys=["old_contents", "new_contents"])
    assert info["skipped"] == {"jsonl: invalid JSON": 1}
    assert load_tokenizer(str(tmp_path / "t.json")).token_to_id("<reponame>") == 18


def test_sentencepiece_glm_style(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    n = 400
    assert tok.vocab_size == n + 5
    assert [tok.token_to_id(t) for t in GLM2_SPECIAL_TOKENS] == list(range(n, n + 5))
    assert tok.eod == 2 and tok.pad == 0
    ids = tok.encode("[gMASK]sopdef add(a, b):")
    assert ids[:2] == [n + 1, n + 3]
    assert tok.decode(ids) == "[gMASK]sopdef add(a, b):"
    plain = load_tokenizer(str(tmp_path / "sp.model"), sp_special_tokens=())
    assert plain.vocab_size == n and plain.token_to_id("[gMASK]") is None


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(str(tmp_path / "bad.json"))
    path = train_tiny_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="EOD token '<nope>'"):
        load_tokenizer(path, eod_token="<nope>")


def test_tokenizer_cli(tmp_path, capsys):
    from megaocto.cli import main

    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    assert main(["tokenizer", "train", "--input", str(p), "--vocab-size", "300", "--output",
                 str(tmp_path / "o.json")]) == 0
    assert "vocab" in capsys.readouterr().out
    assert main(["tokenizer", "info", str(tmp_path / "o.json")]) == 0
    out = capsys.readouterr().out
    assert "eod" in out and "<|endoftext|>" in out


def test_training_input_with_a_missing_file_is_an_error(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("def f(): pass\n")
    with pytest.raises(TokenizerError, match="not found"):
        train_bpe_tokenizer([str(p), str(tmp_path / "typo.txt")], 300, str(tmp_path / "t.json"))
    from megaocto.cli import main
    assert main(["tokenizer", "train", "--input", str(tmp_path / "typo.txt"), "--vocab-size", "300",
                 "--output", str(tmp_path / "t.json")]) == 2


def test_json_key_found_in_no_row_is_an_error_and_a_tiny_vocab_warns(tmp_path, capsys):
    from megaocto.cli import main

    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"old_contents": t, "subject": "s"}) + "\n" for t in CORPUS))
    out = tmp_path / "o.json"
    with pytest.raises(TokenizerError, match=r"'new_contents' not found in any of the \d+ jsonl rows \(the first "
                                             r"row has keys 'old_contents', 'subject'\)"):
        train_bpe_tokenizer([str(p)], 300, str(out), json_keys=["old_contents", "new_contents"])
    assert not out.exists()
    assert main(["tokenizer", "train", "--input", str(p), "--vocab-size", "300", "--output", str(out)]) == 2
    assert "megaocto tokenizer: error: json key(s) 'text' not found" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", str(p), "--json-keys", "old_contents", "--vocab-size", "5000",
                 "--output", str(out)]) == 0
    assert "megaocto tokenizer: warning: vocab " in capsys.readouterr().err
