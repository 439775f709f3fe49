"""Layout planner: which (tp, pp, dp, ZeRO-1, recompute, micro batch) layouts fit, ranked by estimated step time.

Pure python over :mod:`megaocto.model.memory` (what fits) and :mod:`megaocto.model.flops` (how much work); no torch.
The cost model is deliberately simple and every constant in it is printed with the plan (:func:`assumptions`):

* **compute**: ``global_batch * seq * flops_per_token / gpus`` FLOPs per GPU (6N + 12·L·H·Q·T, the MFU convention
  of :func:`megaocto.model.flops.flops_per_token`) plus what recompute repeats (full: one more forward of every
  layer; selective: the attention core's forward, 4·L·H·Q·T per token), run at ``peak * efficiency`` where the
  efficiency is the GPU kind's achievable fraction of peak (:data:`GPUS`) times a GEMM-size factor
  ``r / (r + GEMM_ROWS_HALF)`` for ``r = micro_batch * seq`` rows per GEMM (small micro batches run slower GEMMs).
  and ``k / (k + GEMM_WIDTH_HALF)`` for the per-GPU width ``k = hidden / tp`` (TP shards make narrower GEMMs,
  which is why Megatron advises the smallest tp that fits).
* **tensor parallel** (never overlapped): per layer and micro batch, 2 all-reduces forward and 2 backward of the
  ``[seq, micro_batch, hidden]`` bf16 activations (with sequence parallelism the same volume as all-gathers plus
  reduce-scatters: megaocto keeps the gathered GEMM input for backward, so it does not re-gather), 2 more forward
  with full recompute, plus the embedding's; ring cost ``2 (t-1)/t`` bytes per byte of an all-reduce over
  NVLink. TP groups must fit in one node.
* **data parallel**: fp32 main grads (4 bytes/param per GPU) all-reduced (``2 (d-1)/d``), or with ZeRO-1
  reduce-scattered (``(d-1)/d``) plus the updated bf16 params all-gathered (``(d-1)/d`` of 2 bytes/param). The
  reduction overlaps the last micro batch's backward (megaocto's overlapped buckets); the ZeRO-1 all-gather is
  synchronous in megaocto, so it is exposed. Over NVLink when the whole DP group is inside a node, else over the
  node's network links shared by its GPUs.
* **pipeline parallel** (megaocto's non-interleaved 1F1B, ``parallel.pp``; ``parallel.virtual_pp`` is not modelled):
  bubble ``(p-1)/m`` of the compute + TP time, p2p of the (sequence-parallel-sharded) activations and their grads
  between stages, and the tied-embedding grad all-reduce between the first and last stage.

Rank order is Megatron's (TP fastest, then DP, then PP), which decides which groups stay inside a node.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from megaocto.config.base import ConfigError
from megaocto.config.model import ModelConfig
from megaocto.model.flops import flops_per_token, num_matmul_params
from megaocto.model.memory import GIB, MemoryEstimate, estimate_memory

RECOMPUTE = ("none", "selective", "full")
GEMM_ROWS_HALF = 512  # rows per GEMM at which the GEMM-size factor is 1/2 (r / (r + 512)): 0.80 at 2048, 0.94 at 8192
GEMM_WIDTH_HALF = 128  # per-GPU hidden/tp at which the width factor is 1/2 (k / (k + 128)): 0.86 at 768, 0.97 at 4096
LINK_EFFICIENCY = 0.8  # NCCL bus bandwidth reached / link rate (ring collectives and p2p)


@dataclass(frozen=True)
class GpuKind:
    """One accelerator model and the node it usually comes in."""

    name: str  # as printed
    peak_tflops: float  # dense bf16 tensor-core peak (megaocto.training.metrics.PEAK_TFLOPS)
    efficiency: float  # achievable fraction of peak for the model's GEMMs at large shapes (the MFU assumption)
    memory_gib: float  # memory per GPU
    nvlink_gbs: float  # NVLink bandwidth per GPU, one direction, GB/s
    node_network_gbit: float  # inter-node network per node (all NICs), Gbit/s
    source: str


GPUS: dict[str, GpuKind] = {
    "a100": GpuKind("A100 80GB SXM", 312.0, 0.50, 80.0, 300.0, 1600.0,
                    "NVIDIA A100 datasheet (312 TFLOP/s bf16 dense, NVLink3 600 GB/s both directions); DGX A100 / "
                    "SuperPOD: 8 x HDR 200 Gb/s InfiniBand per node; efficiency: Megatron-LM reports 44-52% of "
                    "peak on A100 for GPT 1-175B (Narayanan et al. 2021)"),
    "h100": GpuKind("H100 80GB SXM", 989.4, 0.40, 80.0, 450.0, 3200.0,
                    "NVIDIA H100 SXM datasheet (989 TFLOP/s bf16 dense, NVLink4 900 GB/s both directions); DGX H100: "
                    "8 x NDR 400 Gb/s InfiniBand per node; efficiency: bf16 Llama/GPT training on H100 reaches "
                    "~38-45% MFU (torchtitan, Megatron-Core reports)"),
    "h200": GpuKind("H200 141GB SXM", 989.4, 0.40, 141.0, 450.0, 3200.0,
                    "as H100 SXM (same compute and NVLink4) with 141 GB HBM3e"),
}


@dataclass(frozen=True)
class Hardware:
    """The machine a plan is for."""

    gpu: GpuKind
    gpus: int  # total GPUs
    gpus_per_node: int = 8
    memory_gib: float | None = None  # per GPU; None = the GPU kind's
    headroom: float = 0.15  # fraction of memory kept free for allocator fragmentation, NCCL buffers, CUDA context
    nvlink_gbs: float | None = None  # per GPU, one direction; None = the GPU kind's
    node_network_gbit: float | None = None  # per node; None = the GPU kind's usual node
    link_efficiency: float = LINK_EFFICIENCY

    def __post_init__(self):
        if self.gpus < 1 or self.gpus_per_node < 1:
            raise ValueError(f"gpus and gpus_per_node must be >= 1 (got {self.gpus}, {self.gpus_per_node})")
        if not 0 <= self.headroom < 1:
            raise ValueError(f"headroom must be in [0, 1) (got {self.headroom})")

    @property
    def memory_bytes(self) -> float:
        return (self.memory_gib if self.memory_gib is not None else self.gpu.memory_gib) * GIB

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes * (1 - self.headroom)

    @property
    def nvlink(self) -> float:
        """NVLink GB/s per GPU per direction."""
        return self.nvlink_gbs if self.nvlink_gbs is not None else self.gpu.nvlink_gbs

    @property
    def network(self) -> float:
        """Inter-node Gbit/s per node."""
        return self.node_network_gbit if self.node_network_gbit is not None else self.gpu.node_network_gbit

    @property
    def intra_bw(self) -> float:
        """Bytes/s one GPU moves over NVLink in a ring collective."""
        return self.nvlink * 1e9 * self.link_efficiency

    @property
    def inter_bw(self) -> float:
        """Bytes/s one GPU moves over the network (its share of the node's links) in a ring collective."""
        return self.network / 8 * 1e9 / self.gpus_per_node * self.link_efficiency


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    num_microbatches: int  # per DP rank per step: global_batch / (dp * micro_batch)
    zero1: bool
    recompute: str
    sequence_parallel: bool

    @property
    def runnable(self) -> bool:
        """Whether megaocto's training loop runs this layout: every layout the planner forms (tp, pp, dp, ZeRO-1,
        recompute, micro batch) is one it trains; kept so callers can still ask for pp = 1 only (max_pp=1)."""
        return True

    def overrides(self) -> str:
        """The `megaocto train` overrides that select this layout (world size = tp * pp * dp from the launcher)."""
        parts = [f"--parallel.tp {self.tp}"]
        if self.pp > 1:
            parts.append(f"--parallel.pp {self.pp}")
        if self.tp > 1:
            parts.append(f"--parallel.sequence_parallel {str(self.sequence_parallel).lower()}")
        parts += [f"--train.micro_batch_size {self.micro_batch}", f"--train.zero1 {str(self.zero1).lower()}",
                  f"--train.recompute {self.recompute}"]
        return " ".join(parts)


@dataclass
class Estimate:
    layout: Layout
    memory: MemoryEstimate
    fits: bool
    compute_s: float  # model + recompute FLOPs at the achievable rate, whole step, one GPU
    tp_s: float  # TP collectives (exposed)
    dp_s: float  # DP grad reduction / ZeRO-1 all-gather (exposed part)
    pp_s: float  # pipeline bubble + p2p + embedding sync (exposed)
    step_s: float
    tokens_per_s: float  # whole job
    mfu: float  # model FLOPs (no recompute) per GPU per second / peak

    @property
    def memory_gib(self) -> float:
        return self.memory.total / GIB


@dataclass
class Plan:
    model: str
    hardware: Hardware
    seq_len: int
    global_batch: int
    estimates: list[Estimate]  # every layout that was estimated, best first (fitting ones before the others)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count of candidate layouts not estimated
    overlap_grad_reduce: bool = True  # as estimated (see estimate())
    lora: bool = False  # the model trains LoRA adapters on a frozen base (model.lora)

    @property
    def feasible(self) -> list[Estimate]:
        return [e for e in self.estimates if e.fits]

    def best(self, *, runnable_only: bool = False) -> Estimate | None:
        for e in self.feasible:
            if e.layout.runnable or not runnable_only:
                return e
        return None

    def by_shape(self) -> list[Estimate]:
        """The best fitting layout of each (tp, pp), best first."""
        seen, out = set(), []
        for e in self.feasible:
            key = (e.layout.tp, e.layout.pp)
            if key not in seen:
                seen.add(key)
                out.append(e)
        return out

    def shape_rank(self, tp: int, pp: int) -> int | None:
        """1-based rank of (tp, pp) in :meth:`by_shape`; None when no layout of that shape fits."""
        for i, e in enumerate(self.by_shape(), 1):
            if (e.layout.tp, e.layout.pp) == (tp, pp):
                return i
        return None

    def rank_of(self, **fields) -> int | None:
        """1-based rank among the feasible layouts of the best one whose layout matches every given field."""
        for i, e in enumerate(self.feasible, 1):
            if all(getattr(e.layout, k) == v for k, v in fields.items()):
                return i
        return None


def parse_memory(text: str) -> float:
    """GiB from '80GB', '80GiB', '80', '141 GB' (GPU vendors' 'GB' on memory sizes is GiB: an A100 80GB has 80 GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"GPU memory {text!r} not understood; give it like 80GB (GiB per GPU)")
    value = float(m.group(1))
    if value <= 0:
        raise ValueError(f"GPU memory must be > 0 (got {text!r})")
    return value


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
    try:
        cfg.validate(tp)
    except ConfigError:
        return False
    return True


def estimate(cfg: ModelConfig, hw: Hardware, layout: Layout, *, seq_len: int, global_batch: int,
             dtype: str = "bf16", flash_attention: bool = True, overlap_grad_reduce: bool = True) -> Estimate:
    """Memory and step-time estimate of one layout (see the module docstring for the model).

    ``overlap_grad_reduce=False`` models a trainer that reduces the gradients after the backward (megaocto's
    ``train.overlap_grad_reduce false``; Megatron-LM before ``--overlap-grad-reduce``).
    """
    t, p, d, mb, m = layout.tp, layout.pp, layout.dp, layout.micro_batch, layout.num_microbatches
    mem = estimate_memory(cfg, tp=t, pp=p, dp=d, micro_batch=mb, seq_len=seq_len, dtype=dtype, zero1=layout.zero1,
                          recompute=layout.recompute, sequence_parallel=layout.sequence_parallel,
                          flash_attention=flash_attention, num_microbatches=m)
    elem = 4 if dtype == "fp32" else 2
    gpu = hw.gpu
    # ---- compute
    fpt = flops_per_token(cfg, seq_len)
    if cfg.lora.enabled:  # frozen base: no weight-gradient GEMMs (2N of the 6N); the rank-r adapters are negligible
        fpt -= 2.0 * num_matmul_params(cfg)
    attn_fwd = 4.0 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    head = 6.0 * cfg.padded_vocab_size() * cfg.hidden_size
    extra = {"none": 0.0, "selective": attn_fwd, "full": (fpt - head) / 3}[layout.recompute]
    tokens = global_batch * seq_len
    rows = mb * seq_len
    width = cfg.hidden_size / t
    rate = (gpu.peak_tflops * 1e12 * gpu.efficiency * rows / (rows + GEMM_ROWS_HALF)
            * width / (width + GEMM_WIDTH_HALF))
    compute_s = tokens * (fpt + extra) / hw.gpus / rate
    # ---- tensor parallel: per micro batch, per layer of this stage, all-reduce-equivalents of [s, b, h]
    act = elem * seq_len * mb * cfg.hidden_size
    tp_s = 0.0
    if t > 1:
        per_layer = 4 + (2 if layout.recompute == "full" else 0)
        ar = 2 * (t - 1) / t * act / hw.intra_bw
        n_ar = per_layer * (cfg.num_layers // p) + 1  # + the embedding's (first stage)
        tp_s = m * n_ar * ar
    # ---- data parallel
    dp_in_node = t * d <= hw.gpus_per_node
    dp_bw = hw.intra_bw if dp_in_node else hw.inter_bw
    # the DP reduction and ZeRO-1 all-gather move the trainable params only (LoRA: the adapters; fp32 grads = 4 B)
    n = mem.grads / 4 if cfg.lora.enabled else mem.params_per_gpu
    dp_s = 0.0
    if d > 1:
        frac = (d - 1) / d
        reduce_s = (frac if layout.zero1 else 2 * frac) * 4 * n / dp_bw
        window = (2 / 3) * (compute_s + tp_s) / m if overlap_grad_reduce else 0.0  # last micro batch's backward
        dp_s = max(0.0, reduce_s - window)
        if layout.zero1:
            dp_s += frac * elem * n / dp_bw
    # ---- pipeline parallel
    pp_s = 0.0
    if p > 1:
        stage_in_node = hw.gpus // p < hw.gpus_per_node
        p2p_bw = hw.intra_bw if stage_in_node else hw.inter_bw  # one direction of the link
        shard = act / (t if layout.sequence_parallel else 1)
        pp_s = (p - 1) / m * (compute_s + tp_s)  # bubble
        pp_s += (m + p - 1) * 2 * shard / p2p_bw  # activations forward + grads backward on the critical path
        if cfg.tie_embeddings:
            emb = cfg.padded_vocab_size(t) * cfg.hidden_size // t * 4
            pp_s += 2 * emb / (hw.intra_bw if stage_in_node else hw.inter_bw)
    step_s = compute_s + tp_s + dp_s + pp_s
    tok_s = tokens / step_s
    mfu = fpt * tok_s / hw.gpus / (gpu.peak_tflops * 1e12)
    return Estimate(layout=layout, memory=mem, fits=mem.total <= hw.usable_bytes, compute_s=compute_s, tp_s=tp_s,
                    dp_s=dp_s, pp_s=pp_s, step_s=step_s, tokens_per_s=tok_s, mfu=mfu)


def plan(cfg: ModelConfig, hw: Hardware, *, seq_len: int, global_batch: int, dtype: str = "bf16",
         flash_attention: bool = True, max_pp: int | None = None, max_micro_batch: int = 16,
         recompute: tuple[str, ...] = RECOMPUTE, overlap_grad_reduce: bool = True, model: str = "") -> Plan:
    """Every layout of ``hw.gpus`` GPUs for ``cfg`` at ``seq_len`` and ``global_batch``, estimated and ranked.

    ``max_pp=1`` restricts the plan to layouts without pipeline parallelism. Candidates that cannot exist (TP sizes the model
    does not split into, TP beyond a node, pp not dividing the layers, a global batch not divisible by dp * micro
    batch) are counted in ``Plan.skipped`` by reason.
    """
    if seq_len < 1 or global_batch < 1:
        raise ValueError(f"seq_len and global_batch must be >= 1 (got {seq_len}, {global_batch})")
    bad = sorted(set(recompute) - set(RECOMPUTE))
    if bad:
        raise ValueError(f"recompute modes must be among {RECOMPUTE} (got {bad})")
    if cfg.family == "bigcode" and seq_len > cfg.max_positions:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {cfg.max_positions} learned positions "
                         f"(max_position_embeddings)")
    cfg = replace(cfg, seq_length=seq_len)
    skipped: dict[str, int] = {}

    def skip(reason: str, count: int = 1) -> None:
        skipped[reason] = skipped.get(reason, 0) + count

    out: list[Estimate] = []
    for t in _divisors(hw.gpus):
        if t > hw.gpus_per_node:
            skip("tp larger than a node")
            continue
        if not _tp_ok(cfg, t):
            skip("tp does not split the model's heads / K/V groups / MLP")
            continue
        for p in _divisors(hw.gpus // t):
            if max_pp is not None and p > max_pp:
                skip(f"pp > --max-pp {max_pp}")
                continue
            if cfg.num_layers % p:
                skip("pp does not divide the layers")
                continue
            d = hw.gpus // (t * p)
            if global_batch % d:
                skip("global batch not divisible by dp")
                continue
            per_rank = global_batch // d
            for mb in (b for b in _divisors(per_rank) if b <= max_micro_batch and b & (b - 1) == 0):
                sp = t > 1 and seq_len % t == 0
                for z in ((False, True) if d > 1 else (False,)):
                    for rc in recompute:
                        lay = Layout(tp=t, pp=p, dp=d, micro_batch=mb, num_microbatches=per_rank // mb, zero1=z,
                                     recompute=rc, sequence_parallel=sp)
                        out.append(estimate(cfg, hw, lay, seq_len=seq_len, global_batch=global_batch, dtype=dtype,
                                            flash_attention=flash_attention,
                                            overlap_grad_reduce=overlap_grad_reduce))
    out.sort(key=lambda e: (not e.fits, e.step_s if e.fits else e.memory.total, e.memory.total))
    return Plan(model=model or cfg.family, hardware=hw, seq_len=seq_len, global_batch=global_batch, estimates=out,
                skipped=skipped, overlap_grad_reduce=overlap_grad_reduce, lora=cfg.lora.enabled)


def assumptions(hw: Hardware, *, overlap_grad_reduce: bool = True, lora: bool = False) -> list[str]:
    g = hw.gpu
    extra = ["LoRA: frozen base (weights only in memory; no weight-gradient GEMMs, so 4N + attention FLOPs per token "
             "instead of 6N; MFU below counts those); DP reduces / all-gathers only the adapters"] if lora else []
    return extra + [
        f"GPU {g.name}: {g.peak_tflops:g} TFLOP/s bf16 dense peak, achievable {100 * g.efficiency:.0f}% of peak on "
        f"large GEMMs (the MFU assumption), x r/(r+{GEMM_ROWS_HALF}) for r = micro_batch*seq rows per GEMM and x "
        f"k/(k+{GEMM_WIDTH_HALF}) for the per-GPU width k = hidden/tp "
        f"[{g.source}]",
        f"memory {hw.memory_bytes / GIB:g} GiB per GPU, {100 * hw.headroom:g}% kept free (fragmentation, NCCL "
        f"buffers, CUDA context) -> a layout fits at <= {hw.usable_bytes / GIB:.1f} GiB of megaocto.model.memory's "
        f"estimate (bf16 weights, fp32 grads, fp32 masters + Adam, activations with flash attention)",
        f"links: NVLink {hw.nvlink:g} GB/s per GPU per direction inside a node of {hw.gpus_per_node} GPUs; network "
        f"{hw.network:g} Gbit/s per node shared by its GPUs; collectives reach {100 * hw.link_efficiency:.0f}% of "
        f"link rate",
        "step time = compute (6N + 12*L*H*Q*T per token, + recompute: full = one more layer forward, selective = "
        "attention forward) + TP collectives (2 all-reduce equivalents of [seq, mb, hidden] per layer forward, 2 "
        "backward, +2 with full recompute; not overlapped) + DP grad reduction (fp32; all-reduce, or ZeRO-1 "
        "reduce-scatter + bf16 param all-gather) " + ("beyond the last micro batch's backward it overlaps"
                                                        if overlap_grad_reduce else "after the backward (not overlapped)")
        + " + pipeline bubble (p-1)/m and p2p",
        "rank order TP, DP, PP (Megatron): TP within a node; DP over NVLink only when tp*dp <= GPUs per node",
        "sequence parallelism on whenever tp > 1 (same communication volume as TP without it, less activation "
        "memory); flash attention assumed",
        "pipeline: non-interleaved 1F1B (parallel.virtual_pp > 1 would shrink the bubble to (p-1)/(m*v); not "
        "modelled)",
    ]


def format_plan(p: Plan, *, top: int = 10) -> str:
    hw = p.hardware
    lines = [f"plan for {p.model} on {hw.gpus} x {hw.gpu.name} ({hw.memory_bytes / GIB:g} GiB), seq {p.seq_len}, "
             f"global batch {p.global_batch} ({p.global_batch * p.seq_len:,} tokens/step)", "assumptions:"]
    lines += [f"  - {a}" for a in assumptions(hw, overlap_grad_reduce=p.overlap_grad_reduce, lora=p.lora)]
    feas = p.feasible
    lines.append(f"{len(p.estimates)} layouts estimated, {len(feas)} fit in memory"
                 + "".join(f"; {n} skipped: {r}" for r, n in sorted(p.skipped.items())))
    head = (f"{'#':>3} {'tp':>2} {'pp':>2} {'dp':>4} {'mb':>3} {'m':>4} {'zero1':>5} {'recompute':>9} {'sp':>3} "
            f"{'GiB':>6} {'step s':>8} {'compute':>8} {'tp comm':>8} {'dp comm':>8} {'pp':>7} {'tok/s/GPU':>9} "
            f"{'MFU':>5}  note")

    def row(i, e: Estimate) -> str:
        lay = e.layout
        return (f"{i:>3} {lay.tp:>2} {lay.pp:>2} {lay.dp:>4} {lay.micro_batch:>3} {lay.num_microbatches:>4} "
                f"{'yes' if lay.zero1 else 'no':>5} {lay.recompute:>9} {'yes' if lay.sequence_parallel else 'no':>3} "
                f"{e.memory_gib:6.1f} {e.step_s:8.3f} {e.compute_s:8.3f} {e.tp_s:8.3f} {e.dp_s:8.3f} {e.pp_s:7.3f} "
                f"{e.tokens_per_s / hw.gpus:9.0f} {100 * e.mfu:4.0f}%")

    if feas:
        lines.append(f"best {min(top, len(feas))} of the layouts that fit (estimated step time, seconds):")
        lines.append(head)
        lines += [row(i, e) for i, e in enumerate(feas[:top], 1)]
        shapes = p.by_shape()
        lines.append(f"best layout of each tp x pp shape ({len(shapes)} shapes fit):")
        lines.append(head)
        lines += [row(i, e) for i, e in enumerate(shapes, 1)]
        best = p.best()
        lines.append(f"recommended for megaocto (rank {feas.index(best) + 1}): {best.layout.overrides()}"
                     f"  (~{best.memory_gib:.1f} GiB/GPU, ~{best.step_s:.2f} s/step, MFU ~{100 * best.mfu:.0f}%)")
    elif not p.estimates:
        lines.append("no layout can be formed from these GPUs and this global batch (see the skipped counts above): "
                     "the global batch must be divisible by dp = gpus / (tp * pp) for some tp and pp")
    else:
        least = p.estimates[0]
        lines.append("no layout fits in memory.")
        lines.append("smallest estimate:")
        lines.append(head)
        lines.append(row(1, least))
        need = math.ceil(least.memory.total / (1 - hw.headroom) / GIB)
        hints = ["more GPUs (ZeRO-1 divides only the optimizer states by dp; weights and grads are divided "
                 "only by tp * pp)", "a shorter sequence"]
        if least.layout.recompute != "full":
            hints.append("full recompute")
        lines.append(f"it needs ~{need} GiB per GPU; try {', '.join(hints)}")
    return "\n".join(lines)
