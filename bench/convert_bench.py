"""Converter benchmark: a random ~1B-parameter GPTBigCode (HF safetensors) converted both ways, vs plain I/O.

    .venv/bin/python bench/convert_bench.py                 # --params 1e9, bf16, tp=2 (needs ~12 GB free disk)
    .venv/bin/python bench/convert_bench.py --small         # a few seconds: checks the harness end to end

Steps, each in its own subprocess (peak RSS = the child's own ``ru_maxrss``; time = the operation
inside the child, so interpreter/torch start-up is excluded from every row alike):

  gen        write the random HF checkpoint: config.json + safetensors shards of --shard-size (not timed against)
  io         baseline: for each shard, ``safetensors.torch.load_file`` + ``save_file`` + fsync (the same bytes)
  from-hf    ``megaocto.convert.hf.from_hf(hf, ckpt, tp=--tp)``  (megaocto release checkpoint, TP-sharded)
  to-hf      ``megaocto.convert.hf.to_hf(ckpt, hf2, max_shard_size=--shard-size)``
  from-megatron  ``megaocto.convert.megatron.convert_megatron(meg, ckpt2)`` of a tp=--tp bigcode Megatron-LM copy
             of the same weights (written untimed by gen-megatron; skip with --no-megatron)

``--baseline-ref REF`` also runs to-hf with megaocto of git ref REF (``git archive`` into the workdir), interleaved
with the other steps in every repeat, so a change is measured against its baseline under the same load; ``--only
to-hf`` times only io and to-hf (from-hf still runs once, untimed, to make the checkpoint). The table lists every
run's wall time besides the best, and the last line the load average at the start and the end.

The ratio column is time / io time (issue 5 target: <= 1.5). GPTBigCode tensors are generated directly (no
transformers model is instantiated). ``--profile`` reruns from-hf and to-hf under cProfile and prints where the
time goes. Everything lives under --workdir and is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# ------------------------------------------------------------------------------------------ model shape
def shape_for(params: float, small: bool) -> dict:
    """A GPTBigCode (MQA) config dict of about ``params`` parameters (SantaCoder-like widths)."""
    if small:
        h, heads, vocab, n_pos = 256, 8, 4099, 512
    else:
        h, heads, vocab, n_pos = 2048, 16, 49152, 2048
    d = h // heads
    per_layer = (h * h + h) + (2 * d * h + 2 * d) + (h * h + h) + (8 * h * h + 5 * h) + 4 * h
    fixed = vocab * h + n_pos * h + 2 * h
    layers = 4 if small else max(1, round((params - fixed) / per_layer))
    return {"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"], "n_embd": h, "n_head": heads,
            "n_layer": layers, "n_inner": 4 * h, "n_positions": n_pos, "vocab_size": vocab, "multi_query": True,
            "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "scale_attn_weights": True, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0}


def hf_tensor_shapes(conf: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, d, ffn = conf["n_embd"], conf["n_embd"] // conf["n_head"], conf["n_inner"]
    out = [("transformer.wte.weight", (conf["vocab_size"], h)), ("transformer.wpe.weight", (conf["n_positions"], h))]
    for i in range(conf["n_layer"]):
        p = f"transformer.h.{i}."
        out += [(p + "ln_1.weight", (h,)), (p + "ln_1.bias", (h,)),
                (p + "attn.c_attn.weight", (h + 2 * d, h)), (p + "attn.c_attn.bias", (h + 2 * d,)),
                (p + "attn.c_proj.weight", (h, h)), (p + "attn.c_proj.bias", (h,)),
                (p + "ln_2.weight", (h,)), (p + "ln_2.bias", (h,)),
                (p + "mlp.c_fc.weight", (ffn, h)), (p + "mlp.c_fc.bias", (ffn,)),
                (p + "mlp.c_proj.weight", (h, ffn)), (p + "mlp.c_proj.bias", (h,))]
    return out + [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]


# ------------------------------------------------------------------------------------------ children
def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def child_gen(hf_dir: str, params: float, small: bool, dtype: str, shard_size: int) -> dict:
    """Write config.json and random safetensors shards (HF names, sharded with an index past one shard)."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    conf = shape_for(params, small)
    conf["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
    os.makedirs(hf_dir)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(conf, f, indent=2)
    g = torch.Generator().manual_seed(0)
    shards: list[dict] = [{}]
    size, total, numel = 0, 0, 0
    names: list[list[str]] = [[]]

    def flush() -> None:
        if shards[-1]:
            save_file(shards[-1], os.path.join(hf_dir, f"shard-{len(shards):05d}.safetensors"),
                      metadata={"format": "pt"})
            shards[-1] = {}

    for name, shape in hf_tensor_shapes(conf):
        t = torch.empty(shape, dtype=torch_dtype)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=g)
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_size:
            flush()
            shards.append({})
            names.append([])
            size = 0
        shards[-1][name] = t
        names[-1].append(name)
        size += nbytes
        total += nbytes
        numel += t.numel()
    flush()
    n = len(names)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, fname in enumerate(final):
        os.replace(os.path.join(hf_dir, f"shard-{i + 1:05d}.safetensors"), os.path.join(hf_dir, fname))
    if n > 1:
        weight_map = {k: final[i] for i, ks in enumerate(names) for k in ks}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    _fsync_tree(hf_dir)
    return {"bytes": total, "params": numel, "shards": n, "layers": conf["n_layer"], "hidden": conf["n_embd"]}


