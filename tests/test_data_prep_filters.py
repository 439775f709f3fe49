"""CommitPackFT rules: one crafted row per rule (dropped) + a control row (kept); seeded bump drop; CLI."""
import json

import pytest

from megaocto.cli import main
from megaocto.config.base import ConfigError
from megaocto.data.filters import RULE_NAMES, CommitFilter, FilterConfig, load_good_starts
from test_data_prep_tokenizer import train_tiny_tokenizer

OLD = "def retry(n):\n    return n + 1\n" * 4
BASE = {"commit": "0" * 40, "old_file": "src/transport.py", "new_file": "src/transport.py", "old_contents": OLD,
        "new_contents": OLD.replace("+ 1", "+ 2"), "subject": "Fix the retry loop in the handler",
        "message": "Fix the retry loop in the handler\n", "lang": "Python", "license": "mit", "repos": "o/r"}

# rule -> (changes to BASE, reachable in the full pipeline: is this rule the first to drop it?)
CRAFTED = {
    "old-too-long": ({"old_contents": "a" * 50_000}, True),
    "empty-new": ({"new_contents": ""}, True),
    "unchanged": ({"new_contents": OLD}, True),
    "hash-in-subject": ({"subject": "Fix the retry loop (#12) in the handler"}, True),
    "extension": ({"new_file": "src/transport.rb"}, True),
    "filename-in-subject": ({"subject": "Fix the retry loop in transport code"}, True),
    "subject-length": ({"subject": "Fix it now"}, True),
    "subject-length-cleaned": ({"subject": "api: Fix the retry loop"}, True),
    "capitalized": ({"subject": "fix the retry loop in the handler"}, True),
    "token-length": ({"old_contents": "x\n", "new_contents": "y\n"}, True),
    "good-start": ({"subject": "Changes to the retry loop in handler"}, True),
    "bad-message": ({"subject": "Update README.md"}, False),  # too short to pass subject-length upstream too
    "bad-sub-message": ({"subject": "Merge branch 'main' into feature work"}, True),
    "version-subject": ({"subject": "V1.2.3-rc1 is the new release"}, False),
    "hash-subject": ({"subject": "deadbeef-0239"}, False),
    "cherry-pick": ({"subject": "Fix the retry loop (cherry picked from commit abc)"}, True),
    "sha-in-subject": ({"subject": "Revert the change from " + "a1" * 20}, True),
    "bump": ({"subject": "Bump requests from 2.1 to 2.2 now"}, True),
    "first-person": ({"subject": "Fix the bug i found in the handler"}, True),
    "thanks-to": ({"subject": "Fix the retry loop, thanks to Bob for the report"}, True),
    "code-review": ({"subject": "Address code review comments on the handler"}, True),
    "silly-message": ({"subject": "Fix that bug where things didn't work but now they should"}, True),
    "issue-ref": ({"subject": "Fix the retry loop for issue 42 today"}, True),
    "cdpcp": ({"subject": "Fix CDPCP retry loop in the handler"}, True),
    "codereview-url": ({"subject": "Fix the loop, see //codereview.example/123 now"}, True),
    "wip": ({"subject": "Add wipe support to the handler"}, True),
    "url": ({"subject": "Fix the retry loop, see https://example.com"}, True),
    "leetcode": ({"subject": "Add solution for two sum | LeetCode"}, True),
    "few-words": ({"subject": "Fix the loop [ci skip]"}, True),
}
TRANSFORMS = {"clean-subject": ("[core] Fix the retry loop in the handler [skip ci]",
                                "Fix the retry loop in the handler"),
              "clean-ci-skip": ("Fix the retry loop in the handler [ci skip] ", "Fix the retry loop in the handler")}
PREREQ = {"subject-length-cleaned": ["clean-subject"], "few-words": ["clean-ci-skip"]}  # rules the row needs first
BUMP_DROP_INDEX = 0  # (seed=0, row=0) falls in the dropped 90%; checked below


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _cfg(tok_path, **kw):
    return FilterConfig(tokenizer=tok_path, min_tokens=10, max_tokens=400, **kw)


