"""One-GPU readiness check (issue 15): the parts that bench/gpu_check.sh runs, each in its own process under its
own time limit, and the summary table it prints at the end.

    python bench/gpu_check.py PART --out FILE.json [--dry-run]    # one part; writes its result as JSON
    python bench/gpu_check.py summary --dir DIR                    # the table of every part's result in DIR

Parts (real mode: one CUDA GPU; ``--dry-run``: CPU, tiny shapes, Triton kernels under the interpreter):

* ``tests``: the CUDA-only tests of tests/ (:data:`CUDA_TESTS`: the prebuilt CUDA kernels vs torch), via pytest;
* ``kernels``: every Triton kernel compiled for the device vs its plain-torch reference, forward and backward,
  fp32 and bf16 (layer/RMS norm, bias-GELU, SwiGLU, rotary, scaled masked softmax, linear cross-entropy, flash
  attention causal / full / MQA / packed);
* ``train``: bf16 training steps of tiny-bigcode, tiny-glm2 and tiny-llama on one fixed batch (kernels auto =
  Triton on CUDA; on the GPU also torch, whose first loss must agree): finite losses that go down;
* ``nccl``: a single-rank NCCL process group (gloo in the dry run): init, megaocto's ParallelContext on top of it,
  all-reduce and all-gather, destroy;
* ``attention``: flash attention forward+backward at batch 2 x 16 heads x seq 8192 x head dim 128 (causal), TFLOP/s
  of megaocto's Triton kernel, SDPA's flash backend and flash-attn when installed (bench/kernels_bench.py's timer
  and FLOPs convention);
* ``lora``: LoRA (r 16) vs full finetuning on bench/lora_bench.py's model and batch: step time, peak memory.
* ``train1b``: one training step of starcoderbase-1b (1.1B BigCode, MQA) at seq 8192, bf16, kernels auto: tokens/s
  and MFU = (6N + 12·L·H·Q·T) x tokens/s / peak bf16 TFLOP/s of the GPU.

Each result is ``{"part", "status": "ok" | "FAIL" | "skip", "figure", "detail", "seconds"}``; a part the shell
stopped at its limit has no result file, and the summary says TIMEOUT.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("tests", "kernels", "train", "nccl", "attention", "train1b", "lora")
# The tests in tests/ that only run on a CUDA GPU (skipped elsewhere): pytest arguments.
CUDA_TESTS = ["tests/test_csrc_cuda.py", "-k", "on_gpu or like_triton"]


def _device(dry: bool):
    import torch

    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU machine")
    return torch.device("cuda", torch.cuda.current_device())


def _result(status: str, figure: str, detail: str = "") -> dict:
    return {"status": status, "figure": figure, "detail": detail}


# ---------------------------------------------------------------------------------------------- tests
def part_tests(dry: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS, "--junitxml", xml]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if not os.path.exists(xml):
            return _result("FAIL", f"pytest exit {proc.returncode}", (proc.stdout + proc.stderr)[-500:])
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    passed = n - fail - err - skip
    figure = f"{passed} passed, {fail + err} failed, {skip} skipped"
    detail = ("skipped: " + "; ".join(reasons))[:300] if skip else ""
    if fail or err:
        tail = [ln for ln in proc.stdout.splitlines() if "FAILED" in ln or "Error" in ln][:5]
        return _result("FAIL", figure, " | ".join(tail)[:500])
    if passed == 0 and not dry:
        return _result("skip", figure, detail + " (build megaocto._cuda_kernels: BUILD_CUDA=1 bench/gpu_check.sh, "
                                                "or MEGAOCTO_BUILD_CUDA=1 pip install -e .)")
    return _result("ok", figure, detail)


# ---------------------------------------------------------------------------------------------- kernels
def _max_rel_err(got, want) -> float:
    """max |got - want| / max(1, max |want|): tests/test_kernels_attention.py's scale-aware error."""
    scale = want.float().abs().max().clamp(min=1.0)
    return float((got.float() - want.float()).abs().max() / scale)


