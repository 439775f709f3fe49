"""Runs one HumanEvalPack Python program the way bigcode-evaluation-harness judges it (standard library only).

The harness (``code_eval_octopack``'s execute.py, the same as ``bigcode_eval/tasks/custom_metrics/execute.py``)
runs ``exec(program, {})`` in a child process after its ``reliability_guard()`` and with stdout, stderr and stdin
swallowed by a write-only buffer; the program passes only when ``exec`` returns. So ``sys.exit(0)`` or
``raise SystemExit`` (caught as a BaseException), ``exit()``/``quit()`` (set to None by the guard) and
``os._exit(0)`` (the child ends without a result: scored "timed out") all fail before the asserts ran.

This file is copied next to the program (``main.py``) into its sandbox temp dir and run there by
:mod:`megaocto.eval.execute` as ``python -I _megaocto_harness.py``. It reads and deletes ``.megaocto-token`` (a
random value the program cannot see), applies the harness's guard, execs the program and writes the token to
``.megaocto-result`` only if ``exec`` returned; a traceback of any exception goes to the real stderr (the detail).
"""
import builtins
import contextlib
import faulthandler
import io
import os
import sys
import traceback

PROGRAM, TOKEN, RESULT = "main.py", ".megaocto-token", ".megaocto-result"


class _WriteOnly(io.StringIO):
    """The harness's WriteOnlyStringIO, minus the memory: text is type-checked and dropped; reading raises OSError."""

    def write(self, s):
        super().write(s[:0])
        return len(s)

    def read(self, *args, **kwargs):
        raise OSError

    def readline(self, *args, **kwargs):
        raise OSError

    def readlines(self, *args, **kwargs):
        raise OSError

    def readable(self, *args, **kwargs):
        return False


class _redirect_stdin(contextlib._RedirectStream):  # noqa: N801 (contextlib's naming)
    _stream = "stdin"


def _reliability_guard() -> None:
    """What the harness's reliability_guard() (called without a memory limit) disables."""
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    import shutil
    import subprocess

    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.help = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def main() -> None:
    with open(PROGRAM, encoding="utf-8") as f:
        source = f.read()
    with open(TOKEN, encoding="utf-8") as f:
        token = f.read()
    os.unlink(TOKEN)
    result = open(RESULT, "w", encoding="utf-8")
    stderr, exit_now = sys.__stderr__, os._exit
    _reliability_guard()
    passed = False
    try:
        sink = _WriteOnly()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), _redirect_stdin(sink):
            exec(source, {})
        passed = True
    except SystemExit as e:
        print(f"SystemExit({e.code!r}) before the program finished: the harness fails a program that exits "
              f"early", file=stderr)
    except BaseException:  # the harness: any exception, KeyboardInterrupt included, is a failure
        traceback.print_exc(limit=-8, file=stderr)
    if passed:
        result.write(token)
    result.close()
    stderr.flush()
    exit_now(0)  # threads the program left running do not keep the verdict waiting (the harness: same)


if __name__ == "__main__":
    main()
