"""RNG streams for tensor parallelism and RNG state for checkpoints.

Two kinds of randomness (Megatron's scheme):
- the default torch / python / numpy RNGs: seed + 100·pp_rank, identical across TP ranks, so replicated
  weights and the full-weight draws of parallel layers agree on every TP rank;
- the tracker stream ``"model-parallel"``: (seed + 100·pp_rank) + 2718 + tp_rank, used for dropout on TP-sharded
  activations (``with pc.rng.fork(): x = F.dropout(x, p)``), so each TP rank drops different units.

All states are plain python (lists of ints), so they are JSON-able and ``torch.load(weights_only=True)``-safe.
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Protocol

import numpy as np
import torch

MODEL_PARALLEL = "model-parallel"


def _to_list(state: torch.Tensor) -> list[int]:
    return state.tolist()


def _to_tensor(state: list[int]) -> torch.Tensor:
    return torch.tensor(state, dtype=torch.uint8)


class RNGTracker:
    """Named RNG streams swapped into the default CPU (and current CUDA) generator by ``fork``."""

    def __init__(self):
        self._states: dict[str, dict[str, torch.Tensor | None]] = {}

    def names(self) -> list[str]:
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        """(Re)create stream ``name`` from ``seed`` without touching the default generators."""
        cuda = None
        if torch.cuda.is_available():
            cuda = torch.Generator(device="cuda").manual_seed(seed).get_state()
        self._states[name] = {"cpu": torch.Generator().manual_seed(seed).get_state(), "cuda": cuda}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL):
        """Run the block on stream ``name``; the default generators are restored afterwards."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} does not exist (have {self.names()}); "
                           f"call megaocto.parallel.random.seed_everything(seed, pc) or tracker.add(name, seed)")
        st = self._states[name]
        cpu_saved = torch.get_rng_state()
        cuda_saved = torch.cuda.get_rng_state() if st["cuda"] is not None else None
        torch.set_rng_state(st["cpu"])
        if cuda_saved is not None:
            torch.cuda.set_rng_state(st["cuda"])
        try:
            yield
        finally:
            st["cpu"] = torch.get_rng_state()
            torch.set_rng_state(cpu_saved)
            if cuda_saved is not None:
                st["cuda"] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(cuda_saved)

    def get_states(self) -> dict[str, dict[str, list[int] | None]]:
        return {n: {k: None if v is None else _to_list(v) for k, v in s.items()} for n, s in self._states.items()}

    def set_states(self, states: dict[str, dict[str, list[int] | None]]) -> None:
        self._states = {n: {k: None if v is None else _to_tensor(v) for k, v in s.items()}
                        for n, s in states.items()}
        if not torch.cuda.is_available():
            for s in self._states.values():
                s["cuda"] = None


class ParallelRanks(Protocol):
    """What the seeding and RNG-state functions read of a ParallelContext (context.py imports this module, so
    naming the concrete class here would make an import cycle)."""

    tp_rank: int
    pp_rank: int
    device: torch.device
    rng: "RNGTracker"


def seed_everything(seed: int, pc: ParallelRanks) -> RNGTracker:
    """Seed python/numpy/torch with ``base = seed + 100·pp_rank`` and ``pc.rng`` with base + 2718 + tp_rank.

    As Megatron (_set_random_seed + model_parallel_cuda_manual_seed): DP ranks share every stream, TP ranks
    share the default stream (so full-weight draws agree) and differ in the tracker stream.
    """
    base = seed + 100 * pc.pp_rank
    random.seed(base)
    np.random.seed(base % 2**32)
    torch.manual_seed(base)  # also seeds every CUDA device
    pc.rng.add(MODEL_PARALLEL, base + 2718 + pc.tp_rank)
    return pc.rng


def get_rng_state(pc: ParallelRanks) -> dict[str, Any]:
    """This rank's full RNG state (python, numpy, torch cpu/cuda, tracker) as plain python data."""
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    cuda = None
    if pc.device.type == "cuda":
        cuda = _to_list(torch.cuda.get_rng_state(pc.device))
    return {
        "tp_rank": pc.tp_rank, "pp_rank": pc.pp_rank,
        "python": [version, list(py_state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch_cpu": _to_list(torch.get_rng_state()),
        "torch_cuda": cuda,
        "tracker": pc.rng.get_states(),
    }


def set_rng_state(state: dict[str, Any], pc: ParallelRanks, *, strict: bool = True) -> None:
    """Restore a state from :func:`get_rng_state`; ``strict`` checks it was saved by the same tp/pp rank."""
    if strict and (state["tp_rank"], state["pp_rank"]) != (pc.tp_rank, pc.pp_rank):
        raise ValueError(
            f"RNG state was saved by tp_rank={state['tp_rank']} pp_rank={state['pp_rank']} but this process is "
            f"tp_rank={pc.tp_rank} pp_rank={pc.pp_rank}; load the matching rank's file or pass strict=False")
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_to_tensor(state["torch_cpu"]))
    if state.get("torch_cuda") is not None and pc.device.type == "cuda":
        torch.cuda.set_rng_state(_to_tensor(state["torch_cuda"]), pc.device)
    pc.rng.set_states(state["tracker"])
