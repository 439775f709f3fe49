"""jsonl reader bad-input policy: every malformed case named with file:line, valid rows never lost."""
import json

import pytest

from megaocto.data.jsonl import BOM, BadRowError, JsonlReader

BAD_CASES = [  # (raw line bytes, category)
    (b'{"text": "truncated', "invalid JSON"),
    (b'["a", "list"]', "not an object"),
    (b'"just a string"', "not an object"),
    (b'{"other": "x"}', "missing key"),
    (b'{"text": null}', "null key"),
    (b'{"text": 42}', "non-string key"),
    (b'{"text": "bad \xff\xfe bytes"}', "invalid UTF-8"),
    (b"", "empty line"),
    (b"   \r", "empty line"),
    (b'{"text": "' + b"x" * 300 + b'"}', "oversized"),
    (b'{"text": "lone \\ud800 surrogate"}', "lone surrogate"),
]


def _valid(i):
    return {"text": f"valid row {i} ✓\r\nwith CRLF inside", "n": i}


def _write_mixed(path):
    """valid, bad, valid, bad, ..., valid; returns the valid rows and (line, category) of the bad ones."""
    lines, valid, bad = [], [], []
    for i, (raw, cat) in enumerate(BAD_CASES):
        valid.append(_valid(i))
        lines.append(json.dumps(valid[-1], ensure_ascii=False).encode())
        lines.append(raw)
        bad.append((len(lines), cat))
    valid.append(_valid(len(BAD_CASES)))
    lines.append(BOM + json.dumps(valid[-1]).encode())  # a second file's BOM (cat a.jsonl b.jsonl): a good row
    path.write_bytes(BOM + b"\r\n".join(lines))  # CRLF line ends, BOM at file start, no final newline
    return valid, bad


def test_skip_mode_keeps_every_valid_row_and_counts_each_reason(tmp_path):
    path = tmp_path / "mixed.jsonl"
    valid, bad = _write_mixed(path)
    reader = JsonlReader([str(path)], required_keys=["text"], on_error="skip", max_line_bytes=200)
    rows = list(reader)
    assert [r.data for r in rows] == valid
    assert [r.line for r in rows] == [2 * i + 1 for i in range(len(valid))]
    st = reader.stats
    assert st.rows_read == len(valid) + len(bad) and st.rows_ok == len(valid)
    expected = {}
    for _, cat in bad:
        expected[cat] = expected.get(cat, 0) + 1
    assert dict(st.skipped) == expected
    assert st.bom_files == 1 and st.bom_lines == 1
    summary = st.summary(written=len(valid))
    assert f"rows read {len(valid) + len(bad)}, written {len(valid)}, skipped {len(bad)}" in summary
    assert f"{path}:2: invalid JSON" in summary
    msg = str(next(e for e in st.examples if e.category == "invalid JSON"))
    assert "at at" not in msg and "(column " in msg


def test_bom_at_the_start_of_a_later_line_is_stripped_and_the_row_kept(tmp_path):
    """Concatenated files (cat a.jsonl b.jsonl) put b's BOM at the start of a middle line: the row is good."""
    path = tmp_path / "cat.jsonl"
    path.write_bytes(BOM + b'{"text": "a"}\n' + BOM + b'{"text": "b"}\n{"text": "c"}\n' + BOM + b'{"text": "d"}')
    for on_error in ("fail", "skip"):
        reader = JsonlReader([str(path)], required_keys=["text"], on_error=on_error)
        assert [r.data["text"] for r in reader] == ["a", "b", "c", "d"]
        assert reader.stats.rows_ok == 4 and not reader.stats.skipped
        assert (reader.stats.bom_files, reader.stats.bom_lines) == (1, 2)
        assert "UTF-8 BOM stripped at the start of 2 later line(s)" in reader.stats.summary()
    # a byte range that starts exactly at a BOM line (a parallel preprocess chunk) keeps it too
    start = len(BOM + b'{"text": "a"}\n')
    assert [r.data["text"] for r in JsonlReader([str(path)], ["text"], start=start, end=start + 5)] == ["b"]


def test_fail_mode_names_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    _, bad = _write_mixed(path)
    for line, cat in bad:
        # Cut the file just after the bad line so each case is the first failure.
        raw = path.read_bytes().split(b"\r\n")
        p = tmp_path / f"case{line}.jsonl"
        p.write_bytes(b"\n".join(raw[line - 2:line]) + b"\n")
        with pytest.raises(BadRowError) as e:
            list(JsonlReader([str(p)], required_keys=["text"], max_line_bytes=200))
        assert str(e.value).startswith(f"{p}:2: {cat}"), str(e.value)
        assert e.value.category == cat


def test_byte_ranges_partition_the_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    rows = [{"text": "y" * (i % 7) + str(i)} for i in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    size = path.stat().st_size
    for step in (1, 13, 100, size):
        got, line_total = [], 0
        for start in range(0, size, step):
            r = JsonlReader([str(path)], ["text"], start=start, end=min(start + step, size), line_offset=line_total)
            got.extend(r)
            line_total += r.lines_seen
        assert [g.data for g in got] == rows
        assert [g.line for g in got] == list(range(1, 51))


def test_missing_file_and_bad_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        list(JsonlReader([str(tmp_path / "nope.jsonl")]))
    with pytest.raises(ValueError, match="on_error"):
        JsonlReader([], on_error="ignore")


def test_raw_utf8_jsonl_is_written_only_through_the_safe_writer():
    """json.dumps(..., ensure_ascii=False) + a UTF-8 file is what raises UnicodeEncodeError on a lone surrogate at
    write time; megaocto writes such jsonl only through megaocto.data.jsonl.encode_row / write_jsonl_row."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for top in ("megaocto", "bench", "convert", "preprocess", "launch"):
        for d, _, files in os.walk(os.path.join(root, top)):
            for name in files:
                path = os.path.join(d, name)
                if name.endswith(".py") and not path.endswith(os.path.join("megaocto", "data", "jsonl.py")):
                    with open(path, encoding="utf-8") as f:
                        if "ensure_ascii=False" in f.read():
                            offenders.append(os.path.relpath(path, root))
    assert not offenders, f"write jsonl rows with megaocto.data.jsonl.write_jsonl_row instead: {offenders}"
