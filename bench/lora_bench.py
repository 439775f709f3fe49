"""LoRA vs full finetuning: step time and peak memory on the same model and batch, side by side.

    OMP_NUM_THREADS=2 .venv/bin/python bench/lora_bench.py [--steps 4] [--warmup 1] [--dtype fp32|bf16] [--rank 16]

Each mode runs in its own subprocess (so the peak RSS of one does not hide the other's) with the real
``Trainer.train_step`` (synthetic-data collate, flat grad buffer, grad clipping, AdamW): ``full`` trains every
parameter, ``lora`` freezes the base and trains adapters (r ``--rank``, alpha 2r) on c_attn + c_proj + c_fc (every
linear of the blocks). Reported per mode: median step time of ``--steps`` steps after ``--warmup``, tokens/s,
trainable parameters, the optimizer's bytes (grad buffer + fp32 masters + AdamW moments) and the process's peak
RSS (CPU) or ``torch.cuda.max_memory_allocated`` (GPU). Shape: 6 layers x hidden 512 x 8 heads, MQA, vocab 32768,
batch 2 x 512.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time

LAYERS, HIDDEN, HEADS, VOCAB, B, S = 6, 512, 8, 32768, 2, 512


def run_mode(mode: str, steps: int, warmup: int, dtype: str, rank: int) -> dict:
    import torch

    from megaocto.config.loader import load_run_config
    from megaocto.training.loop import Trainer

    lora = ["--model.lora.rank", str(rank), "--model.lora.alpha", str(2 * rank),
            "--model.lora.target_modules", "[c_attn, c_proj, c_fc]"] if mode == "lora" else []
    cfg = load_run_config(None, [
        "--model.family", "bigcode", "--model.num_layers", str(LAYERS), "--model.hidden_size", str(HIDDEN),
        "--model.num_attention_heads", str(HEADS), "--model.num_query_groups", "1", "--model.vocab_size", str(VOCAB),
        "--model.seq_length", str(S), "--model.attention_dropout", "0", "--model.hidden_dropout", "0", *lora,
        "--data.kind", "synthetic", "--data.num_workers", "0", "--train.micro_batch_size", str(B),
        "--train.global_batch_size", str(B), "--train.iters", "1000", "--train.dtype", dtype,
        "--optimizer.lr", "1e-4", "--optimizer.weight_decay", "0.1", "--optimizer.clip_grad", "1.0",
        "--logging.jsonl", "false", "--logging.run_dir", f"/tmp/megaocto_lora_bench_{mode}"])
    trainer = Trainer(cfg, stream=io.StringIO())
    batches = iter(trainer.train_loader())
    cuda = trainer.pc.device.type == "cuda"
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step(batches)
        trainer.iteration += 1
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    opt = trainer.optimizer
    opt_bytes = opt.grad_buffer.numel() * 4 + opt.state_bytes()
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "step_s": statistics.median(times), "tok_s": B * S / statistics.median(times),
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "params": sum(p.numel() for p in trainer.model.parameters()), "optimizer_bytes": opt_bytes,
            "peak_bytes": peak, "peak_kind": "cuda max_memory_allocated" if cuda else "peak RSS"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mode", choices=["full", "lora"], default=None, help="(internal) run one mode, print JSON")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.steps, args.warmup, args.dtype, args.rank)))
        return
    load0 = os.getloadavg()[0]
    rows = []
    for mode in ("full", "lora"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--warmup",
                              str(args.warmup), "--dtype", args.dtype, "--rank", str(args.rank)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    full, lora = rows
    print(f"load avg {load0:.2f} -> {os.getloadavg()[0]:.2f}; {LAYERS} layers x {HIDDEN} x {HEADS} heads MQA, vocab "
          f"{VOCAB}, batch {B} x {S}, {args.dtype}, LoRA r={args.rank} on c_attn/c_proj/c_fc")
    print("| mode | trainable params | step s | tok/s | optimizer+grad buffers MiB | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable']:,} of {r['params']:,} | {r['step_s']:.3f} | {r['tok_s']:.0f} | "
              f"{r['optimizer_bytes'] / 2**20:.1f} | {r['peak_bytes'] / 2**20:.0f} ({r['peak_kind']}) |")
    print(f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}x, optimizer+grad buffers "
          f"{lora['optimizer_bytes'] / full['optimizer_bytes']:.3f}x, peak {lora['peak_bytes'] / full['peak_bytes']:.2f}x")


if __name__ == "__main__":
    main()
