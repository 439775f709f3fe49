"""Sandboxed execution of HumanEvalPack programs in six languages.

Contract: :func:`run_program(lang, program, ...)` writes one complete program (candidate + tests, as built by
``megaocto.eval.humanevalpack.build_program``) into a fresh temp dir, compiles it when the language needs to, runs
it and returns an :class:`ExecResult` (``passed`` plus a short ``status``/``detail``), judged as the harness judges
it (docs/eval.md, "What passes"): Python is exec()'d under the harness's reliability_guard by ``harness_python.py``
and passes only when exec returns; JS passes iff it prints nothing; the others iff the run exits 0 (Go's test
binary with ``-test.paniconexit0``, as ``go test`` runs it). It never raises for a bad program; a missing
toolchain raises :class:`~megaocto.eval.toolchains.ToolchainError` naming the package.
:func:`run_programs` runs many in parallel (a thread pool of subprocesses).

Sandbox (every compile and run step):
- its own temp dir (removed afterwards) and its own process group (``start_new_session``);
- rlimits set in ``preexec_fn``: RLIMIT_AS (address space; per language, see ``MEMORY``: 4 GiB for Python,
  C++, Rust; more for Node, Java and Go, whose runtimes reserve large virtual ranges up front; each JVM also
  gets ``-Xmx``), RLIMIT_CPU (= the timeout), RLIMIT_FSIZE (64 MiB per written file), RLIMIT_NPROC (256) and no
  core files;
- when running as root and ``unshare`` works (Linux, CAP_SYS_ADMIN): a new network namespace (no network, only a
  down loopback) and a new PID namespace (``unshare --net --pid --fork --kill-child``): when the program's
  first process ends or is killed, the kernel kills every process it left behind, including ones that called
  setsid — a fork bomb or a background process cannot outlive its timeout;
- as root, the program itself (not the trusted compilers, which need root-owned caches such as ~/.rustup or
  GOCACHE) runs as an unprivileged uid of its own (``setpriv --reuid``; see :func:`sandbox_uid`, a uid no account
  uses, one per running program): it cannot write outside its temp dir and world-writable dirs such as /tmp, and
  RLIMIT_NPROC (which does not restrict root, and counts every process of a uid) bounds that program alone — a
  fork bomb cannot starve the programs running beside it;
- without root (or without ``unshare``/``setpriv``), only the rlimits, the process group and the timeout apply:
  programs then run as the calling user with network access (documented in docs/eval.md);
- on timeout the whole process group is killed with SIGKILL; stdout/stderr go to files in the temp dir (capped
  by RLIMIT_FSIZE, so a flood of output kills the program with SIGXFSZ instead of filling memory or disk) and only
  the first ``OUTPUT_CAP`` bytes are read back.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from megaocto.eval import toolchains
from megaocto.eval.toolchains import Toolchain

GiB = 1 << 30
# Address-space limits per language: runtimes that reserve big virtual ranges (V8's cage, the JVM's heap + code
# cache + class space, Go's arenas) need more than the resident memory they use.
MEMORY = {"python": 4 * GiB, "cpp": 4 * GiB, "rust": 4 * GiB, "js": 16 * GiB, "java": 8 * GiB, "go": 8 * GiB}
COMPILE_MEMORY = 8 * GiB
JAVA_OPTS = toolchains.JAVA_OPTS
# Run-step timeouts (seconds): the harness's python 10, js 10, go 20; Java 30 because compiling happens in the same
# JVM here (the harness gives javac 5 x 5 s, then 10 s to run); C++ and Rust test runs are short once compiled
# (the harness's 60 s / 300 s include compiling, which gets COMPILE_TIMEOUT here).
TIMEOUTS = {"python": 10.0, "js": 10.0, "java": 30.0, "cpp": 10.0, "go": 20.0, "rust": 20.0}
COMPILE_TIMEOUT = {"cpp": 60.0, "go": 60.0, "rust": 120.0}
FILE_SIZE = 64 << 20
NPROC = 256  # per program: each program has its own uid
OUTPUT_CAP = 16 << 10
UID_BASE = 1_500_000_000  # far above any account's uid; + (pid % 4096) * 64 + slot


@dataclass
class RunResult:
    """One sandboxed process: exit code (negative = signal), captured output heads, timing."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


@dataclass
class ExecResult:
    """Outcome of one program: ``passed``; ``status`` is passed | failed | timeout | compile_error | error."""

    passed: bool
    status: str
    detail: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"passed": self.passed, "status": self.status, "detail": self.detail, "seconds": round(self.seconds, 3)}


