"""Serving benchmark: `megaocto serve` with 1, 4 and 16 concurrent clients vs HF `generate`, side by side; and
LM-scoring (batched megaocto next-token logits) vs a plain HF forward loop.

    OMP_NUM_THREADS=2 .venv/bin/python bench/serve_bench.py              # the "small" model below
    .venv/bin/python bench/serve_bench.py --small                        # seconds: checks the harness

Model: a random GPTBigCode (MQA, learned positions) saved as a megaocto checkpoint and exported with
``megaocto convert to-hf``, so both sides run the same weights; default 6 layers × hidden 512 × 8 heads, 1024
positions, vocabulary = a byte-level BPE trained on a small code corpus. Every request: a random 64-token prompt
(token ids), 64 new tokens, greedy, ``ignore_eos`` (so every request decodes exactly 64 tokens on both sides).

* serve, C clients (C = 1, 4, 16): C threads, each sending --requests requests back to back through
  ``/v1/completions``; tokens/s = generated tokens / wall time (server in its own process, --max-batch 16).
* HF generate, batch 1 and batch C: the same prompts decoded with ``GPTBigCodeForCausalLM.generate`` (greedy,
  KV cache) one prompt at a time and C prompts per call (left-padded), in this process.
* LM-scoring: --score-codes prompts of 256 tokens; megaocto ``next_token_logits`` in batches of 16 vs one HF
  forward per prompt (the loop a script would write); codes/s.

Server and HF runs alternate level by level (never concurrently) and get the same thread count (--threads).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)


def make_checkpoint(root: str, *, layers: int, hidden: int, heads: int, positions: int) -> tuple[str, str, str]:
    import torch

    from megaocto import checkpoint as ckpt
    from megaocto.config.model import ModelConfig
    from megaocto.convert.hf import to_hf
    from megaocto.data.tokenizer import load_tokenizer, train_bpe_tokenizer
    from megaocto.model import build_model
    from megaocto.parallel.context import ParallelContext

    tok_path = os.path.join(root, "tok", "tokenizer.json")
    corpus = [f"def f_{i}(a, b):\n    return a * {i} + b  # {i}\n" for i in range(2000)]
    train_bpe_tokenizer(corpus, 1024, tok_path)
    vocab = load_tokenizer(tok_path).vocab_size
    cfg = ModelConfig.from_preset("tiny-bigcode", num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                  ffn_hidden_size=4 * hidden, vocab_size=vocab, seq_length=positions,
                                  max_position_embeddings=positions, init_method_std=0.05)
    torch.manual_seed(0)
    pc = ParallelContext.single()
    model = build_model(cfg, pc)
    load = os.path.join(root, "ckpt")
    ckpt.save_checkpoint(load, 1, {"model": model.state_dict()},
                         {"config": {"model": cfg.to_dict(), "data": {"tokenizer": tok_path}}}, pc)
    hf_dir = os.path.join(root, "hf")
    to_hf(load, hf_dir, progress=False)
    return load, tok_path, hf_dir


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.loads(r.read())


def bench_serve(url: str, prompts: list[list[int]], clients: int, new: int) -> tuple[float, int]:
    per = [prompts[i::clients] for i in range(clients)]

    def client(mine):
        n = 0
        for p in mine:
            r = post(url + "/completions", {"model": "bench", "prompt": p, "max_tokens": new, "temperature": 0,
                                            "ignore_eos": True})
            n += r["usage"]["completion_tokens"]
        return n

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, per))
    return time.perf_counter() - t0, tokens


def bench_hf(hf, prompts: list[list[int]], batch: int, new: int, pad_id: int) -> tuple[float, int]:
    import torch

    tokens = 0
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        longest = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, longest - len(p):] = torch.tensor(p)
            mask[i, longest - len(p):] = 1
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=pad_id)
        tokens += (out.shape[1] - longest) * len(chunk)
    return time.perf_counter() - t0, tokens


def bench_scoring(load: str, hf, codes: list[list[int]]) -> dict:
    import torch

    from megaocto.generation import load_checkpoint_model, next_token_logits

    model, _ = load_checkpoint_model(load)
    next_token_logits(model, codes[:2])  # warm-up
    t0 = time.perf_counter()
    ours = next_token_logits(model, codes, batch_size=16)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = []
    with torch.no_grad():
        for c in codes:
            ref.append(hf(torch.tensor([c])).logits[0, -1].float())
    hf_s = time.perf_counter() - t0
    diff = float((ours - torch.stack(ref)[:, :ours.shape[1]]).abs().max())
    return {"codes": len(codes), "megaocto_s": ours_s, "hf_loop_s": hf_s, "max_abs_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny model and few requests (harness check)")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default: 32)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--score-codes", type=int, default=64)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    shape = dict(layers=2, hidden=64, heads=4, positions=256) if args.small else \
        dict(layers=6, hidden=512, heads=8, positions=1024)
    prompt_len, new = (16, 8) if args.small else (64, 64)
    n_req = 8 if args.small else args.requests
    levels = (1, 4) if args.small else (1, 4, 16)

    with tempfile.TemporaryDirectory() as root:
        load, tok_path, hf_dir = make_checkpoint(root, **shape)
        from megaocto.data.tokenizer import load_tokenizer
        tok = load_tokenizer(tok_path)
        rng = random.Random(0)
        prompts = [[rng.randrange(20, tok.vocab_size) for _ in range(prompt_len)] for _ in range(n_req)]

        port = 18000 + os.getpid() % 1000
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        server = subprocess.Popen([sys.executable, "-m", "megaocto.cli", "serve", "--load", load, "--port", str(port),
                                   "--model-name", "bench", "--max-batch", "16", "--batch-wait-ms", "10"],
                                  env=env, cwd=REPO, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            for _ in range(600):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.2)
            from transformers import GPTBigCodeForCausalLM
            hf = GPTBigCodeForCausalLM.from_pretrained(hf_dir).eval()
            bench_serve(url, prompts[:2], 1, 2)  # warm-up
            bench_hf(hf, prompts[:1], 1, 2, tok.pad)
            # alternate the two sides level by level (the server idles while HF runs), so that a change in the
            # machine's load hits both sides of a row alike
            served, hf_runs = {}, {}
            for c in levels:
                served[c] = bench_serve(url, prompts, c, new)
                hf_runs[c] = bench_hf(hf, prompts, c, new, tok.pad)
        finally:
            server.terminate()
            server.wait(60)
        codes = [[rng.randrange(20, tok.vocab_size) for _ in range(256 if not args.small else 32)]
                 for _ in range(args.score_codes if not args.small else 8)]
        scoring = bench_scoring(load, hf, codes)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{args.threads} threads; model {shape}, vocab {tok.vocab_size}; {n_req} requests x {prompt_len} prompt "
          f"tokens -> {new} new tokens (greedy, ignore_eos)")
    print(f"{'run':<28}{'seconds':>10}{'tokens':>9}{'tokens/s':>11}{'vs 1 client':>13}")
    base = served[1][1] / served[1][0]
    for c in levels:
        s, t = served[c]
        print(f"{'megaocto serve, ' + str(c) + ' client' + 's' * (c > 1):<28}{s:>10.2f}{t:>9}{t / s:>11.1f}"
              f"{(t / s) / base:>12.2f}x")
    for b, (s, t) in hf_runs.items():
        print(f"{'HF generate, batch ' + str(b):<28}{s:>10.2f}{t:>9}{t / s:>11.1f}{(t / s) / base:>12.2f}x")
    n, ours, loop = scoring["codes"], scoring["megaocto_s"], scoring["hf_loop_s"]
    print(f"LM-scoring {n} codes: megaocto batched {n / ours:.1f} codes/s, HF forward loop {n / loop:.1f} codes/s "
          f"(ratio {loop / ours:.2f}x; max |logit diff| {scoring['max_abs_diff']:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
