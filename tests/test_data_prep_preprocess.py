"""preprocess: formats, tokens vs direct encode, 1-vs-2 workers byte-identical, aligned pairs, CLI + merge."""
import json
import shlex

import numpy as np
import pytest

from megaocto.cli import main
from megaocto.data.formats import FORMATS, get_format, line_diff, magicoder_prompt, number_lines, render
from megaocto.data.indexed import MMapIndexedDataset
from megaocto.data.jsonl import BadRowError
from megaocto.data.preprocess import PreprocessConfig, preprocess
from megaocto.data.tokenizer import load_tokenizer
from test_data_prep_tokenizer import train_tiny_tokenizer


def _commit(i, new=None):
    old = f"def f{i}(x):\r\n    return x + {i}\r\n" + "# päd\n" * (i % 5)
    return {"commit": f"{i:040x}", "old_file": f"m{i}.py", "new_file": f"m{i}.py", "old_contents": old,
            "new_contents": old.replace("+", "-") if new is None else new, "subject": f"Fix sign in f{i} ✓",
            "message": f"Fix sign in f{i} ✓\n", "lang": "Python", "license": "mit", "repos": "o/r"}


def _write(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def test_linediff_verified_example_and_templates():
    old = "def f(x):\n    return x+1\n\nprint(f(2))"
    new = old.replace("x+1", "x+2")
    assert number_lines(old) == "  1 def f(x):\n  2     return x+1\n  3 \n  4 print(f(2))"
    assert line_diff(old, new) == "-  2     return x+1\n+  2     return x+2"
    inp, tgt = render(get_format("commits-linediff"), {"old_contents": old, "subject": "Fix", "new_contents": new},
                      ("old_contents", "subject", "new_contents"))
    assert inp == ("<commit_before>\n  1 def f(x):\n  2     return x+1\n  3 \n  4 print(f(2))\n<commit_msg>\nFix\n"
                   "<commit_after>\n")
    assert tgt == "-  2     return x+1\n+  2     return x+2"
    row = {"old_contents": "a", "subject": "Fix it", "new_contents": "b"}
    keys = ("old_contents", "subject", "new_contents")
    assert render(FORMATS["commits-pretrain"], row, keys) == ("<commit_before>a<commit_msg>Fix it<commit_after>b",)
    assert render(FORMATS["commits-finetune"], row, keys) == ("Question: Fix it\na\n\nAnswer: ", "b")
    assert render(FORMATS["qa"], {"q": "Why?", "a": "Because."}, ("q", "a")) == ("Question: Why?\n\nAnswer: ",
                                                                                  "Because.")
    m_in, m_out = render(FORMATS["magicoder"], {"problem": "P", "solution": "S"}, ("problem", "solution"))
    assert m_in.endswith("@@ Instruction\nWrite a solution to the following coding problem:\nP\n\n@@ Response\n")
    assert m_in.startswith("You are an exceptionally intelligent coding assistant") and m_out == "S"
    assert render(FORMATS["instruction-response"], {"instruction": "I", "response": "R"},
                  ("instruction", "response")) == (magicoder_prompt("I"), "R")


def test_linediff_keeps_crlf_and_strips_the_subject_as_upstream():
    """octopack finetuning/santacoder/finetune.py generate_line_diff: lines numbered with their own endings
    (splitlines(keepends=True), "".join), the diff over endings-free lines, the subject .strip()ped."""
    old = "def f(x):\r\n    return x+1\r\n\r\nprint(f(2))\r\n"
    new = old.replace("x+1", "x+2")
    assert number_lines(old) == "  1 def f(x):\r\n  2     return x+1\r\n  3 \r\n  4 print(f(2))"
    row = {"old_contents": old, "subject": "  Fix the sign \r", "new_contents": new}
    inp, tgt = render(get_format("commits-linediff"), row, ("old_contents", "subject", "new_contents"))
    assert inp == ("<commit_before>\n  1 def f(x):\r\n  2     return x+1\r\n  3 \r\n  4 print(f(2))\n<commit_msg>\n"
                   "Fix the sign\n<commit_after>\n")
    assert tgt == "-  2     return x+1\n+  2     return x+2"
    mixed = "a\r\nb\nc"  # each line keeps its own ending
    assert number_lines(mixed) == "  1 a\r\n  2 b\n  3 c"


def test_octocoder_commit_and_oasst_formats_share_the_answer_cue():
    """OctoCoder (octopack finetuning/starcoder/finetune.py) trains on "Question: {prompt}\n\nAnswer: {completion}"
    and its CommitPackFT rows are prompt = subject + "\n" + old_contents (dataset/oasst/add_commitpackft.py): the
    commit format is exactly the qa format of that prompt."""
    keys = ("old_contents", "subject", "new_contents")
    row = {"old_contents": "x = 1\n", "subject": "Make x two", "new_contents": "x = 2\n"}
    commit = render(FORMATS["commits-finetune"], row, keys)
    qa = render(FORMATS["qa"], {"prompt": row["subject"] + "\n" + row["old_contents"],
                                "completion": row["new_contents"]}, ("prompt", "completion"))
    assert commit == qa == ("Question: Make x two\nx = 1\n\n\nAnswer: ", "x = 2\n")
    prompt, completion = row["subject"] + "\n" + row["old_contents"], row["new_contents"]
    assert commit[0] + commit[1] == f"Question: {prompt}\n\nAnswer: {completion}"  # prepare_sample_text


def test_workers_identical_and_tokens_match_direct_encode(tmp_path):
    tok_path = train_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tok_path)
    rows = [_commit(i) for i in range(40)]
    _write(tmp_path / "a.jsonl", rows[:25])
    _write(tmp_path / "b.jsonl", rows[25:])
    outs = {}
    for w in (1, 2):
        cfg = PreprocessConfig(inputs=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                               output_prefix=str(tmp_path / f"w{w}" / "out"), tokenizer=tok_path,
                               format="commits-pretrain", workers=w, chunk_bytes=700, batch_bytes=300,
                               log_interval=0)
        res = preprocess(cfg)
        assert res.docs == 40 and res.stats.rows_read == 40 and res.stats.rows_skipped == 0
        outs[w] = [(tmp_path / f"w{w}" / f"out_text_document.{ext}").read_bytes() for ext in ("bin", "idx")]
        assert not (tmp_path / f"w{w}" / "out_shards").exists()
    assert outs[1] == outs[2]
    ds = MMapIndexedDataset(str(tmp_path / "w2" / "out_text_document"))
    assert ds.dtype == np.uint16 and ds.num_docs == 40
    for i, r in enumerate(rows):
        text = f"<commit_before>{r['old_contents']}<commit_msg>{r['subject']}<commit_after>{r['new_contents']}"
        assert ds[i].tolist() == tok.encode(text) + [tok.eod]
    assert res.tokens["text"] == ds.num_tokens


