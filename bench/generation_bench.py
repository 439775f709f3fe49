"""Generation throughput with vs without the KV cache (greedy, one process, fp32 on CPU or the default device).

    OMP_NUM_THREADS=2 .venv/bin/python bench/generation_bench.py [--repeats 3] [--threads 2] [--only tiny|small]

Shapes:
* ``tiny``: the tiny-bigcode preset (2 layers, hidden 64, 4 heads, MQA, vocab 1000) with its position table
  widened to 512; batch 8, prompts of 32 tokens, 224 new tokens.
* ``small``: bigcode 6 layers x hidden 512 x 8 heads, MQA, vocab 32768, 1024 positions; batch 2, prompts of 64
  tokens, 64 new tokens (the uncached run recomputes every position each step: O(new x length) work).

Both runs decode the same random prompts with ``megaocto.generation.generate`` (``use_cache=True`` / ``False``;
eos never stops a row, so every row produces all new tokens), alternating so both see the same load on a shared
machine. Reports the median time of ``--repeats`` runs after one warm-up, new tokens/s, the ratio, and checks that
both produced the same tokens.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from megaocto.config.model import ModelConfig
from megaocto.generation import GenerationConfig, generate
from megaocto.model import build_model
from megaocto.parallel.context import ParallelContext

SHAPES = {
    "tiny": dict(preset="tiny-bigcode", overrides=dict(seq_length=512, max_position_embeddings=512),
                 batch=8, prompt=32, new=224),
    "small": dict(preset="tiny-bigcode", overrides=dict(num_layers=6, hidden_size=512, num_attention_heads=8,
                                                        ffn_hidden_size=2048, vocab_size=32768, seq_length=1024,
                                                        max_position_embeddings=1024),
                  batch=2, prompt=64, new=64),
}


def bench_shape(name: str, repeats: int) -> dict:
    shape = SHAPES[name]
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(shape["preset"], init_method_std=0.2, **shape["overrides"])
    pc = ParallelContext.single("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, pc, device=pc.device).eval()
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (shape["batch"], shape["prompt"]), generator=g).tolist()
    gen = GenerationConfig(max_new_tokens=shape["new"])
    outputs: dict[bool, list] = {}

    def run(use_cache: bool) -> float:
        if pc.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        outputs[use_cache] = generate(model, prompts, gen, pc, use_cache=use_cache)
        if pc.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(True), run(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats):
        for use_cache in (True, False):
            times[use_cache].append(run(use_cache))
    tokens = shape["batch"] * shape["new"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"shape": name, "layers": cfg.num_layers, "hidden": cfg.hidden_size, "batch": shape["batch"],
            "prompt": shape["prompt"], "new": shape["new"], "cached_s": med[True], "uncached_s": med[False],
            "cached_tok_s": tokens / med[True], "uncached_tok_s": tokens / med[False],
            "ratio": med[False] / med[True], "same_tokens": outputs[True] == outputs[False],
            "all_tokens": all(len(o) == shape["new"] for o in outputs[True])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=sorted(SHAPES), default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}", flush=True)
    for name in ([args.only] if args.only else list(SHAPES)):
        r = bench_shape(name, args.repeats)
        print(f"{r['shape']:5s} L{r['layers']} h{r['hidden']} batch {r['batch']} prompt {r['prompt']} new {r['new']}: "
              f"KV cache {r['cached_tok_s']:.0f} tok/s ({r['cached_s']:.2f} s), no cache {r['uncached_tok_s']:.0f} "
              f"tok/s ({r['uncached_s']:.2f} s), speed-up x{r['ratio']:.2f}; same tokens: {r['same_tokens']}, "
              f"every row {r['new']} tokens: {r['all_tokens']}", flush=True)


if __name__ == "__main__":
    main()
