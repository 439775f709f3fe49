"""Training-step throughput: megaocto's training step vs HF GPTBigCodeForCausalLM / LlamaForCausalLM, same shape.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_bench.py [--family bigcode|llama] [--steps 5] [--warmup 2]
        [--compile] [--threads 2] [--megaocto-dtype bf16 --hf-autocast]

Shape (reference machine-feasibility.md §8): 6 layers x hidden 512 x 8 heads, vocab 32768, batch 4 x seq 512,
fp32, AdamW(lr 1e-4, wd 0.1), dropout 0; bigcode: multi-query, MLP 4h; llama: 2 K/V heads (GQA), SwiGLU 1408
(DeepSeek-Coder's 2.69 h), RMSNorm, rope theta 1e5 with linear scaling 4, untied head, no biases.
One step = forward + loss + backward + optimizer.
megaocto's step is the real `Trainer.train_step` (data collate, fp32 grad buffer, grad clipping, AdamW);
HF's is the usual `model(input_ids, labels=...)`, `loss.backward()`, `opt.step()`, `opt.zero_grad()`.
Steps of the two models alternate (so both see the same load on a shared machine); reports the median
step time of `--steps` steps after `--warmup` steps, tokens/s, and the ratio.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import torch

B, S, LAYERS, HIDDEN, HEADS, VOCAB = 4, 512, 6, 512, 8, 32768
KV_HEADS, LLAMA_FFN = 2, 1408


def _timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def _interleaved(steps_by_name: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    """Alternate one step of each model so both see the same (shared-machine) load; returns step times."""
    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    times = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            times[name].append(_timed(step))
    return times


def megaocto_step(compile_model: bool, dtype: str = "fp32", family: str = "bigcode"):
    from megaocto.config.loader import load_run_config
    from megaocto.training.loop import Trainer

    arch = ["--model.family", "bigcode", "--model.num_query_groups", "1"] if family == "bigcode" else [
        "--model.preset", "deepseek-coder-1.3b", "--model.num_query_groups", str(KV_HEADS),
        "--model.ffn_hidden_size", str(LLAMA_FFN), "--model.max_position_embeddings", str(S)]
    cfg = load_run_config(None, [
        *arch, "--model.num_layers", str(LAYERS), "--model.hidden_size", str(HIDDEN),
        "--model.num_attention_heads", str(HEADS), "--model.vocab_size", str(VOCAB),
        "--model.seq_length", str(S), "--model.attention_dropout", "0", "--model.hidden_dropout", "0",
        "--data.kind", "synthetic", "--data.num_workers", "0", "--train.micro_batch_size", str(B), "--train.iters", "1000",
        "--train.dtype", dtype, "--train.compile", str(compile_model).lower(),
        "--optimizer.lr", "1e-4", "--optimizer.weight_decay", "0.1", "--optimizer.clip_grad", "1.0",
        "--logging.jsonl", "false", "--logging.run_dir", "/tmp/megaocto_bench"])
    trainer = Trainer(cfg, stream=io.StringIO())
    batches = iter(trainer.train_loader())
    n_params = sum(p.numel() for p in trainer.model.parameters())

    def step():
        trainer.train_step(batches)
        trainer.iteration += 1
    return step, n_params


def hf_step(compile_model: bool, autocast: bool = False, family: str = "bigcode"):
    if family == "bigcode":
        from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

        cfg = GPTBigCodeConfig(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, multi_query=True, vocab_size=VOCAB,
                               n_positions=S, n_inner=4 * HIDDEN, activation_function="gelu_pytorch_tanh",
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = GPTBigCodeForCausalLM(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                          num_key_value_heads=KV_HEADS, intermediate_size=LLAMA_FFN, vocab_size=VOCAB,
                          max_position_embeddings=S, rms_norm_eps=1e-6, rope_theta=100000.0,
                          rope_scaling={"type": "linear", "factor": 4.0}, tie_word_embeddings=False,
                          attention_dropout=0.0, bos_token_id=0, eos_token_id=1)
        model = LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    fwd = torch.compile(model) if compile_model else model
    gen = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(0, 256, (B, S), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    ap.add_argument("--only", choices=("megaocto", "hf"), default=None)
    ap.add_argument("--megaocto-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="megaocto compute dtype (bf16 = bf16 params/activations + fp32 masters/grads)")
    ap.add_argument("--hf-autocast", action="store_true", help="run HF under torch.autocast(cpu, bfloat16)")
    ap.add_argument("--family", choices=("bigcode", "llama"), default="bigcode",
                    help="bigcode (vs GPTBigCodeForCausalLM) or llama (vs LlamaForCausalLM)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load avg {os.getloadavg()}")
    attn = "MQA" if args.family == "bigcode" else f"GQA {KV_HEADS} K/V, SwiGLU {LLAMA_FFN}"
    print(f"{args.family}: {LAYERS} layers x {HIDDEN} hidden x {HEADS} heads {attn}, vocab {VOCAB}, batch {B} x seq {S}; "
          f"megaocto {args.megaocto_dtype}, HF {'bf16 autocast' if args.hf_autocast else 'fp32'}")
    modes = [False, True] if args.compile else [False]
    results = {}
    for compiled in modes:
        builders = {"megaocto": lambda c: megaocto_step(c, args.megaocto_dtype, args.family),
                    "hf": lambda c: hf_step(c, args.hf_autocast, args.family)}
        if args.only:
            builders = {args.only: builders[args.only]}
        steps, sizes = {}, {}
        for name, build in builders.items():
            torch.manual_seed(0)
            steps[name], sizes[name] = build(compiled)
        t0 = time.perf_counter()
        times = _interleaved(steps, args.steps, args.warmup + (1 if compiled else 0))
        tag = " +compile" if compiled else ""
        for name, ts in times.items():
            med = statistics.median(ts)
            results[name + tag] = B * S / med
            print(f"{name + tag:18s} params {sizes[name] / 1e6:.1f}M  median {med:.3f} s/step  {B * S / med:7.1f} "
                  f"tokens/s  (steps {', '.join(f'{t:.2f}' for t in ts)})")
        if len(times) == 2:
            pairs = [h / m for m, h in zip(times["megaocto"], times["hf"])]
            print(f"ratio megaocto/hf{tag}: {results['megaocto' + tag] / results['hf' + tag]:.2f}x "
                  f"(median of per-pair ratios {statistics.median(pairs):.2f}x; {time.perf_counter() - t0:.0f} s)")
        del steps
    if "megaocto +compile" in results and "hf" in results:
        print(f"ratio megaocto+compile / hf eager: {results['megaocto +compile'] / results['hf']:.2f}x")
    print(f"load avg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
