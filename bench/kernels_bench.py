"""GPU benchmark of megaocto's fused Triton kernels (issue 7): each kernel vs torch eager and torch.compile,
flash attention vs SDPA's flash backend, and a ~1B BigCode training step with kernels on vs off (MFU).

    python bench/kernels_bench.py --all                 # on a CUDA GPU (H100: ~10 min)
    python bench/kernels_bench.py --kernels --attention # a subset (also --train)
    python bench/kernels_bench.py --all --json out.json # also write every row (device, versions, date) as JSON
    python bench/kernels_bench.py --all --cpu-smoke     # no GPU: tiny shapes under TRITON_INTERPRET=1, proves the
                                                        # script runs end to end (timings are meaningless)

Without a CUDA device and without ``--cpu-smoke`` it refuses with exit code 2.

What is measured (median of ``triton.testing.do_bench`` on GPU, one timed call in the smoke run):

* kernels (bf16, shapes of a 7B-class layer): ``fwd`` and ``fwd+bwd`` time of the Triton kernel
  (``megaocto.kernels.registry.get(op, "triton")``), the torch implementation (``get(op, "torch")``, eager) and
  ``torch.compile`` of the torch implementation; GB/s = estimated minimum bytes moved / time (fwd: inputs +
  output; bwd adds grad-output + input grads), TFLOP/s for the matmul-bound linear cross-entropy
  (2·T·h·V forward, 6·T·h·V forward+backward, recompute not counted); peak memory = max allocated during the
  call minus what was allocated before it. A kernel whose module is missing is reported as skipped.
* attention (bf16, batch 2 x 16 heads x seq 8192 x head dim 128 = 16k tokens, flash-attention's benchmark
  shape): megaocto Triton flash attention vs ``F.scaled_dot_product_attention`` restricted to the flash backend
  (vs flash-attn too when installed), causal and not, MHA and MQA (SDPA gets K/V expanded, Triton reads one K/V
  head), and a packed row (4 x 2048 segments, Triton only). FLOPs (flash-attention's convention, used for its
  published FA2 figure of ~300-335 TFLOP/s fwd+bwd on H100 at this shape):
  fwd = 4·b·h·s²·d (x 0.5 causal; packed: sum of segment lengths squared instead of s²), bwd = 2.5 x fwd,
  fwd+bwd = 3.5 x fwd (the backward's recompute of P is counted, as flash-attention does).
* train: ``Trainer.train_step`` (data, bf16 compute with fp32 master weights/grads, clipping, AdamW) of preset
  ``santacoder-1b`` (1.1B, MQA, seq 2048) with ``model.kernels`` triton vs torch; tokens/s, MFU =
  ``megaocto.model.flops.flops_per_token`` (6N + 12·L·H·Q·T, PaLM convention) x tokens/s / peak dense bf16
  TFLOP/s looked up by GPU name (``megaocto.training.metrics.peak_tflops``), and peak memory.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

if "--cpu-smoke" in sys.argv:  # before triton is imported anywhere: the interpreter must be on at decoration
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ATTN_FWD_BWD_FACTOR = 3.5  # fwd+bwd FLOPs = 3.5 x fwd FLOPs (bwd = 2.5 x fwd), flash-attention's convention


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Row:
    section: str
    name: str
    mode: str  # fwd | fwd+bwd | step
    impl: str
    ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


class Timer:
    """GPU: median ms of ``triton.testing.do_bench``; smoke: one timed call after one warm-up call."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms(self, fn: Callable[[], object], grad_to_none=None) -> float:
        if self.smoke:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                             return_mode="median"))

    def peak_mib(self, fn: Callable[[], object]) -> float | None:
        if self.device.type != "cuda":
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------------------------- kernels
@dataclass
class KernelCase:
    """One op: ``make()`` -> (args, kwargs); tensors in args with requires_grad get gradients in fwd+bwd."""

    name: str
    op: str  # registry op name, or "softmax" (megaocto.kernels.softmax)
    make: Callable[[], tuple[list, dict]]
    flops: Callable[[str], float] | None = None  # mode -> FLOPs (matmul-bound ops); else GB/s is reported