def child_io(hf_dir: str, out_dir: str) -> dict:
    """The baseline: read every safetensors shard into memory and write it back out (fsynced)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out_dir)
    nbytes = 0
    for fname in sorted(os.listdir(hf_dir)):
        if fname.endswith(".safetensors"):
            tensors = load_file(os.path.join(hf_dir, fname))
            nbytes += sum(t.numel() * t.element_size() for t in tensors.values())
            path = os.path.join(out_dir, fname)
            save_file(tensors, path, metadata={"format": "pt"})
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
            del tensors
    return {"bytes": nbytes}


def child_from_hf(hf_dir: str, ckpt: str, tp: int) -> dict:
    from megaocto.convert.hf import from_hf

    from_hf(hf_dir, ckpt, tp=tp, progress=False)
    return {}


def child_to_hf(ckpt: str, out_dir: str, shard_size: int) -> dict:
    from megaocto.convert.hf import to_hf

    to_hf(ckpt, out_dir, max_shard_size=shard_size, progress=False)
    return {}


def child_gen_megatron(hf_dir: str, meg_dir: str, tp: int) -> dict:
    """The same random weights as a bigcode Megatron-LM MQA checkpoint at ``tp`` (iter_0000001/mp_rank_XX/), one
    rank file at a time (layout: megaocto/convert/megatron.py; not timed against)."""
    import argparse as ap
    import json as js

    import torch
    from safetensors import safe_open

    conf = js.load(open(os.path.join(hf_dir, "config.json")))
    h, heads, layers = conf["n_embd"], conf["n_head"], conf["n_layer"]
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    handles = [safe_open(os.path.join(hf_dir, f), "pt") for f in files]
    where = {k: hd for hd in handles for k in hd.keys()}

    def get(name: str) -> torch.Tensor:
        return where[name].get_tensor(name)

    step = 128 * tp
    padded = -(-conf["vocab_size"] // step) * step  # Megatron pads the vocab to a multiple of 128 * tp
    args = ap.Namespace(num_layers=layers, hidden_size=h, num_attention_heads=heads, kv_channels=h // heads,
                        ffn_hidden_size=conf["n_inner"], padded_vocab_size=padded,
                        make_vocab_size_divisible_by=128, max_position_embeddings=conf["n_positions"],
                        seq_length=conf["n_positions"], attention_head_type="multiquery",
                        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, bias_gelu_fusion=True)
    it = os.path.join(meg_dir, "iter_0000001")
    for r in range(tp):
        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.chunk(tp, dim=0)[r].clone()

        def cols(t: torch.Tensor) -> torch.Tensor:
            return t.chunk(tp, dim=1)[r].clone()

        enc: dict[str, torch.Tensor] = {}
        for i in range(layers):
            hf, m = f"transformer.h.{i}.", f"layers.{i}."
            qkv_w, qkv_b = get(hf + "attn.c_attn.weight"), get(hf + "attn.c_attn.bias")
            enc.update({
                m + "input_layernorm.weight": get(hf + "ln_1.weight"),
                m + "input_layernorm.bias": get(hf + "ln_1.bias"),
                m + "self_attention.query.weight": rows(qkv_w[:h]), m + "self_attention.query.bias": rows(qkv_b[:h]),
                m + "self_attention.key_value.weight": qkv_w[h:].clone(),
                m + "self_attention.key_value.bias": qkv_b[h:].clone(),
                m + "self_attention.dense.weight": cols(get(hf + "attn.c_proj.weight")),
                m + "self_attention.dense.bias": get(hf + "attn.c_proj.bias"),
                m + "post_attention_layernorm.weight": get(hf + "ln_2.weight"),
                m + "post_attention_layernorm.bias": get(hf + "ln_2.bias"),
                m + "mlp.dense_h_to_4h.weight": rows(get(hf + "mlp.c_fc.weight")),
                m + "mlp.dense_h_to_4h.bias": rows(get(hf + "mlp.c_fc.bias")),
                m + "mlp.dense_4h_to_h.weight": cols(get(hf + "mlp.c_proj.weight")),
                m + "mlp.dense_4h_to_h.bias": get(hf + "mlp.c_proj.bias")})
        enc["final_layernorm.weight"], enc["final_layernorm.bias"] = get("transformer.ln_f.weight"), get(
            "transformer.ln_f.bias")
        wte = get("transformer.wte.weight")
        wte = torch.cat([wte, wte.new_zeros(padded - wte.shape[0], h)]) if padded > wte.shape[0] else wte
        lm = {"embedding": {"word_embeddings": {"weight": rows(wte)},
                            "position_embeddings": {"weight": get("transformer.wpe.weight")}}, "encoder": enc}
        os.makedirs(os.path.join(it, f"mp_rank_{r:02d}"))
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1, "model": {"language_model": lm}},
                   os.path.join(it, f"mp_rank_{r:02d}", "model_optim_rng.pt"))
        del enc, lm
    with open(os.path.join(meg_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("1\n")
    _fsync_tree(meg_dir)
    return {}


def child_from_megatron(meg_dir: str, ckpt: str) -> dict:
    from megaocto.convert.megatron import convert_megatron

    convert_megatron(meg_dir, ckpt, progress=False)
    return {}


CHILDREN = {"gen": child_gen, "io": child_io, "from-hf": child_from_hf, "to-hf": child_to_hf,
            "gen-megatron": child_gen_megatron, "from-megatron": child_from_megatron}
# Imported before the clock starts (fixed start-up cost, reported separately as import_s; for the converters
# this includes the first meta-device model build, which imports megaocto's model and kernel code).
PRELOAD = {"gen": ("torch", "safetensors.torch"), "io": ("torch", "safetensors.torch"),
           "gen-megatron": ("torch", "safetensors.torch"),
           "from-megatron": ("megaocto.convert.megatron", "transformers"),
           "from-hf": ("megaocto.convert.hf", "transformers"), "to-hf": ("megaocto.convert.hf", "transformers")}


class _RssSampler:
    """Peak anonymous (heap) and file-backed RSS of this process, sampled from /proc/self/status every 20 ms.

    ru_maxrss mixes both; file-backed pages of mmap-ed reads are reclaimable page cache, so the heap figure is the
    one the "one shard plus one layer" memory target is about.
    """

    def __init__(self) -> None:
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]))  # kB
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _child_main(name: str, args_json: str, profile: bool) -> None:
    import importlib

    kwargs = json.loads(args_json)
    t0 = time.perf_counter()
    for mod in PRELOAD[name]:
        importlib.import_module(mod)
    if name in ("from-hf", "to-hf", "from-megatron"):
        from transformers import GPTBigCodeConfig  # noqa: F401  (lazy attribute of transformers)

        from megaocto.config.model import ModelConfig
        from megaocto.convert.core import param_specs

        param_specs(ModelConfig())  # builds a meta model once: imports the model code (triton, sympy, ...)
    import_s = time.perf_counter() - t0
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        info = CHILDREN[name](**kwargs)
        prof.disable()
        info["seconds"] = time.perf_counter() - t0
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(15)
    else:
        cpu0 = os.times()
        t0 = time.perf_counter()
        with _RssSampler() as rss:
            info = CHILDREN[name](**kwargs)
        info["seconds"] = time.perf_counter() - t0
        cpu1 = os.times()
        info["cpu_s"] = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        info["peak_anon_gib"] = rss.peak["RssAnon"] / 2**20
        info["peak_file_gib"] = rss.peak["RssFile"] / 2**20
    import resource

    info["import_s"] = import_s
    info["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print("RESULT " + json.dumps(info), flush=True)


def run_child(name: str, profile: bool = False, pythonpath: str | None = None, **kwargs) -> dict:
    """Run one step in a fresh interpreter; returns its result (seconds, peak_rss_gib, ...). ``pythonpath`` puts
    another megaocto tree first on the path (the --baseline-ref step)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--child-args", json.dumps(kwargs)]
    if profile:
        cmd.append("--profile")
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if profile else subprocess.PIPE, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"step {name} failed (exit {proc.returncode}):\n{proc.stderr or ''}{proc.stdout}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9, help="target parameter count (default 1e9)")
    ap.add_argument("--small", action="store_true", help="tiny model (h=256, 4 layers): a quick harness check")
    ap.add_argument("--dtype", choices=sorted(BYTES), default="bf16", help="checkpoint dtype (default bf16)")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the from-hf output (default 2)")
    ap.add_argument("--shard-size", default="1GB", help="HF safetensors shard size, source and to-hf (default 1GB)")
    ap.add_argument("--workdir", default="/tmp/megaocto_convert_bench", help="scratch directory (emptied first)")
    ap.add_argument("--repeats", type=int, default=1, help="run each timed step N times, report the fastest")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    ap.add_argument("--no-megatron", action="store_true",
                    help="skip the from-megatron step (a tp=2 bigcode Megatron-LM copy of the same weights)")
    ap.add_argument("--profile", action="store_true", help="also profile from-hf and to-hf (cProfile, to stderr)")
    ap.add_argument("--baseline-ref", default=None,
                    help="git ref (e.g. a commit before a change): also run to-hf with megaocto of that ref "
                         "(git archive into the workdir), interleaved with the other steps, as 'to-hf @REF'")
    ap.add_argument("--only", default=None,
                    help="comma-separated steps to time besides io (from-hf is always run, untimed if not listed): "
                         "e.g. to-hf")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child_main(args.child, args.child_args, args.profile)
        return

    from megaocto.convert.io import parse_size

    shard = parse_size(args.shard_size)
    load0 = os.getloadavg()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    hf, io_out, ckpt, hf2, meg, ckpt_meg = (os.path.join(work, n) for n in (
        "hf", "io_copy", "ckpt_tp", "hf_back", "megatron", "ckpt_from_megatron"))
    try:
        gen = run_child("gen", hf_dir=hf, params=args.params, small=args.small, dtype=args.dtype, shard_size=shard)
        gib = gen["bytes"] / 2**30
        print(f"model: {gen['params'] / 1e9:.3f} B params, {gen['layers']} layers, h={gen['hidden']}, MQA, "
              f"{args.dtype}, {gib:.2f} GiB in {gen['shards']} safetensors shard(s); generated in "
              f"{gen['seconds']:.1f} s", flush=True)
        best: dict[str, dict] = {}

        runs: dict[str, list[float]] = {}

        def keep_best(label: str, info: dict) -> None:
            runs.setdefault(label, []).append(info["seconds"])
            if label not in best or info["seconds"] < best[label]["seconds"]:
                best[label] = info

        labels = ("io (safetensors load+save)", f"from-hf tp={args.tp}", "to-hf", f"from-megatron tp={args.tp}")
        if not args.no_megatron:
            run_child("gen-megatron", hf_dir=hf, meg_dir=meg, tp=args.tp)
        else:
            labels = labels[:3]
        base_tree = None
        if args.baseline_ref:
            base_tree = os.path.join(work, "baseline_tree")
            os.makedirs(base_tree)
            repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            archive = subprocess.run(["git", "-C", repo, "archive", args.baseline_ref, "megaocto"],
                                     stdout=subprocess.PIPE, check=True).stdout
            subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
            helpers = [f for f in os.listdir(os.path.join(repo, "megaocto")) if f.startswith("_helpers")]
            for f in helpers:  # the compiled index helpers are build outputs, not in git
                shutil.copy(os.path.join(repo, "megaocto", f), os.path.join(base_tree, "megaocto", f))
            labels = (*labels, f"to-hf @{args.baseline_ref}")
        only = set(args.only.split(",")) if args.only else None
        if only:
            labels = tuple(lb for lb in labels if lb == labels[0] or lb.split(" ")[0] in only or "@" in lb)
        # Interleaved, so load changes on a shared machine hit every step alike. Each step first deletes its own
        # output of the previous repeat (if any) and nothing else: writing new files into memory that was just freed
        # costs far less kernel time on this VM than writing into memory not touched for a while (measured: the same
        # io step took 0.5 s vs 1.3-1.5 s of system time), so every step must start from the same state; before,
        # io and from-hf ran right after a deletion and to-hf / from-megatron did not.
        def fresh(path: str) -> str:
            shutil.rmtree(path, ignore_errors=True)
            return path

        timed = set(labels)
        for rep in range(args.repeats):
            keep_best(labels[0], run_child("io", hf_dir=hf, out_dir=fresh(io_out)))
            if rep == 0 or f"from-hf tp={args.tp}" in timed:
                info = run_child("from-hf", hf_dir=hf, ckpt=fresh(ckpt), tp=args.tp)
                if f"from-hf tp={args.tp}" in timed:
                    keep_best(f"from-hf tp={args.tp}", info)
            if base_tree and rep % 2 == 1:  # alternate which of the two to-hf runs first
                keep_best(f"to-hf @{args.baseline_ref}", run_child("to-hf", pythonpath=base_tree, ckpt=ckpt,
                                                                    out_dir=fresh(hf2), shard_size=shard))
            if "to-hf" in timed:
                keep_best("to-hf", run_child("to-hf", ckpt=ckpt, out_dir=fresh(hf2), shard_size=shard))
            if base_tree and rep % 2 == 0:
                keep_best(f"to-hf @{args.baseline_ref}", run_child("to-hf", pythonpath=base_tree, ckpt=ckpt,
                                                                    out_dir=fresh(hf2), shard_size=shard))
            if not args.no_megatron and f"from-megatron tp={args.tp}" in timed:
                keep_best(f"from-megatron tp={args.tp}", run_child("from-megatron", meg_dir=meg,
                                                                   ckpt=fresh(ckpt_meg)))
        shutil.rmtree(io_out, ignore_errors=True)
        rows = [(label, best[label]) for label in labels]
        base = rows[0][1]["seconds"]
        cpu_base = rows[0][1]["cpu_s"]
        print("\n| step | wall s | GiB/s | x io wall | CPU s | x io CPU | peak RSS GiB | peak heap (anon) GiB "
              "| peak file-backed GiB | imports s (untimed) | every run, wall s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for label, info in rows:
            print(f"| {label} | {info['seconds']:.2f} | {gib / info['seconds']:.2f} | "
                  f"{info['seconds'] / base:.2f} | {info['cpu_s']:.2f} | {info['cpu_s'] / cpu_base:.2f} | "
                  f"{info['peak_rss_gib']:.2f} | {info['peak_anon_gib']:.2f} | {info['peak_file_gib']:.2f} | "
                  f"{info['import_s']:.1f} | {' '.join(f'{x:.2f}' for x in runs[label])} |")
        print("\npeak RSS: the step's ru_maxrss (interpreter + torch included); heap/file-backed: peaks of RssAnon / "
              "RssFile sampled every 20 ms (file-backed = mmap-ed reads, reclaimable page cache). CPU s: user+sys of "
              "the timed part (less sensitive to other load on a shared machine than wall time)")
        worst = max(info["seconds"] / base for label, info in rows[1:] if "@" not in label)  # not the baseline
        verdict = "met" if worst <= 1.5 else f"missed by {worst / 1.5:.2f}x"
        print(f"target (each conversion <= 1.5x the io time): {verdict}; machine: {platform.node()}, "
              f"{os.cpu_count()} cpu, python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M %Z')}; "
              f"load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
        if args.profile:
            shutil.rmtree(ckpt)
            shutil.rmtree(hf2)
            print("\n--- profile from-hf ---", flush=True)
            run_child("from-hf", profile=True, hf_dir=hf, ckpt=ckpt, tp=args.tp)
            print("\n--- profile to-hf ---", flush=True)
            run_child("to-hf", profile=True, ckpt=ckpt, out_dir=hf2, shard_size=shard)
            if not args.no_megatron:
                shutil.rmtree(ckpt_meg)
                print("\n--- profile from-megatron ---", flush=True)
                run_child("from-megatron", profile=True, meg_dir=meg, ckpt=ckpt_meg)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
