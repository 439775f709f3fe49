"""Preprocessing throughput: megaocto preprocess vs a Megatron-style pipeline vs the raw tokenizer ceiling.

    python bench/preprocess_bench.py [--data /work/shared/data/commits] [--workers 1 2] [--scale 10]

Data: every row of DATA/*.jsonl rendered as commits-pretrain text into one {"text": ...} jsonl (as in
reference/preprocess-baseline.md); tokenizer: 32k byte-level BPE trained on old/new contents of the same rows
(cached in --work). For each worker count N it measures, on the same text:
  megaocto   `megaocto preprocess --format text --workers N` (subprocess; wall time incl. start-up)
  megatron   a re-implementation of tools/preprocess_data.py: Pool(N).imap(per-document encode, chunksize 25)
             over the file's lines, a single writer appending every document in the main process
  ceiling    raw tokenizer, texts preloaded, best of (a) encode_batch with N Rayon threads and (b) N independent
             processes each encoding its contiguous share (timed from a barrier to the slowest finisher)
and then peak RSS (main + workers, sampled from /proc) of megaocto for 1x and --scale x the input.
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def prepare(data_dir: str, work: str) -> tuple[str, str, int, int]:
    """(text jsonl, tokenizer path, docs, text bytes)."""
    os.makedirs(work, exist_ok=True)
    text_path, tok_path = os.path.join(work, "commits_text.jsonl"), os.path.join(work, "tokenizer32k.json")
    files = sorted(glob.glob(os.path.join(data_dir, "*.jsonl")))
    if not os.path.exists(text_path):
        from megaocto.data.jsonl import write_jsonl_row

        with open(text_path + ".tmp", "w", encoding="utf-8") as out:
            for p in files:
                for line in open(p, encoding="utf-8"):
                    r = json.loads(line)
                    text = (f"<commit_before>{r['old_contents']}<commit_msg>{r['subject']}"
                            f"<commit_after>{r['new_contents']}")
                    write_jsonl_row(out, {"text": text})
        os.replace(text_path + ".tmp", text_path)
    if not os.path.exists(tok_path):
        from megaocto.data.tokenizer import train_bpe_tokenizer
        train_bpe_tokenizer(files, 32768, tok_path, json_keys=["old_contents", "new_contents"])
    docs = nbytes = 0
    for line in open(text_path, encoding="utf-8"):
        docs += 1
        nbytes += len(json.loads(line)["text"].encode())
    return text_path, tok_path, docs, nbytes


# --- Megatron-style baseline ------------------------------------------------------------------------------
_ENC: dict = {}


def _mt_init(tok_path):
    from tokenizers import Tokenizer
    _ENC["tok"] = Tokenizer.from_file(tok_path)
    _ENC["eod"] = _ENC["tok"].token_to_id("<|endoftext|>")


def _mt_encode(line):
    data = json.loads(line)
    ids = _ENC["tok"].encode(data["text"]).ids
    ids.append(_ENC["eod"])
    return {"text": ids}, len(line)


def megatron_style(text_path, tok_path, workers, out_prefix):
    """tools/preprocess_data.py's shape: Pool.imap over lines, per-doc encode, one writer in the main process."""
    from megaocto.data.indexed import MMapIndexedDatasetBuilder
    fin = open(text_path, encoding="utf-8")
    pool = mp.get_context("fork").Pool(workers, initializer=_mt_init, initargs=(tok_path,))
    encoded = pool.imap(_mt_encode, fin, 25)
    builder = MMapIndexedDatasetBuilder(out_prefix + ".bin", np.uint16)
    tokens = 0
    for doc, _ in encoded:
        ids = doc["text"]
        builder.add_item(np.array(ids, dtype=np.int64))
        builder.end_document()
        tokens += len(ids)
    builder.finalize(out_prefix + ".idx")
    pool.close()
    pool.join()
    return tokens


# --- raw ceiling ------------------------------------------------------------------------------------------
def _load_texts(text_path, part=0, parts=1):
    texts = [json.loads(line)["text"] for line in open(text_path, encoding="utf-8")]
    n = len(texts)
    return texts[part * n // parts:(part + 1) * n // parts]


def _raw_proc(text_path, tok_path, part, parts, barrier, q):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path)
    texts = _load_texts(text_path, part, parts)
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = sum(len(e.ids) for e in tok.encode_batch_fast(texts))
    q.put((time.perf_counter() - t0, time.process_time() - c0, tokens))


def raw_processes(text_path, tok_path, n):
    ctx = mp.get_context("spawn")
    barrier, q = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_raw_proc, args=(text_path, tok_path, i, n, barrier, q)) for i in range(n)]
    for p in procs:
        p.start()
    res = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return max(r[0] for r in res), sum(r[1] for r in res), sum(r[2] for r in res)


_BATCH_CHILD = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
texts = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
t0, c0 = time.perf_counter(), time.process_time()
n = sum(len(e.ids) for e in tok.encode_batch_fast(texts))
print(json.dumps([time.perf_counter() - t0, time.process_time() - c0, n]))
"""


def raw_batch_threads(text_path, tok_path, n):
    env = dict(os.environ, RAYON_NUM_THREADS=str(n), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", _BATCH_CHILD, text_path, tok_path], env=env, check=True,
                         capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


# --- megaocto ---------------------------------------------------------------------------------------------
def _tree_rss_kb(pid: int) -> int:
    """RSS of pid and all its descendants (kB), from /proc."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


def _children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def megatron_run(text_path, tok_path, workers, out_prefix):
    """(wall, cpu) of the Megatron-style pipeline in a fresh process (start-up included, as for megaocto)."""
    c0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run([sys.executable, __file__, "--_megatron", text_path, tok_path, str(workers), out_prefix],
                   check=True, cwd=REPO)
    return time.perf_counter() - t0, _children_cpu() - c0


