"""Commit extraction from a tmp git repo: added, modified, renamed, CRLF, binary, non-UTF-8, huge, multi-file."""
import json
import os
import subprocess

from megaocto.cli import main
from megaocto.data.git_commits import CommitsConfig, extract_commits, language_of, load_languages

ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
           GIT_COMMITTER_EMAIL="t@e", GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1")


def _git(repo, *args, input=None):
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=ENV,
                          input=input).stdout


def _commit(repo, files, message, deletes=(), moves=(), encoding=None):
    for src, dst in moves:
        _git(repo, "mv", src, dst)
    for name in deletes:
        _git(repo, "rm", "-q", name)
    for name, data in files.items():
        p = repo / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        _git(repo, "add", name)
    extra = ["-c", f"i18n.commitEncoding={encoding}"] if encoding else []
    msg = message.encode(encoding or "utf-8")
    subprocess.run(["git", "-C", str(repo), *extra, "commit", "-q", "--cleanup=verbatim", "-F", "-"], check=True,
                   env=ENV, input=msg, capture_output=True)
    return _git(repo, "rev-parse", "HEAD").decode().strip()


def _build_repo(root):
    repo = root / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "remote", "add", "origin", "https://github.com/acme/widgets.git")
    shas = {}
    shas["license"] = _commit(repo, {"LICENSE": b"MIT License\n\nPermission is hereby granted, free of charge\n"},
                              "Add license\n")  # no language for LICENSE
    shas["add"] = _commit(repo, {"src/app.py": b"def f():\n    return 1\n"}, "Add app\n")
    shas["modify"] = _commit(repo, {"src/app.py": b"def f():\n    return 2\n"}, "Return two\r\n\r\nBody line\r\n")
    shas["multi"] = _commit(repo, {"src/app.py": b"def f():\n    return 3\n", "src/b.py": b"x = 1\n"}, "Two files")
    shas["binary"] = _commit(repo, {"src/blob.c": b"int x;\x00\x01\x02"}, "Add binary\n")
    shas["rename"] = _commit(repo, {"src/main.py": b"def f():\n    return 3\n# renamed\n"}, "Rename app\n",
                             moves=[("src/app.py", "src/main.py")])
    shas["crlf_add"] = _commit(repo, {"web/index.js": b"var a = 1;\r\nvar b = 2;\r\n"}, "Add js\n")
    shas["crlf"] = _commit(repo, {"web/index.js": b"var a = 1;\r\nvar b = 3;\r\n"}, "Change b\n")
    shas["latin1"] = _commit(repo, {"src/l1.py": b"s = '\xe9t\xe9'\n"}, "Add latin-1 file\n")
    shas["huge"] = _commit(repo, {"docs/big.md": b"# big\n" + b"x" * 5000 + b"\n"}, "Add big doc\n")
    shas["delete"] = _commit(repo, {}, "Delete b\n", deletes=["src/b.py"])
    shas["msg_latin1"] = _commit(repo, {"src/main.py": b"def f():\n    return 4\n"}, "Caf\u00e9 fix\n",
                                 encoding="ISO-8859-1")
    shas["noeol_msg"] = _commit(repo, {"src/main.py": b"\xef\xbb\xbfdef f():\n    return 5\n"}, "Add BOM")
    return repo, shas


def test_extract_commits_from_tmp_repo(tmp_path, capsys):
    repo, shas = _build_repo(tmp_path)
    out = tmp_path / "out.jsonl"
    ex = extract_commits(str(repo), str(out), CommitsConfig(max_file_bytes=2000))
    rows = {r["commit"]: r for r in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert list(rows) == [shas[k] for k in ("noeol_msg", "msg_latin1", "crlf", "crlf_add", "rename", "modify",
                                            "add")]  # git log order, newest first
    for r in rows.values():
        assert list(r) == ["commit", "old_file", "new_file", "old_contents", "new_contents", "subject", "message",
                           "lang", "license", "repos"]
        assert r["license"] == "mit" and r["repos"] == "acme/widgets"
    add = rows[shas["add"]]
    assert add["old_contents"] == "" and add["new_contents"] == "def f():\n    return 1\n" and add["lang"] == "Python"
    mod = rows[shas["modify"]]
    assert mod["message"] == "Return two\r\n\r\nBody line\r\n" and mod["subject"] == "Return two"
    assert mod["old_contents"].endswith("1\n") and mod["new_contents"].endswith("2\n")
    ren = rows[shas["rename"]]
    assert (ren["old_file"], ren["new_file"]) == ("src/app.py", "src/main.py")
    assert ren["old_contents"] == "def f():\n    return 3\n" and ren["new_contents"].endswith("# renamed\n")
    crlf = rows[shas["crlf"]]
    assert crlf["new_contents"] == "var a = 1;\r\nvar b = 3;\r\n" and crlf["lang"] == "JavaScript"
    assert rows[shas["msg_latin1"]]["subject"] == "Caf\u00e9 fix"
    assert rows[shas["noeol_msg"]]["message"] == "Add BOM" and rows[shas["noeol_msg"]]["new_contents"][0] == "\ufeff"
    c = ex.counts
    assert c["commits"] == 13 and c["rows"] == 7
    assert c["skipped: multi-file commit"] == 1 and c["skipped: binary file"] == 1
    assert c["skipped: non-UTF-8 file"] == 1 and c["skipped: file over 2000 bytes"] == 1
    assert c["skipped: deleted file"] == 1 and c["skipped: no CommitPack language for the path"] == 1
    assert c["renames (kept)"] == 1 and c["CRLF contents (kept as is)"] == 2
    # CLI: no renames, a row limit, explicit license/name.
    assert main(["commits", "--repo", str(repo), "--output", str(tmp_path / "c.jsonl"), "--no-renames",
                 "--license", "apache-2.0", "--repo-name", "x/y", "--max-rows", "3"]) == 0
    text = capsys.readouterr().out
    assert "x/y (apache-2.0): 3 rows" in text
    cli_rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [r["commit"] for r in cli_rows] == [shas["noeol_msg"], shas["msg_latin1"], shas["huge"]]  # default limit


def test_language_table():
    langs = load_languages()
    assert language_of("a/b/setup.py", langs) == "Python"
    assert language_of("Makefile", langs) == "Makefile"
    assert language_of("README.md", langs) == "Markdown"
    assert language_of("LICENSE", langs) is None