def test_pairs_stay_aligned_and_bad_rows(tmp_path):
    tok_path = train_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tok_path)
    rows = [_commit(0), _commit(1, new=""), _commit(2), _commit(3)]
    _write(tmp_path / "c.jsonl", rows, extra_lines=['{"old_contents": "x", "subject": null}'])
    base = dict(inputs=[str(tmp_path / "c.jsonl")], tokenizer=tok_path, format="commits-finetune",
                chunk_bytes=300, log_interval=0)
    with pytest.raises(BadRowError, match=r"c\.jsonl:2: empty targets") as err:
        preprocess(PreprocessConfig(output_prefix=str(tmp_path / "f" / "o"), workers=2, **base))
    assert err.value.stats.rows_read == 2 and err.value.stats.rows_skipped == 0
    assert not list((tmp_path / "f").iterdir())  # nothing half-written is left
    res = preprocess(PreprocessConfig(output_prefix=str(tmp_path / "s" / "o"), on_error="skip", **base))
    assert res.docs == 3 and dict(res.stats.skipped) == {"empty targets": 1, "null key": 1}
    assert "c.jsonl:5: null key" in res.summary() and "rows read 5, written 3, skipped 2" in res.summary()
    inp = MMapIndexedDataset(str(tmp_path / "s" / "o_inputs_document"))
    tgt = MMapIndexedDataset(str(tmp_path / "s" / "o_targets_document"))
    assert inp.num_docs == tgt.num_docs == 3
    for d, r in enumerate([rows[0], rows[2], rows[3]]):
        assert tok.decode(inp[d]) == f"Question: {r['subject']}\n{r['old_contents']}\n\nAnswer: "
        assert tok.decode(tgt[d]) == r["new_contents"] + "<|endoftext|>"
    assert inp[0][-1] != tok.eod  # EOD only after the target