def megaocto_run(inputs, tok_path, workers, out_prefix):
    """Wall time, CPU seconds (all processes), tokens and peak tree RSS (MiB) of `megaocto preprocess`."""
    cmd = [sys.executable, "-m", "megaocto.cli", "preprocess", "--input", *inputs, "--tokenizer", tok_path,
           "--output-prefix", out_prefix, "--workers", str(workers), "--log-interval", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    c0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    th.join()
    if proc.returncode:
        raise RuntimeError(f"megaocto preprocess failed:\n{out}\n{err}")
    from megaocto.data.indexed import MMapIndexedDataset
    tokens = MMapIndexedDataset(out_prefix + "_text_document").num_tokens
    return wall, _children_cpu() - c0, tokens, peak[0] / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/commits")
    ap.add_argument("--work", default="/tmp/megaocto_preprocess_bench")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best wall time is kept")
    ap.add_argument("--scale", type=int, default=10, help="input multiple for the RSS check (0 = skip)")
    ap.add_argument("--_megatron", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._megatron:
        text_path, tok_path, n, out = args._megatron
        megatron_style(text_path, tok_path, int(n), out)
        return
    text_path, tok_path, docs, nbytes = prepare(args.data, args.work)
    mb = nbytes / 1e6
    print(f"input: {docs} docs, {mb:.2f} MB text, {os.path.getsize(text_path) / 1e6:.2f} MB jsonl; "
          f"loadavg before: {os.getloadavg()}", flush=True)
    kinds = {
        "ceiling: encode_batch, N threads": lambda n: raw_batch_threads(text_path, tok_path, n)[:2],
        "ceiling: N processes": lambda n: raw_processes(text_path, tok_path, n)[:2],
        "megatron-style preprocess": lambda n: megatron_run(text_path, tok_path, n,
                                                            os.path.join(args.work, f"mt{n}")),
        "megaocto preprocess": lambda n: megaocto_run([text_path], tok_path, n,
                                                      os.path.join(args.work, f"mo{n}"))[:2],
    }
    best: dict = {}
    for r in range(args.repeats):
        for n in args.workers:
            for name, fn in kinds.items():
                wall, cpu = fn(n)
                print(f"  round {r} {name:34s} N={n} {wall:7.2f} s wall {cpu:7.2f} s cpu", flush=True)
                if (name, n) not in best or wall < best[(name, n)][0]:
                    best[(name, n)] = (wall, cpu)
    tokens = _num_tokens(os.path.join(args.work, f"mo{args.workers[0]}_text_document"))
    print(f"\nbest of {args.repeats} (tokens incl. EOD: {tokens:,}):")
    print(f"{'':34s} {'N':>2s} {'wall s':>7s} {'docs/s':>7s} {'MB/s':>6s} {'tok/s':>10s} {'cpu s':>7s} "
          f"{'MB/cpu-s':>8s}")
    for n in args.workers:
        for name in kinds:
            wall, cpu = best[(name, n)]
            print(f"{name:34s} {n:2d} {wall:7.2f} {docs / wall:7.1f} {mb / wall:6.2f} {tokens / wall:10,.0f} "
                  f"{cpu:7.2f} {mb / cpu:8.2f}")
        ceil = min(best[(k, n)][0] for k in kinds if k.startswith("ceiling"))
        ceil_cpu = min(best[(k, n)][1] for k in kinds if k.startswith("ceiling"))
        mo, mt = best[("megaocto preprocess", n)], best[("megatron-style preprocess", n)]
        print(f"  N={n}: megaocto/ceiling wall {ceil / mo[0]:.2f}, cpu-efficiency {ceil_cpu / mo[1]:.2f}; "
              f"megaocto/megatron-style speed {mt[0] / mo[0]:.2f}x")
    if 1 in args.workers and 2 in args.workers:
        sc = {k: best[(k, 1)][0] / best[(k, 2)][0] for k in kinds}
        print("scaling 1->2 workers (wall): " + ", ".join(f"{k.split(':')[0].split(' pre')[0]} "
                                                          f"{'(' + k.split(': ')[1] + ') ' if ': ' in k else ''}"
                                                          f"{v:.2f}x" for k, v in sc.items()))
    same = all(open(os.path.join(args.work, f"mo{n}_text_document.{e}"), "rb").read()
               == open(os.path.join(args.work, f"mo{args.workers[0]}_text_document.{e}"), "rb").read()
               for n in args.workers for e in ("bin", "idx"))
    print(f"megaocto outputs identical across worker counts: {same}")
    if args.scale:
        n = max(args.workers)
        w1, c1, t1, rss1 = megaocto_run([text_path], tok_path, n, os.path.join(args.work, "mo_1x"))
        wb, cb, tb, rssb = megaocto_run([text_path] * args.scale, tok_path, n, os.path.join(args.work, "mo_big"))
        print(f"peak RSS (main + {n} workers): 1x input {rss1:.0f} MiB ({w1:.1f} s), {args.scale}x input "
              f"{rssb:.0f} MiB ({wb:.1f} s, {args.scale * mb / wb:.2f} MB/s, tokens {tb:,} = {tb / t1:.1f}x)")
        for pre in ("mo_big", "mo_1x"):
            for e in ("bin", "idx"):
                os.remove(os.path.join(args.work, f"{pre}_text_document.{e}"))
    print(f"loadavg after: {os.getloadavg()}")


def _num_tokens(prefix):
    from megaocto.data.indexed import MMapIndexedDataset
    return MMapIndexedDataset(prefix).num_tokens


if __name__ == "__main__":
    main()