def kernel_cases(device, dry: bool):
    """(name, triton fn, reference fn, make(dtype) -> (args, kwargs), dtypes) for every Triton kernel.

    On the GPU flash attention is checked in bf16 only (each dtype autotunes 5 configs x 3 kernels per variant, which
    is most of this part's compile time; fp32 is covered on CPU by tests/test_kernels_attention.py), at seq 1024
    (the same divisibility specialisation as the benchmark's 8192, so the attention part reuses the compiled kernels
    from Triton's cache) and, packed, at the odd seq 1027 (ragged last block).
    """
    import torch

    from megaocto.kernels import registry
    from megaocto.kernels.bias_gelu import reference_bias_gelu
    from megaocto.kernels.flash_attention import flash_attention, reference_attention
    from megaocto.kernels.layer_norm import reference_layer_norm
    from megaocto.kernels.linear_cross_entropy import reference_linear_cross_entropy
    from megaocto.kernels.rms_norm import reference_rms_norm
    from megaocto.kernels.rotary import reference_rotary
    from megaocto.kernels.softmax import reference_scaled_masked_softmax, scaled_masked_softmax
    from megaocto.parallel.context import ParallelContext

    rows, hid = (19, 96) if dry else (4099, 4096)  # odd row counts: a ragged last block
    b, h, s, d = (1, 2, 21, 16) if dry else (2, 8, 1027, 128)
    s_attn = s if dry else 1024
    vocab = 67 if dry else 32771
    gen = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape, dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    def rope(r):
        ang = torch.arange(s)[:, None] * (1e-2 * torch.arange(1, r + 1))
        return ang.cos().to(device), ang.sin().to(device)

    def attn(hkv, causal, packed):
        n = s if packed else s_attn

        def make(dt):
            seg = None
            if packed:
                seg = (torch.arange(n) // max(1, n // 3) + 1).expand(b, n).contiguous().to(device)
            return [t(b, h, n, d, dtype=dt), t(b, hkv, n, d, dtype=dt), t(b, hkv, n, d, dtype=dt)], \
                {"causal": causal, "segment_ids": seg}
        return make

    pc = ParallelContext.single(device)
    tri = lambda op: registry.get(op, "triton")  # noqa: E731
    both = (torch.float32, torch.bfloat16)
    flash_dtypes = both if dry else (torch.bfloat16,)
    cases = [
        ("layer_norm", tri("layer_norm"), reference_layer_norm,
         lambda dt: ([t(rows, hid, dtype=dt, scale=2, shift=0.5), t(hid, dtype=dt), t(hid, dtype=dt), 1e-5], {})),
        ("rms_norm", tri("rms_norm"), reference_rms_norm,
         lambda dt: ([t(rows, hid, dtype=dt, scale=2), t(hid, dtype=dt), 1e-5], {})),
        ("bias_gelu", tri("bias_gelu"), reference_bias_gelu,
         lambda dt: ([t(rows, hid, dtype=dt), t(hid, dtype=dt)], {})),
        ("swiglu", tri("swiglu"), lambda x: registry.get("swiglu", "torch")(x),
         lambda dt: ([t(rows, 2 * hid, dtype=dt)], {})),
        ("rotary_halves", tri("rotary"), reference_rotary,
         lambda dt: ([t(b, h, s, d, dtype=dt), *rope(d // 2)], {"interleaved": False})),
        ("rotary_glm_interleaved", tri("rotary"), reference_rotary,
         lambda dt: ([t(b, h, s, d, dtype=dt), *rope(d // 4)], {"interleaved": True})),
        ("softmax_causal", scaled_masked_softmax, reference_scaled_masked_softmax,
         lambda dt: ([t(b, h, s, s, dtype=dt, scale=3), 0.125], {"causal": True})),
        ("linear_cross_entropy", tri("linear_cross_entropy"), reference_linear_cross_entropy,
         lambda dt: ([t(b, s, hid // 4, dtype=dt), t(vocab, hid // 4, dtype=dt, scale=0.05),
                      torch.randint(0, vocab, (b, s), generator=gen).to(device), pc], {"vocab_size": vocab})),
    ]
    flash = [
        ("flash_attn_causal", flash_attention, reference_attention, attn(h, True, False)),
        ("flash_attn_full", flash_attention, reference_attention, attn(h, False, False)),
        ("flash_attn_mqa", flash_attention, reference_attention, attn(1, True, False)),
        ("flash_attn_packed", flash_attention, reference_attention, attn(h, True, True)),
    ]
    return [(*c, both) for c in cases] + [(*c, flash_dtypes) for c in flash]


def part_kernels(dry: bool) -> dict:
    import torch

    device = _device(dry)
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # _max_rel_err; reference in fp32 on the same inputs
    bad, worst, n = [], {}, 0
    for name, fn, ref, make, dtypes in kernel_cases(device, dry):
        for dt in dtypes:
            try:
                args, kw = make(dt)
                mine = [a.detach().clone().requires_grad_(a.is_floating_point()) if torch.is_tensor(a) else a
                        for a in args]
                theirs = [a.detach().float().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point()
                          else a for a in args]
                y, r = fn(*mine, **kw), ref(*theirs, **kw)
                g = torch.randn(r.shape, generator=torch.Generator().manual_seed(1)).to(device)
                y.backward(g.to(y.dtype))
                r.backward(g.to(r.dtype))
                errs = [_max_rel_err(y, r)] + [_max_rel_err(a.grad, c.grad) for a, c in zip(mine, theirs)
                                               if torch.is_tensor(a) and a.grad is not None]
                err = max(errs)
                if not math.isfinite(err) or err > tol[dt]:
                    bad.append(f"{name} {str(dt)[6:]}: rel err {err:.2e} > {tol[dt]:.0e}")
                worst[str(dt)[6:]] = max(worst.get(str(dt)[6:], 0.0), err)
            except Exception as e:  # one broken kernel must not hide the others
                bad.append(f"{name} {str(dt)[6:]}: {type(e).__name__}: {e}"[:200])
            n += 1
    figure = f"{n - len(bad)}/{n} match (worst rel err " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + ")"
    return _result("FAIL" if bad else "ok", figure, " | ".join(bad)[:600])


# ---------------------------------------------------------------------------------------------- training
def _trainer(preset: str, seq: int, mb: int, kernels: str, lr: float = 1e-3):
    from megaocto.config.loader import load_run_config
    from megaocto.training.loop import Trainer

    run_dir = tempfile.mkdtemp(prefix="megaocto_gpu_check_")
    cfg = load_run_config(None, [
        "--model.preset", preset, "--model.kernels", kernels, "--model.seq_length", str(seq),
        "--model.attention_dropout", "0", "--model.hidden_dropout", "0",
        "--data.kind", "synthetic", "--data.num_workers", "0", "--train.micro_batch_size", str(mb),
        "--train.global_batch_size", str(mb), "--train.iters", "1000", "--train.dtype", "bf16",
        "--train.seed", "1234", "--optimizer.lr", str(lr), "--schedule.style", "constant",
        "--schedule.warmup_iters", "0", "--logging.jsonl", "false", "--logging.tensorboard", "false",
        "--logging.run_dir", run_dir])
    trainer = Trainer(cfg, stream=io.StringIO())
    return trainer, iter(trainer.train_loader())


def _step(trainer, batches) -> float:
    loss, _norm, _applied = trainer.train_step(batches)
    trainer.iteration += 1
    return float(loss)


def part_train(dry: bool) -> dict:
    import torch

    device = _device(dry)
    steps, seq, mb, lr = (4, 32, 2, 3e-3) if dry else (6, 64, 4, 3e-3)
    impls = ["auto"] if dry else ["auto", "torch"]
    bad, figs = [], []
    for preset in ("tiny-bigcode", "tiny-glm2", "tiny-llama"):
        first = {}
        for kernels in impls:
            try:
                trainer, batches = _trainer(preset, seq, mb, kernels, lr=lr)
                batches = itertools.repeat(next(batches))  # one fixed batch: its loss must fall
                losses = [_step(trainer, batches) for _ in range(steps)]
                first[kernels] = losses[0]
                if not all(math.isfinite(x) for x in losses) or losses[-1] >= losses[0]:
                    bad.append(f"{preset} kernels={kernels}: losses {[round(x, 3) for x in losses]}")
                if kernels == "auto":
                    figs.append(f"{preset} {losses[0]:.3f}->{losses[-1]:.3f}")
                del trainer, batches
            except Exception as e:
                traceback.print_exc()
                bad.append(f"{preset} kernels={kernels}: {type(e).__name__}: {e}"[:200])
        if len(first) == 2 and abs(first["auto"] - first["torch"]) > 2e-2 * abs(first["torch"]):
            bad.append(f"{preset}: first loss triton {first['auto']:.4f} vs torch {first['torch']:.4f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return _result("FAIL" if bad else "ok", f"bf16 on {device.type}, {steps} steps: " + "; ".join(figs),
                   " | ".join(bad)[:600])


def part_nccl(dry: bool) -> dict:
    import socket

    import torch
    import torch.distributed as dist

    from megaocto.parallel.context import ParallelContext

    device = _device(dry)
    backend = "gloo" if dry else "nccl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        os.environ[k] = v
    t0 = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        pc = ParallelContext.init(backend=backend)
        x = torch.arange(4, dtype=torch.float32, device=pc.device)
        dist.all_reduce(x, group=pc.dp_group)
        out = torch.empty(4, device=pc.device)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=pc.tp_group)
        dist.barrier()
        ok = torch.equal(out.cpu(), torch.arange(4, dtype=torch.float32)) and pc.device.type == device.type
        ver = ""
        if backend == "nccl":
            v = torch.cuda.nccl.version()
            ver = " NCCL " + (".".join(map(str, v)) if isinstance(v, tuple) else str(v))
        figure = f"{dist.get_backend()}{ver} on {pc.device}, world 1, init+collectives {time.perf_counter() - t0:.1f} s"
    finally:
        dist.destroy_process_group()
    return _result("ok" if ok else "FAIL", figure)


# ---------------------------------------------------------------------------------------------- benchmarks
def part_attention(dry: bool) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "bench"))
    from kernels_bench import Timer, attention_flops

    from megaocto.kernels.flash_attention import flash_attention

    device = _device(dry)
    b, h, s, d = (1, 2, 64, 32) if dry else (2, 16, 8192, 128)
    dt = torch.bfloat16
    timer = Timer(device, smoke=dry)

    def sdpa(q, k, v):
        if device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    impls = {"megaocto triton": lambda q, k, v: flash_attention(q, k, v, causal=True),
             "sdpa flash" if device.type == "cuda" else "sdpa": sdpa}
    try:
        from flash_attn import flash_attn_func

        impls["flash-attn"] = lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                                              v.transpose(1, 2), causal=True).transpose(1, 2)
    except ImportError:
        pass
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(device, dt).requires_grad_(True) for _ in range(3))
    do = torch.randn(b, h, s, d, generator=gen).to(device, dt)
    flops = attention_flops(b, h, d, float(s * s), True, "fwd+bwd")
    figs, bad = [], []
    for name, fn in impls.items():
        try:
            def call():
                fn(q, k, v).backward(do)
            ms = timer.ms(call, grad_to_none=[q, k, v])
            figs.append(f"{name} {flops / (ms * 1e-3) / 1e12:.3g}")
        except Exception as e:
            bad.append(f"{name}: {type(e).__name__}: {e}"[:200])
    missing = "" if "flash-attn" in impls else " (flash-attn not installed)"
    return _result("FAIL" if bad else "ok", f"TFLOP/s fwd+bwd causal b{b} h{h} s{s} d{d}: " + ", ".join(figs),
                   (" | ".join(bad) + missing).strip())


def part_train1b(dry: bool) -> dict:
    import torch

    from megaocto.model.flops import flops_per_token
    from megaocto.training.metrics import peak_tflops

    device = _device(dry)
    preset, seq, warmup, timed = ("tiny-bigcode", 32, 1, 1) if dry else ("starcoderbase-1b", 8192, 2, 3)
    trainer, batches = _trainer(preset, seq, 1, "auto", lr=1e-4)
    for _ in range(warmup):
        _step(trainer, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(timed):
        t0 = time.perf_counter()
        losses.append(_step(trainer, batches))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    tok_s = seq / sec
    fpt = flops_per_token(trainer.cfg.model, seq)
    tflops = fpt * tok_s / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = peak_tflops(name, "bf16")
    mfu = f"MFU {100 * tflops / peak:.1f}% of {peak:.0f}" if peak else "MFU n/a (unknown peak)"
    mem = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    ok = all(math.isfinite(x) for x in losses)
    return _result("ok" if ok else "FAIL",
                   f"{preset} seq {seq} mb 1 bf16: {sec * 1e3:.0f} ms/step, {tok_s:,.0f} tok/s, {tflops:.1f} TFLOP/s, "
                   f"{mfu}{mem}", f"kernels {_kernel_impls(trainer)}, 6N+12LHQT = {fpt:.3g} FLOPs/token, "
                   f"loss {losses[-1]:.3f}")


def _kernel_impls(trainer) -> str:
    """Which implementation the model's fused ops got (KernelOps.impls of its first block's attention)."""
    from megaocto.kernels.registry import ops_for

    ops = ops_for(trainer.cfg.model.kernels, trainer.pc.device)
    attn = ops.attention_backend or "auto (flash-attn / sdpa)"
    return f"{ops.impl}, attention {attn}"


# ---------------------------------------------------------------------------------------------- lora
def part_lora(dry: bool) -> dict:
    """LoRA vs full finetuning on the same model and batch (bench/lora_bench.py's shape and step, issue 16): step time
    and peak memory side by side, bf16 on the GPU (dry: fp32 on CPU, a 2-layer model)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("lora_bench", Path(__file__).with_name("lora_bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if dry:
        bench.LAYERS, bench.HIDDEN, bench.HEADS, bench.VOCAB, bench.B, bench.S = 2, 64, 4, 512, 2, 32
    dtype, steps = ("fp32", 2) if dry else ("bf16", 5)
    rows = {}
    for mode in ("full", "lora"):
        if torch.cuda.is_available() and not dry:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        rows[mode] = bench.run_mode(mode, steps, 1, dtype, 16)
    full, lora = rows["full"], rows["lora"]
    figure = (f"{dtype}, r=16: step {lora['step_s'] * 1e3:.0f} vs {full['step_s'] * 1e3:.0f} ms "
              f"({lora['step_s'] / full['step_s']:.2f}x), peak {lora['peak_bytes'] / 2**20:.0f} vs "
              f"{full['peak_bytes'] / 2**20:.0f} MiB ({full['peak_kind']}), optimizer+grads "
              f"{lora['optimizer_bytes'] / full['optimizer_bytes']:.3f}x")
    ok = lora["optimizer_bytes"] < full["optimizer_bytes"] and lora["trainable"] < full["trainable"]
    return _result("ok" if ok else "FAIL", figure, "" if ok else "LoRA did not shrink the trainable state")


# ---------------------------------------------------------------------------------------------- summary
def summary(directory: str) -> int:
    """Print the table of every part's result; exit 1 when any part failed or timed out."""
    d = Path(directory)
    meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
    rows, failed = [], 0
    for part in PARTS:
        rc_file, res_file = d / f"{part}.rc", d / f"{part}.json"
        if not rc_file.exists():
            rows.append((part, "NOT RUN", "-", "", "no time left in the total budget" if meta else ""))
            failed += 1
            continue
        rc, secs, limit = rc_file.read_text().split()
        if res_file.exists():
            r = json.loads(res_file.read_text())
            status = r["status"]
            figure, detail = r["figure"], r.get("detail", "")
        elif rc in ("124", "137"):
            status, figure, detail = "TIMEOUT", f"stopped at its {limit} s limit", ""
        else:
            status, figure, detail = "FAIL", f"exit {rc} without a result", f"see {part}.log"
        failed += status in ("FAIL", "TIMEOUT")
        rows.append((part, status, f"{float(secs):.0f}/{limit}", figure, detail))
    mode = "DRY RUN (CPU, tiny shapes; timings meaningless)" if meta.get("dry") else meta.get("device", "GPU")
    print(f"\nmegaocto GPU check — {mode}; total {meta.get('total_s', '?')} s of {meta.get('budget_s', '?')} s")
    w = max(len(r[3]) for r in rows)
    print(f"{'part':10s} {'status':8s} {'s/limit':>9s}  result")
    print("-" * (31 + w))
    for part, status, t, figure, detail in rows:
        print(f"{part:10s} {status:8s} {t:>9s}  {figure}")
        if detail:
            print(f"{'':30s}{detail}")
    print(f"{len(PARTS) - failed}/{len(PARTS)} parts ok (skip counts as ok: nothing to run)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=[*PARTS, "summary"])
    ap.add_argument("--out", help="write the part's result JSON here")
    ap.add_argument("--dir", help="summary: the folder of the parts' results")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton under the interpreter")
    args = ap.parse_args(argv)
    if args.part == "summary":
        return summary(args.dir)
    t0 = time.perf_counter()
    try:
        res = globals()[f"part_{args.part}"](args.dry_run)
    except Exception as e:
        traceback.print_exc()
        res = _result("FAIL", f"{type(e).__name__}: {e}"[:300])
    res.update(part=args.part, seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res))
    return 0 if res["status"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