def test_cli_preprocess_no_join_then_merge(tmp_path, capsys):
    tok_path = train_tiny_tokenizer(tmp_path)
    _write(tmp_path / "t.jsonl", [{"content": f"print({i})\n" * (i + 1)} for i in range(30)])
    common = ["preprocess", "--input", str(tmp_path / "t.jsonl"), "--tokenizer", tok_path, "--json-key", "content",
              "--chunk-mb", "0.0005", "--log-interval", "0"]
    assert main(common + ["--output-prefix", str(tmp_path / "j")]) == 0
    assert "rows read 30, written 30, skipped 0" in capsys.readouterr().out
    assert main(common + ["--output-prefix", str(tmp_path / "n"), "--no-join"]) == 0
    assert main(["merge-datasets", "--input", str(tmp_path / "n_shards"), "--pattern", "*_content_document.idx",
                 "--output-prefix", str(tmp_path / "new_dir" / "m")]) == 0  # the output directory is created
    assert "30 docs" in capsys.readouterr().out
    for ext in ("bin", "idx"):
        assert (tmp_path / "new_dir" / f"m.{ext}").read_bytes() == (tmp_path / f"j_content_document.{ext}").read_bytes()
    # a two-sided format: `merge-datasets DIR` with the default pattern merges each key separately, and the
    # command printed at the end of the --no-join run reproduces the joined output byte for byte
    _write(tmp_path / "c.jsonl", [_commit(i) for i in range(12)])
    ft = ["preprocess", "--input", str(tmp_path / "c.jsonl"), "--tokenizer", tok_path, "--format", "commits-finetune",
          "--chunk-mb", "0.0005", "--log-interval", "0"]
    assert main(ft + ["--output-prefix", str(tmp_path / "fj")]) == 0
    capsys.readouterr()
    assert main(ft + ["--output-prefix", str(tmp_path / "fn"), "--no-join"]) == 0
    out = capsys.readouterr().out
    shards = sorted(p.name for p in (tmp_path / "fn_shards").iterdir())
    assert len(shards) > 4 and shards[0] == "000000000_inputs_document.bin"
    cmd = shlex.split(out.split("join them with:\n")[1].split("\n")[0])
    assert cmd[:2] == ["megaocto", "merge-datasets"] and "--pattern" not in cmd
    assert main(cmd[1:]) == 0
    out = capsys.readouterr().out
    assert "fn_inputs_document: 12 docs" in out and "fn_targets_document: 12 docs" in out
    for key in ("inputs", "targets"):
        for ext in ("bin", "idx"):
            assert ((tmp_path / f"fn_{key}_document.{ext}").read_bytes()
                    == (tmp_path / f"fj_{key}_document.{ext}").read_bytes())
    # single-key shards: the printed command writes P_{key}_document too
    assert main(common + ["--output-prefix", str(tmp_path / "n1"), "--no-join"]) == 0
    cmd = shlex.split(capsys.readouterr().out.split("join them with:\n")[1].split("\n")[0])
    assert main(cmd[1:]) == 0
    assert ((tmp_path / "n1_content_document.bin").read_bytes()
            == (tmp_path / "j_content_document.bin").read_bytes())
    # --on-error fail: the bad-input summary is printed too, with the error, on stderr (also with 2 workers,
    # where later chunks were already done: only rows up to the bad one are counted)
    (tmp_path / "bad.jsonl").write_text('{"content": "ok"}\n' * 40 + '{"content": \n' + '{"content": "ok"}\n' * 40)
    for workers in ("1", "2"):
        assert main(["preprocess", "--input", str(tmp_path / "bad.jsonl"), "--tokenizer", tok_path, "--json-key",
                     "content", "--output-prefix", str(tmp_path / "b"), "--log-interval", "0", "--chunk-mb",
                     "0.0002", "--workers", workers]) == 1
        res = capsys.readouterr()
        assert "bad.jsonl:41: invalid JSON" in res.err and "invalid JSON" not in res.out
        assert "rows read 41, written 0, skipped 0" in res.err and "--on-error skip" in res.err
        assert not list(tmp_path.glob("b_*"))