def kernel_cases(device: torch.device, smoke: bool) -> list[KernelCase]:
    dt = torch.bfloat16
    # GPU shapes: 16k tokens (b=4 x s=4096) of a 7B-class layer (hidden 4096, ffn 16384 / SwiGLU 2 x 11008).
    tok, hid, ffn, swi = (64, 96, 160, 80) if smoke else (16384, 4096, 16384, 11008)
    rb, rh, rs, rd = (1, 2, 37, 32) if smoke else (4, 32, 4096, 128)
    sb, sh, ss = (1, 2, 37) if smoke else (4, 16, 2048)
    cb, cs, ch, cv = (1, 16, 64, 131) if smoke else (4, 2048, 2048, 49152)

    def t(*shape, grad=True, dtype=dt, scale=1.0):
        x = (torch.randn(*shape, device=device) * scale).to(dtype)
        return x.requires_grad_(grad)

    def rope(rot_half: int, s: int):
        ang = torch.arange(s, device=device)[:, None] * (1e-2 * torch.arange(1, rot_half + 1, device=device))
        return ang.cos(), ang.sin()

    def ce():
        from megaocto.parallel.context import ParallelContext
        x, w = t(cb, cs, ch, scale=0.5), t(cv, ch, scale=0.02)
        labels = torch.randint(0, cv, (cb, cs), device=device)
        return [x, w, labels, ParallelContext.single(device)], {"vocab_size": cv}

    cases = [
        KernelCase("layer_norm", "layer_norm", lambda: ([t(tok, hid), t(hid), t(hid), 1e-5], {})),
        KernelCase("rms_norm", "rms_norm", lambda: ([t(tok, hid), t(hid), 1e-5], {})),
        KernelCase("bias_gelu", "bias_gelu", lambda: ([t(tok // 2, ffn), t(ffn)], {})),
        KernelCase("swiglu", "swiglu", lambda: ([t(tok // 2, 2 * swi)], {})),
        KernelCase("rotary_neox_full", "rotary",
                   lambda: ([t(rb, rh, rs, rd), *rope(rd // 2, rs)], {"interleaved": False})),
        KernelCase("rotary_glm_half", "rotary",
                   lambda: ([t(rb, rh, rs, rd), *rope(rd // 4, rs)], {"interleaved": True})),
        KernelCase("softmax_causal", "softmax", lambda: ([t(sb, sh, ss, ss, scale=3.0), 0.088], {"causal": True})),
        KernelCase("linear_cross_entropy", "linear_cross_entropy", ce,
                   flops=lambda mode: (2.0 if mode == "fwd" else 6.0) * cb * cs * ch * cv),
    ]
    return cases


def _impls(op: str) -> dict[str, Callable | None]:
    """{"triton": fn or None, "torch": fn} for an op."""
    if op == "softmax":
        try:
            from megaocto.kernels import softmax as sm
        except ImportError:
            return {"triton": None, "torch": None}
        return {"triton": sm.scaled_masked_softmax, "torch": sm.reference_scaled_masked_softmax}
    from megaocto.kernels import registry
    out: dict[str, Callable | None] = {"torch": registry.get(op, "torch")}
    try:
        out["triton"] = registry.get(op, "triton")
    except KeyError:
        out["triton"] = None
    return out


def bench_kernels(timer: Timer, device: torch.device, compile_: bool, smoke: bool, only: set[str] | None
                  ) -> list[Row]:
    rows: list[Row] = []
    for case in kernel_cases(device, smoke):
        if only and case.name not in only:
            continue
        torch.manual_seed(0)
        args, kwargs = case.make()
        impls = _impls(case.op)
        fns: dict[str, Callable | None] = {"triton": impls["triton"], "torch": impls["torch"]}
        if compile_ and impls["torch"] is not None:
            fns["torch.compile"] = torch.compile(impls["torch"], dynamic=False)
        grads_of = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        for impl, fn in fns.items():
            for mode in ("fwd", "fwd+bwd"):
                if fn is None:
                    rows.append(Row("kernels", case.name, mode, impl, note="not available (module missing)"))
                    continue
                try:
                    rows.append(_kernel_row(timer, case, impl, mode, fn, args, kwargs, grads_of))
                except Exception as e:  # one broken kernel must not hide the others
                    rows.append(Row("kernels", case.name, mode, impl, note=f"FAILED: {type(e).__name__}: {e}"[:300]))
        del args, kwargs, grads_of
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _kernel_row(timer, case, impl, mode, fn, args, kwargs, grads_of) -> Row:
    if mode == "fwd":
        with torch.no_grad():
            out = fn(*args, **kwargs)

            def call():
                return fn(*args, **kwargs)
            ms = timer.ms(call)
            peak = timer.peak_mib(call)
        moved = _nbytes(*args, out)
    else:
        out = fn(*args, **kwargs)
        grad = torch.randn_like(out)

        def call():
            fn(*args, **kwargs).backward(grad)
        ms = timer.ms(call, grad_to_none=grads_of)
        for g in grads_of:
            g.grad = None
        peak = timer.peak_mib(call)
        for g in grads_of:
            g.grad = None
        moved = 2 * _nbytes(*args, out) + _nbytes(*grads_of)  # fwd traffic + (inputs, grad out, input grads)
    row = Row("kernels", case.name, mode, impl, ms=ms, peak_mib=peak)
    if case.flops is not None:
        row.tflops = case.flops(mode) / (ms * 1e-3) / 1e12
    else:
        row.gbps = moved / (ms * 1e-3) / 1e9
    return row


# ---------------------------------------------------------------------------------------------- attention
def attention_flops(b: int, h: int, d: int, seq_sq_sum: float, causal: bool, mode: str) -> float:
    """flash-attention's convention: fwd 4·b·h·Σs²·d (x0.5 causal); fwd+bwd 3.5 x fwd."""
    fwd = 4.0 * b * h * seq_sq_sum * d * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else ATTN_FWD_BWD_FACTOR * fwd


def bench_attention(timer: Timer, device: torch.device, smoke: bool) -> list[Row]:
    import torch.nn.functional as F

    from megaocto.kernels.flash_attention import flash_attention
    from megaocto.kernels.attention import attention

    b, h, s, d = (1, 2, 70, 32) if smoke else (2, 16, 8192, 128)
    dt = torch.bfloat16

    def sdpa_flash(q, k, v, causal, segment_ids=None):
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        if device.type != "cuda":  # the smoke run has no flash backend
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    impls: dict[str, Callable] = {
        "triton": lambda q, k, v, causal, segment_ids=None: flash_attention(q, k, v, causal=causal,
                                                                           segment_ids=segment_ids),
        "sdpa-flash": sdpa_flash,
    }
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            impls["flash-attn"] = lambda q, k, v, causal, segment_ids=None: attention(
                q, k, v, causal=causal, segment_ids=segment_ids, backend="flash")
        except ImportError:
            pass

    rows: list[Row] = []
    seg_len = s // 4
    variants = [("mha", h, True, False), ("mha", h, False, False), ("mqa", 1, True, False),
                ("packed4", h, True, True)]
    for tag, hkv, causal, packed in variants:
        torch.manual_seed(0)
        q = torch.randn(b, h, s, d, device=device, dtype=dt, requires_grad=True)
        k = torch.randn(b, hkv, s, d, device=device, dtype=dt, requires_grad=True)
        v = torch.randn(b, hkv, s, d, device=device, dtype=dt, requires_grad=True)
        seg = None
        sq_sum = float(s * s)
        if packed:
            seg = (torch.arange(s, device=device) // seg_len + 1).expand(b, s).contiguous()
            sq_sum = float(sum(min(seg_len, s - i) ** 2 for i in range(0, s, seg_len)))
        name = f"{tag} {'causal' if causal else 'full'} b{b} h{h}/{hkv} s{s} d{d}"
        for impl, fn in impls.items():
            if packed and impl == "sdpa-flash":
                continue  # SDPA's flash backend takes no mask
            for mode in ("fwd", "fwd+bwd"):
                try:
                    if mode == "fwd":
                        with torch.no_grad():
                            def call():
                                return fn(q, k, v, causal, segment_ids=seg)
                            ms = timer.ms(call)
                            peak = timer.peak_mib(call)
                    else:
                        do = torch.randn(b, h, s, d, device=device, dtype=dt)

                        def call():
                            fn(q, k, v, causal, segment_ids=seg).backward(do)
                        ms = timer.ms(call, grad_to_none=[q, k, v])
                        peak = timer.peak_mib(call)
                        q.grad = k.grad = v.grad = None
                    fl = attention_flops(b, h, d, sq_sum, causal, mode)
                    rows.append(Row("attention", name, mode, impl, ms=ms, tflops=fl / (ms * 1e-3) / 1e12,
                                    peak_mib=peak))
                except Exception as e:
                    rows.append(Row("attention", name, mode, impl, note=f"FAILED: {type(e).__name__}: {e}"[:300]))
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- train step
def bench_train(timer: Timer, device: torch.device, smoke: bool, micro_batch: int, steps: int) -> list[Row]:
    from megaocto.config.loader import load_run_config
    from megaocto.kernels.registry import ops_for
    from megaocto.model.flops import flops_per_token
    from megaocto.training.loop import Trainer
    from megaocto.training.metrics import peak_tflops

    preset, seq = ("tiny-bigcode", 64) if smoke else ("santacoder-1b", 2048)
    mb = 2 if smoke else micro_batch
    steps, warmup = (1, 1) if smoke else (steps, 3)
    rows: list[Row] = []
    for kernels in ("torch", "triton"):
        try:
            cfg = load_run_config(None, [
                "--model.preset", preset, "--model.kernels", kernels, "--model.seq_length", str(seq),
                "--model.attention_dropout", "0", "--model.hidden_dropout", "0",
                "--data.kind", "synthetic", "--data.num_workers", "0",
                "--train.micro_batch_size", str(mb), "--train.iters", "1000",
                "--train.dtype", "bf16",
                "--logging.jsonl", "false", "--logging.run_dir", "/tmp/megaocto_kernels_bench"])
            trainer = Trainer(cfg, stream=io.StringIO())
            batches = iter(trainer.train_loader())

            def step():
                trainer.train_step(batches)
                trainer.iteration += 1
            for _ in range(warmup):
                step()
            timer.sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                step()
                timer.sync()
                times.append(time.perf_counter() - t)
            sec = statistics.median(times)
            tok_s = mb * seq / sec
            fpt = flops_per_token(cfg.model, seq)
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
            peak = peak_tflops(name, "bf16")
            tflops = fpt * tok_s / 1e12
            row = Row("train", f"{preset} mb{mb} s{seq} bf16", "step", f"kernels={kernels}", ms=sec * 1e3,
                      tflops=tflops,
                      peak_mib=(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None),
                      extra={"tokens_per_s": tok_s, "mfu": (tflops / peak if peak else None),
                             "flops_per_token": fpt, "impls": ops_for(kernels, device).impls})
            attn = ops_for(kernels, device).attention_backend or "auto (flash-attn/sdpa)"
            row.note = (f"{tok_s:,.0f} tok/s, MFU {100 * tflops / peak:.1f}% of {peak:.0f}" if peak
                        else f"{tok_s:,.0f} tok/s, MFU n/a (unknown peak)") + f", attention {attn}"
            rows.append(row)
            del trainer, batches
        except Exception as e:
            traceback.print_exc()
            rows.append(Row("train", f"{preset} mb{mb} s{seq}", "step", f"kernels={kernels}",
                            note=f"FAILED: {type(e).__name__}: {e}"[:300]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- report
def _fmt(x: float | None, spec: str) -> str:
    """``format(x, spec)``, or a dash padded to the spec's width when ``x`` is None."""
    return "-".rjust(int(spec.split(".")[0] or 0)) if x is None else format(x, spec)


def print_rows(rows: list[Row]) -> None:
    section = None
    base: dict[tuple[str, str], float] = {}
    for r in rows:
        if r.impl in ("torch", "sdpa-flash", "kernels=torch") and r.ms:
            base[(r.name, r.mode)] = r.ms
    for r in rows:
        if r.section != section:
            section = r.section
            print(f"\n== {section} ==")
            print(f"{'case':38s} {'mode':8s} {'impl':15s} {'ms':>9s} {'GB/s':>7s} {'TFLOP/s':>8s} "
                  f"{'peakMiB':>8s} {'speedup':>7s}  note")
        ref = base.get((r.name, r.mode))
        speed = f"{ref / r.ms:.2f}x" if ref and r.ms else "-"
        print(f"{r.name:38s} {r.mode:8s} {r.impl:15s} {_fmt(r.ms, '9.3f')} {_fmt(r.gbps, '7.0f')} "
              f"{_fmt(r.tflops, '8.1f')} {_fmt(r.peak_mib, '8.0f')} {speed:>7s}  {r.note}")


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        env["gpu"] = None
        env["mode"] = "cpu-smoke (TRITON_INTERPRET=1; timings meaningless)"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--all", action="store_true", help="kernels + attention + train")
    ap.add_argument("--kernels", action="store_true", help="per-kernel table (triton / torch / torch.compile)")
    ap.add_argument("--attention", action="store_true", help="flash attention at seq 8192, head dim 128")
    ap.add_argument("--train", action="store_true", help="~1B BigCode training step, kernels triton vs torch (MFU)")
    ap.add_argument("--only", default=None, help="comma-separated kernel case names for --kernels")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    ap.add_argument("--micro-batch", type=int, default=4, help="train: micro batch size (default 4)")
    ap.add_argument("--steps", type=int, default=10, help="train: timed steps after 3 warm-up steps (default 10)")
    ap.add_argument("--json", default=None, help="also write environment + rows to this JSON file")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every measurement on tiny shapes on CPU under the Triton interpreter (no GPU needed)")
    args = ap.parse_args(argv)
    if not (args.all or args.kernels or args.attention or args.train):
        ap.error("choose what to run: --all, or any of --kernels --attention --train")
    if torch.cuda.is_available() and not args.cpu_smoke:
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.cpu_smoke:
        device = torch.device("cpu")
    else:
        print("kernels_bench.py: no CUDA GPU found (torch.cuda.is_available() is False). This benchmark measures "
              "GPU kernels; run it on a CUDA machine, or add --cpu-smoke to check the script end to end on tiny "
              "shapes under the Triton interpreter.", file=sys.stderr)
        return 2
    smoke = args.cpu_smoke
    timer = Timer(device, smoke)
    env = environment(device)
    print("  ".join(f"{k}={v}" for k, v in env.items()))
    rows: list[Row] = []
    t0 = time.perf_counter()
    if args.all or args.kernels:
        only = set(args.only.split(",")) if args.only else None
        rows += bench_kernels(timer, device, compile_=not args.no_compile, smoke=smoke, only=only)
    if args.all or args.attention:
        rows += bench_attention(timer, device, smoke)
    if args.all or args.train:
        rows += bench_train(timer, device, smoke, args.micro_batch, args.steps)
    print_rows(rows)
    print(f"\nattention FLOPs: fwd 4*b*h*s^2*d (x0.5 causal), fwd+bwd {ATTN_FWD_BWD_FACTOR} x fwd "
          f"(flash-attention convention; FA2 on H100 at this shape: ~300-335 TFLOP/s fwd+bwd). "
          f"Train MFU: 6N + 12*L*H*Q*T per token / peak dense bf16. Total {time.perf_counter() - t0:.0f} s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": [r.__dict__ for r in rows]}, f, indent=1)
    failed = [r for r in rows if r.note.startswith("FAILED")]
    if failed:
        print(f"{len(failed)} measurement(s) FAILED (see the note column)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
