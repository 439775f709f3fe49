"""Time Megatron sample-index building: C++ (megaocto._helpers) vs the numpy fallback.

    python bench/index_bench.py --tokens 1e10 --seq-length 2048

Builds a synthetic corpus of random document sizes totalling ~--tokens tokens, one shuffled epoch
of doc_idx, then times build_sample_idx both ways (and checks they agree).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from megaocto.data import index_helpers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=1e9, help="corpus size in tokens (1e9..1e10)")
    p.add_argument("--mean-doc", type=int, default=1000, help="mean document length in tokens")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="best of N timings")
    args = p.parse_args()

    rng = np.random.default_rng(0)
    n_docs = max(1, int(args.tokens / args.mean_doc))
    sizes = (rng.exponential(args.mean_doc, size=n_docs).astype(np.int64) + 1).astype(np.int32)
    doc_idx = np.tile(np.arange(n_docs, dtype=np.int32), args.epochs)
    rng.shuffle(doc_idx)
    tpe = int(sizes.sum(dtype=np.int64))
    print(f"{n_docs:,} documents, {tpe:,} tokens/epoch, {args.epochs} epoch(s), seq_length {args.seq_length}, "
          f"{(args.epochs * tpe - 1) // args.seq_length:,} samples")

    def best(use_cpp):
        times, out = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = index_helpers.build_sample_idx(sizes, doc_idx, args.seq_length, args.epochs, tpe, use_cpp=use_cpp)
            times.append(time.perf_counter() - t0)
        return min(times), out

    t_np, a = best(False)
    print(f"numpy  : {t_np:8.3f} s")
    if index_helpers._cpp is None:
        print("C++    : megaocto._helpers not compiled (pip install -e . with a C++ compiler)")
        return
    t_cpp, b = best(True)
    same = np.array_equal(a, b)
    print(f"C++    : {t_cpp:8.3f} s   numpy/C++ = {t_np / t_cpp:.2f}x   identical: {same}")
    if not same:
        raise SystemExit("C++ and numpy sample indices differ")


if __name__ == "__main__":
    main()