def test_linediff_whitespace_only_change_is_a_named_bad_row(tmp_path):
    tok_path = train_tiny_tokenizer(tmp_path)
    ws = _commit(1, new=_commit(1)["old_contents"] + "\n\n")  # valid commit: trailing blank lines added
    _write(tmp_path / "l.jsonl", [_commit(0), ws, _commit(2)])
    base = dict(inputs=[str(tmp_path / "l.jsonl")], tokenizer=tok_path, format="commits-linediff", log_interval=0)
    with pytest.raises(BadRowError, match=r"l\.jsonl:2: empty line diff: only leading/trailing whitespace.*"
                                          r"--on-error skip"):
        preprocess(PreprocessConfig(output_prefix=str(tmp_path / "f"), **base))
    res = preprocess(PreprocessConfig(output_prefix=str(tmp_path / "s"), on_error="skip", **base))
    assert res.docs == 2 and dict(res.stats.skipped) == {"empty line diff": 1}


def test_merge_groups_keys_and_sorts_shards_numerically(tmp_path):
    from megaocto.data.indexed import (IndexedDatasetError, MMapIndexedDatasetBuilder, resolve_dataset_groups,
                                       resolve_dataset_inputs)

    def make(prefix, value):
        b = MMapIndexedDatasetBuilder(str(prefix) + ".bin", np.uint16)
        b.add_document([value])
        b.finalize(str(prefix) + ".idx")

    d = tmp_path / "shards"
    d.mkdir()
    for i in (2, 10, 1_000_000, 999_999):  # unpadded / past 6 digits: numeric order, not text order
        for key in ("inputs", "targets"):
            make(d / f"{i}_{key}_document", i % 1000)
    groups = resolve_dataset_groups([str(d)])
    assert list(groups) == ["inputs", "targets"]
    assert [p.rsplit("/", 1)[1] for p in groups["targets"]] == [
        "2_targets_document", "10_targets_document", "999999_targets_document", "1000000_targets_document"]
    with pytest.raises(IndexedDatasetError, match="several keys"):
        resolve_dataset_inputs([str(d)])
    with pytest.raises(IndexedDatasetError, match="different keys"):
        resolve_dataset_groups([str(d), str(d / "2_inputs_document")])
    assert len(resolve_dataset_inputs([str(d)], "*_inputs_document.idx")) == 4
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("wiki10_text_document", "wiki9_text_document", "code_text_document"):
        make(plain / name, 1)
    assert [p.rsplit("/", 1)[1] for p in resolve_dataset_inputs([str(plain)])] == [
        "code_text_document", "wiki9_text_document", "wiki10_text_document"]
    make(plain / "code_targets_document", 1)  # P_inputs/P_targets style names of one prefix: refuse to mix
    with pytest.raises(IndexedDatasetError, match="several keys"):
        resolve_dataset_inputs([str(plain)])


def test_every_bad_case_skipped_with_global_line_numbers(tmp_path):
    from test_data_prep_jsonl import _write_mixed

    tok_path = train_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tok_path)
    valid, bad = _write_mixed(tmp_path / "mixed.jsonl")
    base = dict(inputs=[str(tmp_path / "mixed.jsonl")], tokenizer=tok_path, chunk_bytes=64, max_line_bytes=200,
                log_interval=0)
    res = preprocess(PreprocessConfig(output_prefix=str(tmp_path / "o"), on_error="skip", **base))
    ds = MMapIndexedDataset(str(tmp_path / "o_text_document"))
    assert res.docs == ds.num_docs == len(valid)
    assert [tok.decode(ds[i][:-1]) for i in range(len(valid))] == [v["text"] for v in valid]
    assert res.stats.rows_skipped == len(bad) and res.stats.rows_read == len(valid) + len(bad)
    assert [(e.line, e.category) for e in res.stats.examples] == bad[:5]  # line numbers global across chunks
    with pytest.raises(BadRowError) as e:
        preprocess(PreprocessConfig(output_prefix=str(tmp_path / "f"), **base))
    assert (e.value.line, e.value.category) == bad[0]


def test_text_format_with_several_json_keys(tmp_path):
    tok_path = train_tiny_tokenizer(tmp_path)
    tok = load_tokenizer(tok_path)
    rows = [{"inputs": f"<commit_before>x = {i}<commit_msg>", "targets": f"Fix {i}<commit_after>x = {i + 1}"}
            for i in range(5)] + [{"inputs": "a", "targets": ""}]
    _write(tmp_path / "mtf.jsonl", rows)
    res = preprocess(PreprocessConfig(inputs=[str(tmp_path / "mtf.jsonl")], output_prefix=str(tmp_path / "m"),
                                      tokenizer=tok_path, json_key=["inputs", "targets"], on_error="skip",
                                      log_interval=0))
    assert dict(res.stats.skipped) == {"empty targets": 1}
    for key in ("inputs", "targets"):
        ds = MMapIndexedDataset(str(tmp_path / f"m_{key}_document"))
        assert [ds[i].tolist() for i in range(5)] == [tok.encode(r[key]) + [tok.eod] for r in rows[:5]]


