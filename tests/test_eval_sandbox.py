"""Hostile programs are contained and scored as failures: an infinite loop, a fork bomb, a 10 GB allocation,
writing outside the temp dir, a flood of output and network access (Python), plus an infinite loop, a fork bomb
and a huge allocation in C++. A harmless program passes in the same executor (so the failures are real)."""
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
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n")
    res = py.run(bomb)
    assert not res.passed
    assert _leftovers() == []  # every forked child is gone (PID namespace / process group kill)
    assert py.run("print()\n").passed  # the machine still starts processes


def test_fork_bomb_does_not_starve_a_program_beside_it():
    if not sandbox_features()["drop_user"]:
        pytest.skip("not root (or no setpriv): all programs share the caller's uid and process limit")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
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
    res = py.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n")
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
