"""Pipeline bubble of megaocto's 1F1B schedule, measured vs the (p - 1) / m theory.

    .venv/bin/python bench/pipeline_bench.py [--pp 2 4] [--micro 1 2 4 8 16] [--virtual 1 2] [--forward-ms 20]

Runs the real schedule (megaocto.training.pipeline.forward_backward_1f1b, P2P over gloo) on p CPU processes with a
stand-in stage whose forward sleeps t_f and whose backward sleeps 2·t_f: the stage's compute is a fixed, known
time, so the measurement is the schedule's (its dependencies, warmup/cooldown and P2P waits) and not the shared
CPU's load. The ideal step is the same stage's work run at pp = 1 (m forwards and backwards, or m·v of a v-th of
the size for interleaving; nominally m·3·t_f; measured, so that per-item sleep overshoot on a loaded machine is not
counted as bubble); bubble = step / ideal - 1; theory for 1F1B
(and GPipe) = (p - 1) / m; interleaved with v chunks per stage (each chunk t_f / v forward, the same work per stage)
(p - 1) / (m·v). The median over --steps steps (after one warm-up step) of the slowest stage is reported.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megaocto.parallel.context import ParallelContext  # noqa: E402
from megaocto.training.pipeline import forward_backward_1f1b, forward_backward_interleaved  # noqa: E402

SHAPE = (1, 8, 16)


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, fwd_s, bwd_s):
        time.sleep(fwd_s)
        ctx.bwd_s = bwd_s
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        time.sleep(ctx.bwd_s)
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum().reshape(w.shape), None, None


class SleepStage(torch.nn.Module):
    """A pipeline stage taking t_f forward and 2·t_f backward, with one parameter (so there is a grad to make)."""

    def __init__(self, pc, forward_s: float):
        super().__init__()
        self.pc, self.fwd_s = pc, forward_s
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, input_ids, *, labels=None, hidden_states=None, chunk=0, **_):
        x = input_ids.float()[..., None].expand(*SHAPE) if hidden_states is None else hidden_states
        y = _Sleep.apply(x, self.w, self.fwd_s, 2 * self.fwd_s)
        return y.sum(-1) if labels is not None else y  # the last stage returns a per-token "loss" [b, s]


def _worker(rank, world, init_file, args, out_file):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    pc = ParallelContext.init(pp=world)
    rows = []
    for v, m in [(v, m) for v in args.virtual for m in args.micro]:
        if v > 1 and m % world:
            continue  # the interleaved schedule needs m divisible by pp
        model = SleepStage(pc, args.forward_ms / 1000 / v)
        schedule = forward_backward_1f1b if v == 1 or world == 1 else \
            functools.partial(forward_backward_interleaved, virtual=v)
        # pp = 1 (the reference): the same m·v work items of t_f / v each, one after the other
        batches = [{"input_ids": torch.ones(SHAPE[:2], dtype=torch.int64), "labels": torch.ones(SHAPE[:2])}
                   for _ in range(m * v if world == 1 else m)]
        times = []
        for step in range(args.steps + 1):
            dist.barrier()
            start = time.perf_counter()
            schedule(model, batches, pc, shape=SHAPE, dtype=torch.float32, loss_fn=lambda out, b: out.sum())
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest stage is done
            if step:
                times.append(float(elapsed))
        rows.append((v, m, statistics.median(times)))
    if rank == 0:
        with open(out_file, "w") as f:
            for v, m, t in rows:
                f.write(f"{v} {m} {t}\n")
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--virtual", type=int, nargs="+", default=[1, 2], help="model chunks per stage (interleaved)")
    ap.add_argument("--forward-ms", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    print(f"1F1B bubble, stand-in stage: forward {args.forward_ms:g} ms, backward {2 * args.forward_ms:g} ms; "
          f"median of {args.steps} steps")
    print("| pp | chunks v | micro batches m | step (s) | same stage work at pp=1 (s) | measured bubble step/pp1 - 1 "
          "| theory (p-1)/(m·v) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    base = None
    for pp in [1, *args.pp]:
        fd, init_file = tempfile.mkstemp(prefix="megaocto_ppbench_")
        os.close(fd)
        os.unlink(init_file)
        out_file = init_file + ".out"
        mp.start_processes(_worker, args=(pp, init_file, args, out_file), nprocs=pp, join=True, start_method="spawn")
        with open(out_file) as f:
            rows = [(int(v), int(m), float(t)) for v, m, t in (line.split() for line in f)]
        os.unlink(out_file)
        if os.path.exists(init_file):
            os.unlink(init_file)
        if pp == 1:  # the ideal: the stage's own m forwards + backwards (sleep overshoot and autograd included)
            base = {(v, m): t for v, m, t in rows}
            continue
        for v, m, t in rows:
            print(f"| {pp} | {v} | {m} | {t:.3f} | {base[v, m]:.3f} | {t / base[v, m] - 1:.3f} | {(pp - 1) / (m * v):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