@pytest.mark.parametrize("argv, message", [
    (["merge-datasets", "--input", "{d}/missing", "--output-prefix", "{d}/m"], "missing.idx: index file not found"),
    (["merge-datasets", "--input", "{d}", "--output-prefix", "{d}/m"], "no datasets matching"),
    (["commits", "--repo", "{d}", "--output", "{d}/c.jsonl"], "not a git repository"),
    (["commits", "--repo", "{d}/nope", "--output", "{d}/c.jsonl"], "is not a directory"),
    (["tokenizer", "info", "{d}/missing.json"], "tokenizer file not found"),
    (["preprocess", "--input", "{d}/in.jsonl", "--tokenizer", "{d}/missing.json", "--output-prefix", "{d}/p"],
     "tokenizer file not found"),
    (["preprocess", "--input", "{d}/nope.jsonl", "--tokenizer", "x", "--output-prefix", "{d}/p"], "does not exist"),
    (["filter-commits", "--input", "{d}/nope.jsonl", "--output", "{d}/o.jsonl", "--skip-rules", "token-length"],
     "input file not found"),
])
def test_cli_expected_errors_are_one_line_on_stderr(tmp_path, capsys, argv, message):
    d = tmp_path / "work"
    d.mkdir()
    (d / "in.jsonl").write_text('{"text": "x"}\n')
    assert main([a.format(d=d) for a in argv]) == 2
    res = capsys.readouterr()
    assert message in res.err and "Traceback" not in res.err and res.out == ""
    assert res.err.startswith(f"megaocto {argv[0]}: error: ") and res.err.count("\n") == 1


def test_skip_mode_with_every_row_bad_is_an_error_and_leaves_no_outputs(tmp_path, capsys):
    tok_path = train_tiny_tokenizer(tmp_path)
    _write(tmp_path / "c.jsonl", [_commit(i) for i in range(6)])
    argv = ["preprocess", "--input", str(tmp_path / "c.jsonl"), "--tokenizer", tok_path, "--format", "qa",
            "--on-error", "skip", "--log-interval", "0", "--output-prefix", str(tmp_path / "o" / "p")]
    assert main(argv) == 1
    res = capsys.readouterr()
    assert "rows read 6, written 0, skipped 6 (missing key: 6)" in res.err
    assert "megaocto preprocess: error: nothing was written" in res.err and "'prompt'" in res.err
    assert not list((tmp_path / "o").iterdir())  # no empty .bin/.idx that look like a dataset
    # Mostly bad (4 of 6): written, with a warning on stderr.
    _write(tmp_path / "m.jsonl", [{"prompt": "Q", "completion": "A"}] * 2 + [_commit(i) for i in range(4)])
    argv[2], argv[-1] = str(tmp_path / "m.jsonl"), str(tmp_path / "m" / "p")
    assert main(argv) == 0
    res = capsys.readouterr()
    assert "warning: 4 of 6 rows (67%) were skipped" in res.err and "written 2, skipped 4" in res.out


@pytest.mark.parametrize("workers", [1, 2])
def test_fail_mode_counts_only_up_to_the_failing_row(tmp_path, capsys, workers):
    tok_path = train_tiny_tokenizer(tmp_path)
    rows = [{"prompt": "Q", "completion": "A"}] * 3 + [_commit(i) for i in range(20)]
    _write(tmp_path / "m.jsonl", rows)
    assert main(["preprocess", "--input", str(tmp_path / "m.jsonl"), "--tokenizer", tok_path, "--format", "qa",
                 "--workers", str(workers), "--chunk-mb", "0.002", "--log-interval", "0",
                 "--output-prefix", str(tmp_path / "o" / "p")]) == 1
    err = capsys.readouterr().err
    assert "rows read 4, written 0, skipped 0\n" in err and "skipped " + str(tmp_path) not in err
    assert "error: " + str(tmp_path / "m.jsonl") + ":4: missing key: 'prompt'" in err
