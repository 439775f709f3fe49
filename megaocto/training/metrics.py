"""Throughput, TFLOP/s and MFU — the one place these numbers are defined.

Convention (PaLM appendix B; same as nanoGPT, torchtitan and Megatron's 2024 table, so numbers compare):

    flops_per_token = 6*N + 12*L*H*Q*T        (megaocto.model.flops.flops_per_token, formula version 1)
        6*N       forward (2 flops per multiply-add) + backward (2x forward) over the N matmul parameters
        12*L*H*Q*T  attention scores QK^T and AV: 2 matmuls x 2 flops x 3 (fwd+bwd) over L layers,
                  H query heads of width Q, T keys per query (non-causal: the causal half is not discounted)
    TFLOP/s per device = flops_per_token * tokens/s per device / 1e12
    MFU = TFLOP/s per device / peak dense TFLOP/s of the device for the compute dtype

Activation recompute is not counted (it is MFU, not HFU). On CPU the peak is unknown, so MFU is n/a unless
`logging.peak_tflops` is set.
"""
from __future__ import annotations

import resource
import sys

FLOPS_FORMULA = "6*N + 12*L*H*Q*T per token (PaLM, non-causal attention), v1"

# Peak dense (no sparsity) tensor-core TFLOP/s per device, by compute dtype. Sources: NVIDIA datasheets
# as used by torchtitan `get_peak_flops` and llm.c `mfu.h`. Matched in order against the device name.
PEAK_TFLOPS: dict[str, list[tuple[tuple[str, ...], float]]] = {
    "bf16": [
        (("H200",), 989.4),
        (("GH200",), 989.4),
        (("H100", "NVL"), 835.0),
        (("H100", "PCIE"), 756.0),
        (("H100",), 989.4),  # "NVIDIA H100 80GB HBM3" is the SXM5 part
        (("H800",), 989.4),
        (("A100",), 312.0),
        (("A800",), 312.0),
        (("L40S",), 362.05),
        (("A6000",), 154.8),
    ],
    # fp32 without TF32: CUDA-core peak.
    "fp32": [
        (("H200",), 66.9),
        (("GH200",), 66.9),
        (("H100", "NVL"), 60.0),
        (("H100", "PCIE"), 51.2),
        (("H100",), 66.9),
        (("A100",), 19.5),
        (("L40S",), 91.6),
    ],
}


def peak_tflops(device_name: str | None, dtype: str) -> float | None:
    """Peak dense TFLOP/s for a device name (e.g. torch.cuda.get_device_name()) and 'bf16'/'fp32'; None if unknown."""
    if not device_name:
        return None
    name = device_name.upper()
    for needles, value in PEAK_TFLOPS.get(dtype, []):
        if all(n in name for n in needles):
            return value
    return None


def model_tflops_and_mfu(flops_per_token: float, tokens_per_s_per_device: float,
                         peak: float | None) -> tuple[float, float | None]:
    """(achieved TFLOP/s per device, MFU in [0, 1] or None when the peak is unknown). See module docstring."""
    tflops = flops_per_token * tokens_per_s_per_device / 1e12
    return tflops, (tflops / peak if peak else None)


def memory_stats(device) -> dict[str, float]:
    """Peak memory in GiB: allocated/reserved on CUDA; process max RSS on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return {"mem_alloc_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"max_rss_gib": rss / (2**30 if sys.platform == "darwin" else 2**20)}


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"
