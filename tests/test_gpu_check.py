"""bench/gpu_check.sh: the one-GPU readiness check runs every part in its dry mode (CPU, tiny shapes) and prints
the summary table; the summary reports a part stopped at its time limit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "kernels", "train", "nccl", "attention", "train1b", "lora")


def test_dry_run_runs_every_part_and_prints_the_table(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path), PYTHON=sys.executable, DRY_RUN="1")
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    out = res.stdout
    assert res.returncode == 0, out + res.stderr
    assert "megaocto GPU check — DRY RUN" in out and "7/7 parts ok" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and
             line.split()[0] in PARTS and len(line.split()) > 2 and line.split()[1] in ("ok", "skip", "FAIL")}
    assert set(table) == set(PARTS), out
    assert all(row[1] == "ok" for row in table.values()), out
    for part in PARTS:  # each part ran in its own process under its own limit and left its result
        result = json.loads((tmp_path / f"{part}.json").read_text())
        rc, secs, limit = (tmp_path / f"{part}.rc").read_text().split()
        assert result["part"] == part and rc == "0" and float(secs) <= float(limit)
    assert "24/24 match" in out  # every Triton kernel vs its reference, fp32 and bf16
    assert "tiny-llama" in out and "megaocto triton" in out and "6N+12LHQT" in out


def test_summary_reports_timeouts_and_failures(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"dry": False, "device": "NVIDIA H100 80GB HBM3",
                                                    "budget_s": 480, "total_s": 470}))
    for part in PARTS[:4]:
        (tmp_path / f"{part}.rc").write_text("0 3.0 60")
        (tmp_path / f"{part}.json").write_text(json.dumps({"part": part, "status": "ok", "figure": f"{part} fine"}))
    (tmp_path / "attention.rc").write_text("124 100.0 100")  # stopped by timeout: no result file
    # train1b never started: the budget was spent
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "summary", "--dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1
    rows = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in PARTS}
    assert "TIMEOUT" in rows["attention"] and "stopped at its 100 s limit" in rows["attention"]
    assert "NOT RUN" in rows["train1b"] and "ok" in rows["nccl"]
    assert "NVIDIA H100 80GB HBM3" in res.stdout and "4/7 parts ok" in res.stdout
