import subprocess

from megaocto.cli import main
from megaocto.demo_repo import make_demo_repo


def test_cli_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in ("train", "preprocess", "model-info", "demo"):
        assert name in out


def _log(repo):
    out = subprocess.run(["git", "log", "--reverse", "--format=%H %s", "--name-only"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def test_demo_repo_is_deterministic(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text('"""Doc."""\nimport os\n\n\ndef f():\n    """Return one."""\n    return 1\n'
                                      '\n\nclass B:\n    x = 2\n')
    (src / "b.py").write_text("X = 1\n")  # no definitions: contributes nothing
    logs = [_log(make_demo_repo(tmp_path / name, src)) for name in ("r1", "r2")]
    assert logs[0] == logs[1]  # same hashes: fixed author, committer and dates
    subjects = [line.split(" ", 1)[1] for line in logs[0] if " " in line]
    files = [line for line in logs[0] if " " not in line]
    # f: added bare, then documented; B has no docstring: one commit.
    assert len(subjects) == 3, subjects
    assert files == ["pkg/a_00.py", "pkg/a_00.py", "pkg/a_01.py"]
    assert " f" in subjects[0] and " f " in subjects[1] + " " and " B" in subjects[2]
    bare = subprocess.run(["git", "show", "HEAD~2:pkg/a_00.py"], cwd=tmp_path / "r1", capture_output=True,
                          text=True, check=True).stdout
    assert "Return one" not in bare and "return 1" in bare
    assert make_demo_repo(tmp_path / "r1", src) == tmp_path / "r1"  # a complete repo is reused