def test_every_rule_has_a_crafted_row():
    assert set(CRAFTED) | set(TRANSFORMS) == set(RULE_NAMES)
    assert len(load_good_starts()) == 257 and "refactor " in load_good_starts() and "plug " in load_good_starts()


def test_each_rule_drops_its_row_and_keeps_the_control(tmp_path, tok_path):
    for name, (changes, reachable) in CRAFTED.items():
        alone = CommitFilter(_cfg(tok_path, rules=PREREQ.get(name, []) + [name]))
        assert alone(dict(BASE), 1) is not None, name
        assert alone(dict(BASE, **changes), BUMP_DROP_INDEX) is None, name
        assert dict(alone.counts) == {name: 1}, name
        if reachable:  # in the full pipeline, this rule is the one that drops it
            full = CommitFilter(_cfg(tok_path))
            assert full(dict(BASE, **changes), BUMP_DROP_INDEX) is None and dict(full.counts) == {name: 1}, \
                (name, dict(full.counts))
    full = CommitFilter(_cfg(tok_path))
    assert full(dict(BASE), 0) == BASE and not full.counts
    for name, (before, after) in TRANSFORMS.items():
        row = CommitFilter(_cfg(tok_path, rules=[name]))(dict(BASE, subject=before), 0)
        assert row["subject"] == after, name


def test_bump_drop_is_seeded_and_about_90_percent(tok_path):
    row = dict(BASE, subject="Bump requests from 2.1 to 2.2 now")

    def kept(seed):
        f = CommitFilter(_cfg(tok_path, seed=seed, rules=["bump"]))
        return [f(dict(row), i) is not None for i in range(2000)]

    a, b, c = kept(0), kept(0), kept(1)
    assert a == b and a != c
    assert 0.07 < sum(a) / 2000 < 0.13


def test_missing_tokenizer_and_unknown_rule():
    with pytest.raises(ConfigError, match="--tokenizer"):
        CommitFilter(FilterConfig())
    with pytest.raises(ConfigError, match="unknown filter rule"):
        CommitFilter(FilterConfig(rules=["nope"]))
    CommitFilter(FilterConfig(skip_rules=["token-length"]))


def test_cli_reports_per_rule_counts(tmp_path, tok_path, capsys):
    rows = [dict(BASE, **c) for c, _ in CRAFTED.values()] + [dict(BASE)] * 3
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"subject": 3}\n')
    out = tmp_path / "out.jsonl"
    args = ["filter-commits", "--input", str(src), "--output", str(out), "--tokenizer", tok_path,
            "--min-tokens", "10", "--max-tokens", "400"]
    assert main(args) == 1
    res = capsys.readouterr()  # --on-error fail: the bad-input summary and the error, on stderr
    assert f"{src}:{len(rows) + 1}: missing key" in res.err and "missing key" not in res.out
    assert f"rows read {len(rows) + 1}, written 0, skipped 0" in res.err and not out.exists()
    assert main(args + ["--on-error", "skip"]) == 0
    text = capsys.readouterr().out
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    bump_index = list(CRAFTED).index("bump")
    bump_row = dict(BASE, **CRAFTED["bump"][0])
    bump_kept = CommitFilter(_cfg(tok_path, rules=["bump"]))(dict(bump_row), bump_index) is not None
    assert kept == ([bump_row] if bump_kept else []) + [BASE] * 3
    assert "hash-in-subject" in text and "skipped 1 (missing key: 1)" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("unchanged "))
    assert line.split()[1] == "1"


