"""Per-language toolchains for HumanEvalPack execution: discovery, clear errors, shared precompiled dependencies.

Contract:
- :func:`check(lang)` returns a :class:`Toolchain` (absolute tool paths) or raises :class:`ToolchainError`
  naming the Debian package to install and the setup script (``launch/setup_toolchains.sh`` or
  ``megaocto eval setup-toolchains``).
- :func:`prepare(lang, cache_dir)` builds what every program of a language shares, once per cache dir and
  toolchain (guarded by a file lock, so parallel evaluations do not race):
  - cpp: a precompiled header ``megaocto_humaneval.h(.gch)`` holding the harness's ``#include`` preamble;
  - rust: one cargo project (rand 0.8, regex 1, md5 0.7 from Debian's offline registry) built once; programs are
    compiled with ``rustc --test --extern ...`` against its rlibs, each in its own temp dir, in parallel;
  - go: a shared ``GOCACHE`` (testify is compiled once; tests run in GOPATH mode, GOPATH=/usr/share/gocode).
- The cache dir defaults to ``$MEGAOCTO_EVAL_CACHE`` or ``~/.cache/megaocto/eval`` (the setup script writes the
  cargo config there too).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

LANGUAGES = ("python", "js", "java", "cpp", "go", "rust")
SETUP_HINT = "run `bash launch/setup_toolchains.sh` (or `megaocto eval setup-toolchains`)"

# Harness C++ preamble (code_eval_octopack prepends these before every program); compiled once as a PCH.
CPP_INCLUDES = ("stdlib.h", "algorithm", "math.h", "stdio.h", "vector", "string", "climits", "cstring", "iostream",
                "cassert", "map", "set", "unordered_map", "unordered_set", "list", "stack", "queue", "deque",
                "bitset", "numeric", "sstream", "boost/any.hpp", "openssl/md5.h")
CPP_HEADER = "megaocto_humaneval.h"
CPP_FLAGS = ("-std=c++11",)
CPP_LIBS = ("-lcrypto", "-lssl")

# JVM flags of every Java run (execute.py) — the CDS archive below is only valid for these.
JAVA_OPTS = ("-Xmx1g", "-Xss16m", "-XX:+UseSerialGC", "-XX:ReservedCodeCacheSize=64m", "-XX:-UsePerfData",
             "-XX:CompressedClassSpaceSize=128m", "-XX:TieredStopAtLevel=1")
JAVA_WARMUP = """\
import java.util.*;
import java.util.stream.*;
import java.security.*;
import java.math.BigInteger;

public class Main {
    public static void main(String[] args) throws Exception {
        Solution s = new Solution();
        List<Boolean> correct = Arrays.asList(s.f(Arrays.asList(1, 2, 3)) == 6, s.g("ab").equals("ba"));
        if (correct.contains(false)) {
            throw new AssertionError();
        }
    }
}

class Solution {
    public int f(List<Integer> xs) {
        Map<Integer, Integer> m = new HashMap<>();
        for (int x : xs) m.put(x, m.getOrDefault(x, 0) + 1);
        Optional<Integer> o = xs.stream().filter(x -> x > 0).max(Integer::compare);
        return xs.stream().mapToInt(Integer::intValue).sum() + (o.isPresent() ? 0 : 1) + new ArrayList<>(m.keySet()).size() - 3;
    }
    public String g(String t) throws Exception {
        MessageDigest.getInstance("MD5").digest(t.getBytes());
        return new StringBuilder(t).reverse().toString() + String.format("%s", "").trim();
    }
}
"""
RUST_DEPS = {"rand": "0.8", "regex": "1", "md5": "0.7"}
GOPATH_DEFAULT = "/usr/share/gocode"
# The shared cargo project's .cargo/config.toml (Debian's offline registry instead of crates.io); one file that
# launch/setup_toolchains.sh copies too.
CARGO_CONFIG_FILE = Path(__file__).resolve().parents[1] / "resources" / "cargo-debian-config.toml"


class ToolchainError(RuntimeError):
    """A language's toolchain or test dependency is missing; the message names the package to install."""


@dataclass
class Toolchain:
    """Resolved tools for one language (absolute paths) plus what :func:`prepare` built."""

    lang: str
    tools: dict[str, str]
    extra: dict[str, str] = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGAOCTO_EVAL_CACHE") or Path.home() / ".cache" / "megaocto" / "eval")


