"""Decontamination benchmark: Aho-Corasick (megaocto instruct decontaminate) vs upstream's plain substring loop.

    .venv/bin/python bench/decontam_bench.py                      # 100k rows; loop timed on --loop-rows rows
    .venv/bin/python bench/decontam_bench.py --rows 2000 --loop-rows 200   # seconds: checks the harness

Rows are Magicoder-size (problem ~0.9 kB + solution ~1.4 kB, about the 75K release's average without the seed) of
random code-like text, with --plant of them containing a benchmark string. The patterns are every HumanEvalPack
(6 languages, docstrings + canonical solutions) and HumanEval string, as ``megaocto instruct decontaminate``
loads them (--humanevalpack DIR, default ../shared/data/humanevalpack or $MEGAOCTO_HUMANEVALPACK). Both matchers
search the same lower-cased joined text; the loop (upstream's ``find_substrings``) is timed on the first
--loop-rows rows only (it is slow) and its rate extrapolated. Both must agree on every timed row.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaocto.instruct.decontaminate import Decontaminator, load_benchmarks, naive_find  # noqa: E402

WORDS = ("def return for while if else import from class self value result items index data list dict "
         "append range len print sum count total number string parse input output node tree left right").split()


def make_rows(n: int, plant: int, strings: list[str], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(chars):
        out, size = [], 0
        while size < chars:
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))
            out.append(line)
            size += len(line) + 1
        return "\n".join(out)

    rows = [{"problem": text(900), "solution": text(1400)} for _ in range(n)]
    for i in rng.sample(range(n), min(plant, n)):
        rows[i]["solution"] += "\n" + rng.choice(strings)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--loop-rows", type=int, default=1000)
    ap.add_argument("--plant", type=int, default=100)
    ap.add_argument("--humanevalpack", default=os.environ.get("MEGAOCTO_HUMANEVALPACK",
                                                              "../shared/data/humanevalpack"))
    args = ap.parse_args()

    benchmarks = load_benchmarks(humanevalpack=args.humanevalpack)
    strings = [s for v in benchmarks.values() for s in v]
    t0 = time.perf_counter()
    dec = Decontaminator(benchmarks)
    build_s = time.perf_counter() - t0
    rows = make_rows(args.rows, args.plant, strings)
    texts = [dec.row_text(r, ["problem", "solution"]) for r in rows]

    t0 = time.perf_counter()
    ac = [dec.find(t) for t in texts]
    ac_s = time.perf_counter() - t0
    n_loop = min(args.loop_rows, len(texts))
    t0 = time.perf_counter()
    loop = [naive_find(t, benchmarks) for t in texts[:n_loop]]
    loop_s = time.perf_counter() - t0
    for a, b in zip(ac, loop):
        assert (a is None) == (b is None) and (a is None or (a.benchmark, a.substring) == (b.benchmark, b.substring))

    ac_rate, loop_rate = len(texts) / ac_s, n_loop / loop_s
    mb = sum(len(t) for t in texts) / 1e6
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, python "
          f"{platform.python_version()}")
    print(f"patterns: {len(strings)} strings ({dec.num_patterns} distinct lower-cased) from "
          f"{', '.join(f'{k} {len(v)}' for k, v in benchmarks.items())}; automaton built in {build_s:.2f}s")
    print(f"rows: {len(texts)} ({mb:.0f} MB of text, {mb * 1e3 / len(texts):.2f} kB/row), planted {args.plant}, "
          f"removed {sum(a is not None for a in ac)}")
    print(f"{'matcher':<22}{'rows timed':>12}{'seconds':>10}{'rows/s':>12}")
    print(f"{'aho-corasick':<22}{len(texts):>12}{ac_s:>10.2f}{ac_rate:>12.0f}")
    print(f"{'python substring loop':<22}{n_loop:>12}{loop_s:>10.2f}{loop_rate:>12.0f}")
    print(f"speed-up: {ac_rate / loop_rate:.0f}x (loop on {len(texts)} rows would take "
          f"{len(texts) / loop_rate:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