def test_cli_list_rules(capsys):
    assert main(["filter-commits", "--list-rules"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(RULE_NAMES)


def test_cli_notes_the_rules_behind_a_tiny_yield(tmp_path, capsys):
    rows = ([dict(BASE, subject="Changes to the retry loop in handler")] * 150  # good-start
            + [dict(BASE, subject="fix the retry loop in the handler")] * 49 + [dict(BASE)])  # capitalized; kept
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["filter-commits", "--input", str(src), "--output", str(tmp_path / "o.jsonl"), "--skip-rules",
            "token-length"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "note: kept 1 of 200 rows (0.5%); the rules that dropped the most: good-start 150 (75%), capitalized 49 " \
           "(24%)" in err and "upstream CommitPackFT behaviour" in err and "--skip-rules good-start capitalized" in err
    rows[-1:] = [dict(BASE)] * 3  # 3 of 202 kept: no note
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(args) == 0 and "note:" not in capsys.readouterr().err


def test_lone_surrogate_in_an_unchecked_column_is_a_counted_bad_row(tmp_path, capsys):
    """A "\\ud800" escape in `message` (which no rule reads) used to pass the reader and crash the writer with
    UnicodeEncodeError, under --on-error skip too. Every written column is now validated: a bad row."""
    good = json.dumps(BASE)
    bad = json.dumps(dict(BASE, message="Fix the retry loop \ud800 in the handler\n"))  # -> "\\ud800" escape
    assert "\\ud800" in bad
    src = tmp_path / "in.jsonl"
    src.write_text(good + "\n" + bad + "\n" + good + "\n")
    out = tmp_path / "out.jsonl"
    args = ["filter-commits", "--input", str(src), "--output", str(out), "--skip-rules", "token-length"]
    assert main(args) == 1  # fail mode: one line naming file:line, nothing written, no traceback
    err = capsys.readouterr().err
    assert f"{src}:2: lone surrogate: 'message'" in err and "Traceback" not in err and not out.exists()
    assert main(args + ["--on-error", "skip"]) == 0
    res = capsys.readouterr().out
    assert "rows read 3, written 2, skipped 1 (lone surrogate: 1)" in res
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [BASE, BASE]


def test_the_one_jsonl_writer_refuses_unencodable_rows_before_writing(tmp_path):
    from megaocto.data.jsonl import UnencodableRowError, encode_row, write_jsonl_row

    assert encode_row({"a": "ü ✓", "b": 1}) == '{"a": "ü ✓", "b": 1}\n'  # CommitPack style: raw UTF-8, LF
    path = tmp_path / "w.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        write_jsonl_row(f, {"a": "ok"})
        for row, key in (({"a": "x", "nested": {"k": ["y", "\udcff"]}}, "nested.k[1]"),
                         ({"\ud800": "key itself"}, "\ud800")):
            with pytest.raises(UnencodableRowError) as e:
                write_jsonl_row(f, row)
            assert e.value.key == key and e.value.category == "lone surrogate"
        write_jsonl_row(f, {"a": "still ok"})
    assert path.read_text(encoding="utf-8") == '{"a": "ok"}\n{"a": "still ok"}\n'  # no half-written line


def test_output_has_exactly_the_commitpackft_columns_and_needs_lang_and_repos(tmp_path, capsys):
    """Upstream select_columns: the 10 CommitPackFT columns in order, nothing else; a row without lang/repos is
    a bad row (the extension rule reads lang), not a row written without them."""
    from megaocto.data.filters import COMMITPACKFT_COLUMNS

    extra = dict(BASE, stars=5, path_hash="ab")
    extra = {k: extra[k] for k in reversed(list(extra))}  # input key order differs too
    no_lang = {k: v for k, v in BASE.items() if k != "lang"}
    no_repos = {k: v for k, v in BASE.items() if k != "repos"}
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in (extra, no_lang, no_repos)))
    out = tmp_path / "out.jsonl"
    args = ["filter-commits", "--input", str(src), "--output", str(out), "--skip-rules", "token-length"]
    assert main(args) == 1
    assert f"{src}:2: missing key: 'lang'" in capsys.readouterr().err
    assert main(args + ["--on-error", "skip"]) == 0
    assert "rows read 3, written 1, skipped 2 (missing key: 2)" in capsys.readouterr().out
    (line,) = out.read_text(encoding="utf-8").splitlines()
    assert list(json.loads(line)) == list(COMMITPACKFT_COLUMNS) and json.loads(line) == BASE