def _which(cmd: str, package: str, lang: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        raise ToolchainError(f"{lang}: `{cmd}` not found on PATH; install the Debian package `{package}` "
                             f"(apt-get install -y --no-install-recommends {package}) or {SETUP_HINT}")
    return path


def _need_file(path: str, package: str, lang: str, what: str) -> None:
    if not os.path.exists(path):
        raise ToolchainError(f"{lang}: {what} ({path}) is missing; install the Debian package `{package}` "
                             f"or {SETUP_HINT}")


def python_interpreter() -> str:
    """The interpreter for Python programs: this one, unless an unprivileged sandbox user could not run it (e.g. a
    pyenv under /root), then /usr/bin/python3."""
    exe = sys.executable
    if os.geteuid() != 0 or _world_executable(exe):
        return exe
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else exe


def _world_executable(path: str) -> bool:
    """True when every directory on the (resolved) path is world-searchable and the file world-executable."""
    p = Path(os.path.realpath(path))
    for part in [p, *p.parents]:
        try:
            mode = part.stat().st_mode
        except OSError:
            return False
        if not mode & 0o001:
            return False
    return True


def check(lang: str) -> Toolchain:
    """The toolchain for `lang` or a :class:`ToolchainError` naming the missing package."""
    if lang == "python":
        return Toolchain(lang, {"python": python_interpreter()})
    if lang == "js":
        return Toolchain(lang, {"node": _which("node", "nodejs", lang)})
    if lang == "java":
        return Toolchain(lang, {"javac": _which("javac", "default-jdk-headless", lang),
                                "java": _which("java", "default-jdk-headless", lang)})
    if lang == "cpp":
        tc = Toolchain(lang, {"g++": _which("g++", "g++", lang)})
        _need_file("/usr/include/boost/any.hpp", "libboost-dev", lang, "boost::any header")
        _need_file("/usr/include/openssl/md5.h", "libssl-dev", lang, "OpenSSL MD5 header")
        return tc
    if lang == "go":
        tc = Toolchain(lang, {"go": _which("go", "golang-go", lang)})
        gopath = os.environ.get("MEGAOCTO_GOPATH", GOPATH_DEFAULT)
        _need_file(f"{gopath}/src/github.com/stretchr/testify/assert", "golang-github-stretchr-testify-dev", lang,
                   "testify (GOPATH mode)")
        tc.extra["GOPATH"] = gopath
        return tc
    if lang == "rust":
        tc = Toolchain(lang, {"cargo": _which("cargo", "cargo", lang), "rustc": _real_rustc(_which("rustc", "rustc", lang))})
        registry = Path("/usr/share/cargo/registry")
        for crate, package in (("rand", "librust-rand-dev"), ("regex", "librust-regex-dev"), ("md5", "librust-md5-dev"),
                               ("aho-corasick", "librust-aho-corasick-dev"), ("memchr", "librust-memchr-dev")):
            if not list(registry.glob(f"{crate}-[0-9]*")):
                raise ToolchainError(f"rust: crate `{crate}` is missing from {registry}; install the Debian package "
                                     f"`{package}` or {SETUP_HINT}")
        return tc
    raise ToolchainError(f"unknown language {lang!r}; expected one of {', '.join(LANGUAGES)}")


def _real_rustc(rustc: str) -> str:
    """The toolchain's rustc binary rather than a rustup shim (the shim needs $HOME/.rustup, which sandboxed
    compile steps do not see)."""
    try:
        sysroot = subprocess.run([rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return rustc
    real = Path(sysroot) / "bin" / "rustc"
    return str(real) if sysroot and real.exists() else rustc


class _FileLock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _run_checked(argv: list[str], cwd: Path, what: str, env: dict | None = None, timeout: float = 900) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ToolchainError(f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def prepare(lang: str, cache_dir: Path | None = None) -> Toolchain:
    """:func:`check` plus the shared, precompiled dependencies of `lang` (idempotent; file-locked)."""
    tc = check(lang)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if lang == "js":
        modules = cache / "node" / "node_modules"
        if (modules / "js-md5" / "package.json").exists():
            tc.extra["node_modules"] = str(modules)
    elif lang == "java":
        archive = _prepare_java_cds(tc)
        if archive is not None:
            tc.extra["cds_archive"] = str(archive)
    elif lang == "cpp":
        tc.extra["include_dir"] = str(_prepare_cpp(tc, cache / "cpp"))
    elif lang == "go":
        gocache = cache / "go-build"
        gocache.mkdir(parents=True, exist_ok=True)
        tc.extra["GOCACHE"] = str(gocache)
    elif lang == "rust":
        tc.extra.update(_prepare_rust(tc, cache / "rust"))
    return tc


def sandbox_readable_dir() -> Path:
    """A directory the sandbox user can read (the cache may sit under a private home such as /root): owned by us,
    not group/world-writable, not a symlink."""
    base = Path(tempfile.gettempdir()) / f"megaocto-eval-shared-{os.geteuid()}"
    base.mkdir(mode=0o755, exist_ok=True)
    st = base.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ToolchainError(f"{base} is not a private directory of uid {os.geteuid()} (symlink, other owner or "
                             f"writable by others); remove it or set TMPDIR")
    base.chmod(0o755)
    return base


def _prepare_java_cds(tc: Toolchain) -> Path | None:
    """A dynamic CDS archive of the classes a HumanEvalPack run loads (javac's compiler included): about a quarter
    less CPU per `java Main.java`. None (and runs go on without it) when the JVM cannot make one."""
    root = sandbox_readable_dir()
    version = _version([tc.tools["java"], "-version"])
    archive = root / "java-humaneval.jsa"
    stamp = root / "java-humaneval.stamp"
    key = json.dumps([version, JAVA_OPTS, JAVA_WARMUP])
    with _FileLock(root / "java.lock"):
        if archive.exists() and stamp.exists() and stamp.read_text() == key:
            return archive
        with tempfile.TemporaryDirectory(prefix="megaocto-java-cds-") as tmp:
            (Path(tmp) / "Main.java").write_text(JAVA_WARMUP)
            out = Path(tmp) / "out.jsa"
            try:
                proc = subprocess.run([tc.tools["java"], *JAVA_OPTS, f"-XX:ArchiveClassesAtExit={out}", "Main.java"],
                                      cwd=tmp, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired):
                return None
            if proc.returncode != 0 or not out.exists():
                return None
            out.chmod(0o644)
            os.replace(out, archive)
        stamp.write_text(key)
    return archive


def _prepare_cpp(tc: Toolchain, root: Path) -> Path:
    """A PCH of the harness preamble; rebuilt when the compiler version or the preamble changes."""
    stamp_value = json.dumps([_version([tc.tools["g++"], "--version"]), CPP_INCLUDES, CPP_FLAGS])
    with _FileLock(root / ".lock"):
        stamp = root / "stamp.json"
        header, gch = root / CPP_HEADER, root / (CPP_HEADER + ".gch")
        if gch.exists() and stamp.exists() and stamp.read_text() == stamp_value:
            return root
        header.write_text("".join(f"#include<{h}>\n" for h in CPP_INCLUDES))
        tmp = root / (CPP_HEADER + ".gch.tmp")
        _run_checked([tc.tools["g++"], *CPP_FLAGS, "-x", "c++-header", str(header), "-o", str(tmp)], root,
                     "cpp: precompiling the HumanEvalPack header")
        os.replace(tmp, gch)
        stamp.write_text(stamp_value)
    return root


def write_cargo_project(root: Path) -> None:
    """The shared cargo project (Cargo.toml, src/lib.rs, .cargo/config.toml with the Debian registry)."""
    (root / ".cargo").mkdir(parents=True, exist_ok=True)
    (root / "src").mkdir(exist_ok=True)
    deps = "".join(f'{k} = "{v}"\n' for k, v in RUST_DEPS.items())
    (root / "Cargo.toml").write_text(f'[package]\nname = "megaocto_humaneval_deps"\nversion = "0.1.0"\n'
                                     f'edition = "2021"\n\n[dependencies]\n{deps}')
    (root / "src" / "lib.rs").write_text("// dependencies only; HumanEvalPack programs link against them\n")
    (root / ".cargo" / "config.toml").write_text(CARGO_CONFIG_FILE.read_text())


def _prepare_rust(tc: Toolchain, root: Path) -> dict[str, str]:
    """Build rand/regex/md5 once; return {'externs': json {crate: rlib}, 'deps_dir': ...}."""
    stamp_value = json.dumps([_version([tc.tools["rustc"], "--version"]), RUST_DEPS])
    with _FileLock(root.parent / "rust.lock"):
        stamp = root / "stamp.json"
        if stamp.exists():
            saved = json.loads(stamp.read_text())
            if saved.get("key") == stamp_value and all(os.path.exists(p) for p in saved["externs"].values()):
                return {"externs": json.dumps(saved["externs"]), "deps_dir": saved["deps_dir"]}
        write_cargo_project(root)
        out = _run_checked([tc.tools["cargo"], "build", "--offline", "--message-format=json"], root,
                           "rust: building the shared crates (rand, regex, md5)")
        externs: dict[str, str] = {}
        for line in out.splitlines():
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("reason") != "compiler-artifact":
                continue
            name = msg["target"]["name"]
            if name in RUST_DEPS and "lib" in msg["target"]["kind"]:
                externs[name] = next(f for f in msg["filenames"] if f.endswith(".rlib"))
        missing = sorted(set(RUST_DEPS) - set(externs))
        if missing:
            raise ToolchainError(f"rust: cargo built no rlib for {missing} in {root}; {SETUP_HINT}")
        deps_dir = str(Path(next(iter(externs.values()))).parent)
        stamp.write_text(json.dumps({"key": stamp_value, "externs": externs, "deps_dir": deps_dir}))
    return {"externs": json.dumps(externs), "deps_dir": deps_dir}


def setup_script() -> Path:
    """Path of launch/setup_toolchains.sh in a source checkout."""
    return Path(__file__).resolve().parents[2] / "launch" / "setup_toolchains.sh"
