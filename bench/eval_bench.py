"""HumanEvalPack execution benchmark and harness validity run.

For each language: every problem's canonical solution (must pass) and buggy solution (must fail), built through
the same prompt → post-processing → program path a model's output takes (``canonical_generations``), executed in
the sandbox with `--workers` parallel subprocesses. Prints per-language wall time for the canonical programs and
pass counts, and lists every problem that does not behave (canonical failing or buggy passing) with the reason.

    .venv/bin/python bench/eval_bench.py --data-dir ../shared/data/humanevalpack            # all 6 x 164 x 2
    .venv/bin/python bench/eval_bench.py --langs python,js --no-buggy --limit 20

Target (issue 8): all 984 canonical programs in <= 10 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megaocto.eval import humanevalpack as hep
from megaocto.eval.toolchains import LANGUAGES, prepare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/humanevalpack"),
                    help="directory with <lang>.jsonl (default: %(default)s)")
    ap.add_argument("--langs", default=",".join(LANGUAGES), help="comma-separated languages (default: all six)")
    ap.add_argument("--task", default="synthesize", choices=[t for t in hep.TASKS if t != "explain-describe"],
                    help="whose prompt/post-processing path builds the programs (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=2, help="parallel programs (default: %(default)s)")
    ap.add_argument("--limit", type=int, default=None, help="first K problems per language")
    ap.add_argument("--no-buggy", action="store_true", help="skip the buggy-solution run (timing only)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    report: dict = {}
    total_canonical = 0.0
    for lang in [s.strip() for s in args.langs.split(",") if s.strip()]:
        t0 = time.monotonic()
        prepare(lang)  # shared PCH / crates / GOCACHE; timed separately
        setup_s = time.monotonic() - t0
        problems = hep.load_problems(lang, args.data_dir)[:args.limit]
        row: dict = {"problems": len(problems), "setup_s": round(setup_s, 1)}
        bad: list[str] = []
        for kind in ("canonical",) if args.no_buggy else ("canonical", "buggy"):
            gens = hep.canonical_generations(args.task, lang, problems, buggy=kind == "buggy")
            t0 = time.monotonic()
            res = hep.evaluate(args.task, lang, gens, problems=problems, workers=args.workers)
            seconds = time.monotonic() - t0
            passed = sum(p["correct"] for p in res.problems)
            row[f"{kind}_s"] = round(seconds, 1)
            row[f"{kind}_passed"] = passed
            want = kind == "canonical"
            wrong = [i for i, p in enumerate(res.problems) if p["samples"][0]["passed"] != want]
            uncut_passes: set[str] = set()
            if want and wrong:  # does the program pass without the harness's post-processing?
                sub = [problems[i] for i in wrong]
                raw = hep.evaluate(args.task, lang, hep.canonical_generations(args.task, lang, sub, post=False),
                                   problems=sub, workers=args.workers)
                uncut_passes = {p["task_id"] for p in raw.problems if p["samples"][0]["passed"]}
            for i in wrong:
                p = res.problems[i]
                s = p["samples"][0]
                why = s["detail"].strip().replace("\n", " ")[:240] or "(no output)"
                if p["task_id"] in uncut_passes:
                    why = "post-processing cuts the solution (the uncut program passes): " + why
                bad.append(f"{p['task_id']} {kind} {s['status']}: {why}")
            if kind == "canonical":
                total_canonical += seconds
        row["misbehaving"] = bad
        report[lang] = row
        buggy = f", buggy passed {row['buggy_passed']}/{len(problems)} in {row['buggy_s']}s" if "buggy_s" in row else ""
        print(f"{lang:7s} canonical passed {row['canonical_passed']}/{len(problems)} in {row['canonical_s']}s "
              f"(setup {row['setup_s']}s){buggy}", flush=True)
        for line in bad:
            print(f"    {line}", flush=True)
    print(f"all canonical programs: {total_canonical:.1f}s with {args.workers} workers")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