@lru_cache(maxsize=1)
def sandbox_features() -> dict[str, bool]:
    """What this machine allows: {'namespaces': unshare --net --pid works, 'drop_user': setpriv to another uid}."""
    root = os.geteuid() == 0
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")

    def ok(argv: list[str]) -> bool:
        try:
            return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    ns = bool(root and unshare and ok([unshare, "--net", "--pid", "--fork", "--kill-child", "--", "true"]))
    drop = bool(root and setpriv and ok([setpriv, f"--reuid={UID_BASE}", f"--regid={UID_BASE}",
                                         "--clear-groups", "--", "true"]))
    return {"namespaces": ns, "drop_user": drop}


class _UidPool:
    """Unprivileged uids for concurrently running programs of this process (thread-safe)."""

    def __init__(self, size: int = 64):
        self._free = list(range(size))
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self):
        with self._lock:
            if not self._free:
                raise RuntimeError("more than 64 programs at once in one process; lower --workers")
            slot = self._free.pop()
        try:
            yield UID_BASE + (os.getpid() % 4096) * 64 + slot
        finally:
            with self._lock:
                self._free.append(slot)


_UIDS = _UidPool()


def sandbox_uid():
    """Context manager yielding a uid for one program: no account uses it, no other running program has it."""
    return _UIDS.take()


def _limits(memory: int, cpu_seconds: float) -> Callable[[], None]:
    cpu = max(1, int(cpu_seconds) + 1)

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE, FILE_SIZE))
        resource.setrlimit(resource.RLIMIT_NPROC, (NPROC, NPROC))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


_PY_HARNESS = "_megaocto_harness.py"


@lru_cache(maxsize=1)
def _py_harness_source() -> str:
    return (Path(__file__).resolve().parent / "harness_python.py").read_text(encoding="utf-8")


