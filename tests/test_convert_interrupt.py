"""A killed conversion: SIGTERM / SIGINT remove the partial output and exit 143 / 130 with one line (no traceback);
a SIGKILL-ed run's partial is removed by the next conversion into the same directory (only partials of dead
processes of this host; each removal is reported)."""
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from megaocto.cli import main
from megaocto.config.model import ModelConfig
from megaocto.convert import core
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs `megaocto convert reshard` with a hook that stops after the first layer was written (a file says so).
_CHILD = textwrap.dedent("""
    import os, sys, time
    from megaocto.convert import core
    step = core.Progress.step
    def slow_step(self, unit, nbytes):
        step(self, unit, nbytes)
        if self.done == 2:
            open(os.environ["READY_FILE"], "w").close()
            time.sleep(120)
    core.Progress.step = slow_step
    from megaocto.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    cfg = ModelConfig.from_preset("tiny-bigcode", vocab_size=131)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("src") / "ckpt")
    core.write_megaocto_checkpoint(path, cfg, build_model(cfg, ParallelContext.single()).state_dict(), 1,
                                   progress=False)
    return path


def _start(tmp_path, source, out):
    ready = str(tmp_path / "ready")
    env = {**os.environ, "READY_FILE": ready, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, "convert", "reshard", "--load", source, "--output", out,
                             "--tp", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"child did not reach the first layer: {proc.communicate()}")
        time.sleep(0.1)
    partials = [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert len(partials) == 1 and partials[0].endswith(f"-{proc.pid}"), partials  # it is mid-conversion
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_remove_the_partial_and_exit_cleanly(tmp_path, source, sig, code):
    out = str(tmp_path / "out")
    proc = _start(tmp_path, source, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    name = signal.Signals(sig).name
    lines = [ln for ln in err.splitlines() if not ln.startswith("[convert]")]  # the progress lines before it
    assert lines == [f"megaocto convert reshard: interrupted by {name}; nothing was written to {out} (the partial "
                     f"output was removed)"], err
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n] and not os.path.exists(out)


def test_sigkill_partial_is_removed_by_the_next_run(tmp_path, source, capsys):
    out = str(tmp_path / "out")
    proc = _start(tmp_path, source, out)
    proc.kill()
    proc.communicate(timeout=120)
    (stale,) = [n for n in os.listdir(tmp_path) if ".partial-" in n]
    # partials that must stay: a live process's (this test's parent), another host's, and a foreign directory
    live = tmp_path / f".other.partial-{re.sub(r'[^A-Za-z0-9_.]', '_', socket.gethostname())}-{os.getppid()}"
    remote = tmp_path / ".other.partial-some-other-node-99999999"
    foreign = tmp_path / ".notes.partial-draft"
    for d in (live, remote, foreign):
        d.mkdir()
    assert main(["convert", "reshard", "--load", source, "--output", out, "--tp", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"[convert] removed stale partial output {tmp_path / stale}" in err
    assert f"of process {proc.pid}, which is no longer running" in err
    left = sorted(n for n in os.listdir(tmp_path) if ".partial" in n)
    assert left == sorted(d.name for d in (live, remote, foreign))
    assert os.path.isdir(out)
