"""Hostile programs are contained and scored as failures: an infinite loop, a fork bomb, a 10 GB allocation,
writing outside the temp dir, a flood of output and network access (Python), plus an infinite loop, a fork bomb
and a huge allocation in C++. A harmless program passes in the same executor (so the failures are real).

Python programs run under the harness's reliability_guard (os.fork is None, stdout is swallowed), so the hostile
ones here call posix.fork / posix.write, as a hostile program would to get around it: the sandbox must hold anyway."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from megaocto.eval import execute
from megaocto.eval.execute import Executor, sandbox_features
from megaocto.eval.toolchains import ToolchainError, check


# The executors of this module work under their own dir (world-traversable: programs may run as `nobody`), so the
# leftover check does not see other evaluations running on the machine.
WORKDIR = Path(tempfile.mkdtemp(prefix="megaocto-sandbox-test-"))
WORKDIR.chmod(0o755)


@pytest.fixture(scope="module", autouse=True)
def _cleanup_workdir():
    yield
    shutil.rmtree(WORKDIR, ignore_errors=True)


def _leftovers() -> list[int]:
    """Processes still running inside this module's executor temp dirs (the sandbox must leave none)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd.startswith(str(WORKDIR)):
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def py():
    return Executor("python", timeout=3, workdir=WORKDIR)


def test_control_program_passes(py):
    res = py.run("import sys\nassert sum(range(10)) == 45\n")
    assert res.passed and res.status == "passed"
    assert not py.run("assert 1 == 2\n").passed


def test_infinite_loop_times_out(py):
    res = py.run("while True:\n    pass\n")
    assert not res.passed and res.status == "timeout"
    assert _leftovers() == []


def test_fork_bomb_is_contained(py):
    bomb = ("import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n")
    res = py.run(bomb)
    assert not res.passed
    assert _leftovers() == []  # every forked child is gone (PID namespace / process group kill)
    assert py.run("print()\n").passed  # the machine still starts processes


def test_fork_bomb_does_not_starve_a_program_beside_it():
    if not sandbox_features()["drop_user"]:
        pytest.skip("not root (or no setpriv): all programs share the caller's uid and process limit")
    bomb = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
    # starts 50 threads (each counts against RLIMIT_NPROC) while the bomb holds its own uid's limit
    busy = ("import threading, time\ntime.sleep(1.0)\nts = [threading.Thread(target=time.sleep, args=(0.2,)) "
            "for _ in range(50)]\n[t.start() for t in ts]\n[t.join() for t in ts]\n")
    bomb_res, busy_res = execute.run_programs("python", [bomb, busy], workers=2, timeout=4)
    assert not bomb_res.passed
    assert busy_res.passed, busy_res.detail


def test_ten_gigabyte_allocation_fails(py):
    res = py.run("x = bytearray(10 * 1024 ** 3)\nx[-1] = 1\n")
    assert not res.passed and res.status == "failed"
    assert "MemoryError" in res.detail


def test_writing_outside_the_temp_dir_is_refused(py):
    if not sandbox_features()["drop_user"]:
        pytest.skip("not root (or no setpriv): programs run as the calling user, see docs/eval.md")
    # a directory every user can enter and read, but only its owner (root) can write
    target_dir = Path(tempfile.mkdtemp(prefix="megaocto-protected-"))
    target_dir.chmod(0o755)
    target = target_dir / "pwned.txt"
    try:
        res = py.run(f"open({str(target)!r}, 'w').write('pwned')\n")
        assert not res.passed and "PermissionError" in res.detail
        assert not target.exists()
        # and inside its own dir, the file-size limit caps what it may write
        res = py.run("with open('big.bin', 'wb') as f:\n    for _ in range(200):\n        f.write(b'x' * (1 << 20))\n")
        assert not res.passed and res.status == "failed"
    finally:
        shutil.rmtree(target_dir, ignore_errors=True)


def test_output_flood_is_capped(py):
    res = py.run("import posix\nwhile True:\n    posix.write(1, b'x' * 65536)\n")
    assert not res.passed
    assert len(res.detail) <= 4096  # only a capped head/tail of the output is kept


def test_no_network(py):
    if not sandbox_features()["namespaces"]:
        pytest.skip("unshare --net is not available here (not root or no CAP_SYS_ADMIN); see docs/eval.md")
    res = py.run("import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\n")
    assert not res.passed and ("unreachable" in res.detail or "OSError" in res.detail)