def _read_head(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(OUTPUT_CAP).decode("utf-8", "replace")
    except OSError:
        return ""


def sandboxed_run(argv: Sequence[str], cwd: Path, *, timeout: float, memory: int, uid: int | None = None,
                  env: dict[str, str] | None = None) -> RunResult:
    """Run `argv` in `cwd` under the sandbox described in the module docstring.

    With `uid` (untrusted programs, when root) the program runs as that uid; compilers (uid None) keep the
    caller's user but still get the namespaces, rlimits and timeout. Output beyond OUTPUT_CAP bytes is not read."""
    feats = sandbox_features()
    untrusted = uid is not None and feats["drop_user"]
    prefix: list[str] = []
    if feats["namespaces"]:
        prefix += ["unshare", "--net", "--pid", "--fork", "--kill-child", "--"]
    if untrusted:
        prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "TMPDIR": str(cwd),
                "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    base_env.update(env or {})
    out_path, err_path = cwd / ".stdout", cwd / ".stderr"
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        if untrusted:
            os.chown(out_path, uid, uid)
            os.chown(err_path, uid, uid)
        proc = subprocess.Popen([*prefix, *argv], cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=base_env, start_new_session=True, preexec_fn=_limits(memory, timeout))
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_tree(proc, namespaced=bool(feats["namespaces"]))
    return RunResult(proc.returncode, _read_head(out_path), _read_head(err_path), timed_out,
                     time.monotonic() - start)


def _group_members(pgid: int) -> list[int]:
    """PIDs in process group `pgid` (from /proc; only needed on timeouts)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state, ppid, pgrp, ...
            pids.append(int(entry))
    return pids


def _kill_tree(proc: subprocess.Popen, *, namespaced: bool) -> None:
    """Kill everything the run started and return only when it is gone.

    With a PID namespace, `unshare` (the group leader) is left alive while everything else in its group (the
    namespace's first process included) gets SIGKILL: the kernel then kills every process of the namespace (also
    ones that left the group with setsid) and `unshare` exits only after its child was reaped, i.e. after the
    namespace is empty. Without namespaces the process group is killed (a program that called setsid escapes)."""
    if proc.poll() is None and namespaced:
        for pid in _group_members(proc.pid):
            if pid != proc.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group may outlive its leader (a program's children)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


class Executor:
    """Runs complete HumanEvalPack programs of one language; shared set-up (PCH, crates, GOCACHE) done once."""

    def __init__(self, lang: str, *, timeout: float | None = None, cache_dir: Path | None = None,
                 workdir: Path | None = None):
        self.lang = lang
        self.toolchain: Toolchain = toolchains.prepare(lang, cache_dir)
        self.timeout = float(timeout) if timeout is not None else TIMEOUTS[lang]
        self._local = threading.local()  # the uid of the program this thread is running
        self.workdir = Path(workdir) if workdir is not None else None
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)

    def run(self, program: str) -> ExecResult:
        """Compile (if needed) and run one program in a fresh temp dir; never raises for a bad program."""
        tmp = Path(tempfile.mkdtemp(prefix=f"megaocto-eval-{self.lang}-", dir=self.workdir))
        try:
            with sandbox_uid() as uid:
                self._local.uid = uid if sandbox_features()["drop_user"] else None
                if self._local.uid is not None:
                    os.chown(tmp, uid, uid)
                return getattr(self, f"_run_{self.lang}")(program, tmp)
        except OSError as e:
            return ExecResult(False, "error", f"{type(e).__name__}: {e}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _chown(self, path: Path) -> None:
        if self._local.uid is not None:
            os.chown(path, self._local.uid, self._local.uid, follow_symlinks=False)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _write(self, tmp: Path, name: str, text: str) -> Path:
        path = tmp / name
        path.write_text(text, encoding="utf-8")
        return path

    def _compile(self, argv: list[str], tmp: Path, env: dict | None = None) -> ExecResult | None:
        res = sandboxed_run(argv, tmp, timeout=COMPILE_TIMEOUT[self.lang], memory=COMPILE_MEMORY, env=env)
        if res.timed_out:
            return ExecResult(False, "compile_error", f"compile timed out after {COMPILE_TIMEOUT[self.lang]:.0f}s",
                              res.seconds)
        if res.returncode != 0:
            return ExecResult(False, "compile_error", (res.stderr or res.stdout)[-2000:], res.seconds)
        for p in tmp.iterdir():
            self._chown(p)
        return None

    def _finish(self, res: RunResult, *, compile_s: float = 0.0) -> ExecResult:
        """The harness's verdict for java, cpp, go and rust: passed iff the run exits with status 0."""
        seconds = res.seconds + compile_s
        if res.timed_out:
            return ExecResult(False, "timeout", f"killed after {self.timeout:.0f}s", seconds)
        if res.returncode != 0:
            why = f"signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}"
            return ExecResult(False, "failed", f"{why}: {(res.stderr or res.stdout)[-1500:]}", seconds)
        return ExecResult(True, "passed", "", seconds)

    def _exec(self, argv: list[str], tmp: Path, env: dict | None = None) -> RunResult:
        return sandboxed_run(argv, tmp, timeout=self.timeout, memory=MEMORY[self.lang], uid=self._local.uid, env=env)

    # -- languages -------------------------------------------------------------------------------------------
    def _run_python(self, program: str, tmp: Path) -> ExecResult:
        # as the harness: exec() under its reliability_guard, passed only when exec returns (harness_python.py)
        token = secrets.token_hex(16)
        for name, text in (("main.py", program), (_PY_HARNESS, _py_harness_source()), (".megaocto-token", token)):
            self._chown(self._write(tmp, name, text))
        res = self._exec([self.toolchain.tools["python"], "-I", _PY_HARNESS], tmp)
        if res.timed_out:
            return ExecResult(False, "timeout", f"killed after {self.timeout:.0f}s", res.seconds)
        if _read_head(tmp / ".megaocto-result") == token:
            return ExecResult(True, "passed", "", res.seconds)
        if res.stderr.strip():
            return ExecResult(False, "failed", res.stderr[-1500:], res.seconds)
        why = f"signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}"
        return ExecResult(False, "failed", f"{why} before the program finished (e.g. os._exit): the harness scores "
                                           f"a program whose exec() does not return as a failure", res.seconds)

    def _run_js(self, program: str, tmp: Path) -> ExecResult:
        self._write(tmp, "test.js", program)
        modules = self.toolchain.extra.get("node_modules")
        if modules and "require(" in program:
            # a copy, not a link: the sandbox user may not read the cache (e.g. under /root)
            shutil.copytree(modules, tmp / "node_modules", symlinks=False)
            for p in [tmp / "node_modules", *(tmp / "node_modules").rglob("*")]:
                self._chown(p)
        # The harness's rule: passed iff stdout and stderr are both empty, whatever the exit status (a failing
        # console.assert prints "Assertion failed" and exits 0; a silent process.exit(1) passes there).
        res = self._exec([self.toolchain.tools["node"], "test.js"], tmp)
        if res.timed_out:
            return ExecResult(False, "timeout", f"killed after {self.timeout:.0f}s", res.seconds)
        if res.stderr or res.stdout:
            return ExecResult(False, "failed", f"output (js passes only when silent): "
                                               f"{(res.stderr or res.stdout)[-1500:]}", res.seconds)
        if res.returncode < 0:  # killed by a signal of the sandbox's limits (e.g. SIGXCPU): not a harness verdict
            return ExecResult(False, "failed", f"signal {-res.returncode} (a sandbox limit)", res.seconds)
        return ExecResult(True, "passed", "", res.seconds)

    def _run_java(self, program: str, tmp: Path) -> ExecResult:
        # One JVM compiles (in memory) and runs: `java Main.java` (source-file mode, JDK 11+) costs about 60% of
        # javac + java. That mode runs the first top-level class, so the imports move to the top and the test's
        # `public class Main` comes before the candidate's classes (the same program otherwise).
        lines = program.split("\n")
        imports = [ln for ln in lines if re.match(r"import\s+[\w.*]+\s*;\s*$", ln)]
        rest = "\n".join(ln for ln in lines if not re.match(r"import\s+[\w.*]+\s*;\s*$", ln))
        main = re.search(r"^public\s+class\s+Main\b", rest, flags=re.M)
        if main is not None:
            rest = rest[main.start():] + "\n" + rest[:main.start()]
        self._write(tmp, "Main.java", "\n".join(imports) + "\n" + rest)
        cds = self.toolchain.extra.get("cds_archive")
        opts = [*JAVA_OPTS, f"-XX:SharedArchiveFile={cds}", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"] if cds else JAVA_OPTS
        res = self._exec([self.toolchain.tools["java"], *opts, "Main.java"], tmp)
        if res.returncode != 0 and "error: compilation failed" in res.stderr:
            return ExecResult(False, "compile_error", res.stderr[-2000:], res.seconds)
        return self._finish(res)

    def _run_cpp(self, program: str, tmp: Path) -> ExecResult:
        self._write(tmp, "main.cpp", f'#include "{toolchains.CPP_HEADER}"\n{program}')
        t0 = time.monotonic()
        err = self._compile([self.toolchain.tools["g++"], *toolchains.CPP_FLAGS, "-I",
                             self.toolchain.extra["include_dir"], "main.cpp", "-o", "main.bin",
                             *toolchains.CPP_LIBS], tmp)
        if err is not None:
            return err
        res = self._exec(["./main.bin"], tmp)
        return self._finish(res, compile_s=time.monotonic() - t0 - res.seconds)

    def _run_go(self, program: str, tmp: Path) -> ExecResult:
        self._write(tmp, "main_test.go", program)
        env = {"GO111MODULE": "off", "GOPATH": self.toolchain.extra["GOPATH"], "GOCACHE": self.toolchain.extra["GOCACHE"],
               "GOFLAGS": "", "CGO_ENABLED": "0"}
        t0 = time.monotonic()
        err = self._compile([self.toolchain.tools["go"], "test", "-c", "-o", "main.test", "main_test.go"], tmp, env)
        if err is not None:
            return err
        # the flags `go test -timeout=Ns` gives the test binary: -test.paniconexit0 turns os.Exit(0) during a test
        # into a failure (a program must not pass by exiting before its asserts)
        res = self._exec(["./main.test", "-test.paniconexit0", f"-test.timeout={int(self.timeout)}s"], tmp,
                         {"GOMAXPROCS": "2"})
        return self._finish(res, compile_s=time.monotonic() - t0 - res.seconds)

    def _run_rust(self, program: str, tmp: Path) -> ExecResult:
        self._write(tmp, "main.rs", program)
        externs = json.loads(self.toolchain.extra["externs"])
        argv = [self.toolchain.tools["rustc"], "--edition", "2021", "--test", "main.rs", "-o", "main.test",
                "--cap-lints", "allow", "-L", f"dependency={self.toolchain.extra['deps_dir']}"]
        for name, path in sorted(externs.items()):
            argv += ["--extern", f"{name}={path}"]
        t0 = time.monotonic()
        err = self._compile(argv, tmp)
        if err is not None:
            return err
        res = self._exec(["./main.test", "--test-threads=1"], tmp)
        return self._finish(res, compile_s=time.monotonic() - t0 - res.seconds)


def run_programs(lang: str, programs: Sequence[str], *, workers: int = 2, timeout: float | None = None,
                 cache_dir: Path | None = None, progress: Callable[[int, int], None] | None = None) -> list[ExecResult]:
    """Run every program (same order as given) with `workers` parallel sandboxed subprocesses."""
    executor = Executor(lang, timeout=timeout, cache_dir=cache_dir)
    results: list[ExecResult | None] = [None] * len(programs)
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(executor.run, p): i for i, p in enumerate(programs)}
        for fut in as_completed(futures):
            results[futures[fut]] = fut.result()
            done += 1
            if progress is not None:
                progress(done, len(programs))
    return [r for r in results if r is not None]


def run_program(lang: str, program: str, *, timeout: float | None = None, cache_dir: Path | None = None) -> ExecResult:
    """One program; see :class:`Executor` (build an Executor yourself to run many)."""
    return Executor(lang, timeout=timeout, cache_dir=cache_dir).run(program)
