import subprocess
import sys

from megaocto.cli import main
from megaocto.demo_repo import make_demo_repo


def test_cli_lists_commands_and_rejects_unknown(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "COMMAND" in out


def test_demo_repo_is_deterministic(tmp_path):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text('"""Doc."""\nimport os\n\n\ndef f():\n    return 1\n\n\nclass B:\n    x = 2\n')
    (src / "b.py").write_text("X = 1\n")
    heads = []
    for name in ("r1", "r2"):
        repo = make_demo_repo(tmp_path / name, src)
        log = subprocess.run(["git", "log", "--format=%H %s"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.splitlines()
        heads.append(log)
    assert heads[0] == heads[1]
    subjects = [line.split(" ", 1)[1] for line in reversed(heads[0])]  # oldest first
    # b.py (sorted first) arrives whole; a.py in two commits: header + f, then class B.
    assert len(subjects) == 3
    assert subjects[0] == "Add b module"
    assert " f " in subjects[1] + " " and " B " in subjects[2] + " "
    # reusing a complete repository is a no-op
    assert make_demo_repo(tmp_path / "r1", src) == tmp_path / "r1"