def test_cpp_hostile_programs():
    try:
        check("cpp")
    except ToolchainError as e:
        pytest.skip(str(e))
    cpp = Executor("cpp", timeout=3, workdir=WORKDIR)
    assert cpp.run("int main(){ return 0; }\n").passed
    res = cpp.run("int main(){ volatile unsigned long i = 0; while (true) { i++; } }\n")
    assert not res.passed and res.status == "timeout"
    res = cpp.run("#include <unistd.h>\nint main(){ while (true) { fork(); } }\n")
    assert not res.passed
    res = cpp.run("#include <vector>\nint main(){ std::vector<char> v(10UL << 30, 1); return v[12345]; }\n")
    assert not res.passed and res.status == "failed"
    assert _leftovers() == []


def test_compile_errors_and_missing_toolchain_messages(monkeypatch):
    try:
        check("cpp")
    except ToolchainError as e:
        pytest.skip(str(e))
    res = Executor("cpp", timeout=3, workdir=WORKDIR).run("int main(){ this is not c++ }\n")
    assert res.status == "compile_error" and not res.passed
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None)
    with pytest.raises(ToolchainError, match=r"`go` not found on PATH; install the Debian package `golang-go`"):
        check("go")
    assert execute.MEMORY["java"] > execute.MEMORY["python"]  # JVM/V8/Go reserve more virtual memory


_NOT_ROOT_SCRIPT = r'''
import json, os, sys, time
from pathlib import Path
from megaocto.eval.execute import Executor, sandbox_features

workdir = Path(sys.argv[1])
feats = sandbox_features()
ex = Executor("python", timeout=3, workdir=workdir)
bomb = "import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
out = {"uid": os.geteuid(), "features": feats}
for name, program in (("control", "assert sum(range(10)) == 45\n"), ("wrong", "assert 1 == 2\n"),
                      ("loop", "while True:\n    pass\n"), ("bomb", bomb),
                      ("alloc", "x = bytearray(10 * 1024 ** 3)\nx[-1] = 1\n"),
                      ("flood", "import posix\nwhile True:\n    posix.write(1, b'x' * 65536)\n")):
    r = ex.run(program)
    out[name] = {"passed": r.passed, "status": r.status, "detail": r.detail[-300:], "len": len(r.detail)}
left = []
for e in os.listdir("/proc"):
    if e.isdigit() and int(e) != os.getpid():  # this script itself runs in workdir
        try:
            if os.readlink(f"/proc/{e}/cwd").startswith(str(workdir)):
                left.append(int(e))
        except OSError:
            pass
out["left"] = left
out["after"] = ex.run("print()\n").passed
print(json.dumps(out))
'''


def test_not_root_fallback_contains_hostile_programs():
    """The documented non-root path (rlimits + process group + timeout, no namespaces, no uid drop), run for real:
    this test (as root) starts the executor as `nobody` under a system Python with the repository on PYTHONPATH.
    A loop times out, a fork bomb / 10 GB allocation / output flood fail, no process is left in the work dir, and a
    harmless program still passes afterwards."""
    import json
    import subprocess

    setpriv, python = shutil.which("setpriv"), "/usr/bin/python3"
    if os.geteuid() != 0 or not setpriv or not os.access(python, os.X_OK):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to start the executor as `nobody` "
                    "(when not root, the other tests of this file already exercise this path)")
    repo = Path(__file__).resolve().parents[1]
    top = Path(tempfile.mkdtemp(prefix="megaocto-nobody-test-"))  # pytest's tmp_path is not enterable by nobody
    top.chmod(0o755)
    work = top / "work"
    work.mkdir()
    os.chown(work, 65534, 65534)
    try:
        _run_as_nobody(setpriv, python, repo, work)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _run_as_nobody(setpriv: str, python: str, repo: Path, work: Path) -> None:
    import json
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "PYTHONPATH": str(repo), "LANG": "C.UTF-8"}
    probe = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--", python, "-c",
                            "import megaocto.eval.execute"], env=env, cwd=work, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"the repository is not importable by `nobody` with {python}: {probe.stderr[-300:]}")
    proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--", python, "-c",
                           _NOT_ROOT_SCRIPT, str(work)], env=env, cwd=work, capture_output=True, text=True,
                          timeout=120)  # normally ~7 s; a hang means a timed-out program was never killed
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] == 65534 and out["features"] == {"namespaces": False, "drop_user": False}
    assert out["control"]["passed"] and not out["wrong"]["passed"]
    assert out["loop"]["status"] == "timeout"
    assert not out["bomb"]["passed"]
    assert out["alloc"]["status"] == "failed" and "MemoryError" in out["alloc"]["detail"]
    assert not out["flood"]["passed"] and out["flood"]["len"] <= 4096
    assert out["left"] == [] and out["after"]
