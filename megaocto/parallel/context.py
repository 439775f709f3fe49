"""Process groups for tensor / data / pipeline parallelism, held in one explicit object.

Rank order is Megatron's: TP fastest (contiguous ranks), then DP, then PP. For world 16, tp 2, pp 2::

    tp groups [0,1] [2,3] ... [14,15]        dp groups [0,2,4,6] [1,3,5,7] [8,10,12,14] [9,11,13,15]
    pp groups [0,8] [1,9] ... [7,15]

``ParallelContext.init(**dataclasses.asdict(parallel_config))`` builds it from a ``ParallelConfig``.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
from typing import Any

import torch
import torch.distributed as dist

from megaocto.config.base import ConfigError
from megaocto.parallel.random import RNGTracker

DEFAULT_PORT = 29500


def rank_layout(world_size: int, tp: int = 1, pp: int = 1) -> dict[str, list[list[int]]]:
    """Global ranks of every group: ``{"tp": [...], "dp": [...], "pp": [...], "embedding": [...]}``.

    ``embedding`` groups hold the first and last stage of each pipeline (for tied-embedding grads);
    with pp == 1 they are the pp groups themselves (one rank each).
    """
    if tp < 1 or pp < 1 or world_size < 1:
        raise ConfigError(f"world size, tp and pp must be >= 1 (got world={world_size}, tp={tp}, pp={pp})")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}; "
            f"choose parallel.tp and parallel.pp whose product divides the number of processes")
    dp = world_size // (tp * pp)
    stage = tp * dp  # ranks per pipeline stage
    tp_groups = [list(range(i * tp, (i + 1) * tp)) for i in range(world_size // tp)]
    dp_groups = [list(range(p * stage + j, (p + 1) * stage, tp)) for p in range(pp) for j in range(tp)]
    pp_groups = [list(range(i, world_size, stage)) for i in range(stage)]
    emb_groups = [sorted({g[0], g[-1]}) for g in pp_groups]
    return {"tp": tp_groups, "dp": dp_groups, "pp": pp_groups, "embedding": emb_groups}


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list: ``"gpu-a[01-03],gpu-b7"`` -> ``["gpu-a01", "gpu-a02", "gpu-a03", "gpu-b7"]``.

    Handles comma lists inside brackets, zero-padded ranges and several bracket groups per name
    (``rack[1-2]-n[1-2]``).
    """
    hosts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(nodelist + ","):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced ']' at position {i} in SLURM node list {nodelist!r}")
        elif ch == "," and depth == 0:
            item = nodelist[start:i].strip()
            if item:
                hosts.extend(_expand_host(item, nodelist))
            start = i + 1
    if depth != 0:
        raise ConfigError(f"unbalanced '[' in SLURM node list {nodelist!r}")
    return hosts


def _expand_host(pattern: str, full: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[:m.start()], pattern[m.end():]
    values: list[str] = []
    for part in m.group(1).split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ConfigError(f"bad range {part!r} in SLURM node list {full!r}")
            values.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
        elif part:
            values.append(part)
    return [head + v + rest for v in values for rest in _expand_host(tail, full)]


def _dist_env() -> dict[str, Any] | None:
    """rank / world / local rank / master address from torchrun or SLURM variables, or None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0)),
                "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
                "master_port": int(env.get("MASTER_PORT", DEFAULT_PORT)), "source": "torchrun"}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        if "MASTER_PORT" in env:
            port = int(env["MASTER_PORT"])
        elif env.get("SLURM_JOB_ID", "").isdigit():
            port = 15000 + int(env["SLURM_JOB_ID"]) % 20000  # distinct jobs sharing a node get distinct ports
        else:
            port = DEFAULT_PORT
        return {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0)),
                "master_addr": env.get("MASTER_ADDR") or parse_slurm_nodelist(nodelist)[0],
                "master_port": port, "source": "slurm"}
    return None


def cuda_device_index(local_rank: int, device_count: int | None = None) -> int:
    """The visible CUDA device for a process with this node-local rank.

    One process per GPU with all of the node's GPUs visible (torchrun, plain srun) -> device `local_rank`. With
    per-task binding (`srun --gpus-per-task=1`, `--gpu-bind=single:1`, CUDA_VISIBLE_DEVICES set per task) each
    task sees only its own GPU(s), so `local_rank` can exceed the visible count: take `local_rank % count`
    (device 0 when each task sees one GPU), as torchtitan does.
    """
    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1:
        raise RuntimeError("CUDA is available but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    return local_rank if local_rank < count else local_rank % count


@dataclasses.dataclass
class ParallelContext:
    """Sizes, ranks and process groups of one process; handed down to every layer (nothing is global).

    ``*_ranks`` are the global ranks of this process's groups (``tp_ranks[0]`` is the TP source rank for
    broadcasts). ``rng`` is this process's dropout RNG tracker (see megaocto.parallel.random).
    """
    tp: int = 1
    pp: int = 1
    dp: int = 1
    world_size: int = 1
    rank: int = 0
    tp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    sequence_parallel: bool = False
    tp_group: Any = None
    dp_group: Any = None
    pp_group: Any = None
    embedding_group: Any = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    local_rank: int = 0
    tp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    rng: RNGTracker = dataclasses.field(default_factory=RNGTracker, repr=False)

    def __post_init__(self):
        if not self.rng.names():
            # as seed_everything(1234) (Megatron's default seed) would, without touching the global RNGs
            self.rng.add("model-parallel", 1234 + 100 * self.pp_rank + 2718 + self.tp_rank)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelContext":
        """tp = pp = dp = 1 without torch.distributed."""
        return cls(device=torch.device(device))

    @classmethod
    def init(cls, tp: int = 1, pp: int = 1, sequence_parallel: bool = False, backend: str = "auto",
             timeout_minutes: int = 10, pp_layers=None, virtual_pp: int = 1) -> "ParallelContext":
        """Initialise torch.distributed if needed (torchrun or SLURM env) and build all groups.

        ``pp_layers`` and ``virtual_pp`` are accepted so that ``init(**asdict(ParallelConfig))`` works; the split of the layers over
        the stages belongs to the model builder (``build_model(..., pp_layers=)``).

        Without any distributed environment and tp = pp = 1 this returns a single-process context
        (on cuda:0 when CUDA is available). ``sequence_parallel`` is switched off when tp == 1.
        """
        if tp < 1 or pp < 1:
            raise ConfigError(f"parallel.tp and parallel.pp must be >= 1 (got tp={tp}, pp={pp})")
        if backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend must be auto, nccl or gloo (got {backend!r})")
        cuda = torch.cuda.is_available()
        timeout = datetime.timedelta(minutes=timeout_minutes)
        env = _dist_env()
        if not dist.is_initialized():
            if env is None or env["world_size"] == 1 and tp * pp == 1:
                if tp * pp > 1:
                    raise ConfigError(
                        f"tp={tp}, pp={pp} needs {tp * pp} processes but no distributed environment was found; "
                        f"launch with torchrun --nproc_per_node N or srun (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
                local = env["local_rank"] if env else 0
                return cls.single(f"cuda:{cuda_device_index(local)}" if cuda else "cpu")
            rank_layout(env["world_size"], tp, pp)  # fail on a bad layout before any rendezvous
            if backend == "auto":
                backend = "nccl" if cuda else "gloo"
            if cuda:
                torch.cuda.set_device(cuda_device_index(env["local_rank"]))
            addr = f"tcp://{env['master_addr']}:{env['master_port']}"
            try:
                dist.init_process_group(backend, init_method=addr, rank=env["rank"],
                                        world_size=env["world_size"], timeout=timeout)
            except Exception as e:
                raise RuntimeError(
                    f"torch.distributed init failed: rank {env['rank']} of {env['world_size']} ({env['source']} "
                    f"environment) at {addr}: {e}. Check that all {env['world_size']} processes were started "
                    f"(under sbatch run the script through srun, one task per GPU) and that the port is free"
                ) from e
        world, rank = dist.get_world_size(), dist.get_rank()
        backend_used = str(dist.get_backend())
        if env is not None and env["world_size"] == world:
            local_rank = env["local_rank"]
        else:
            local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        if cuda and backend_used != "gloo":
            device = torch.device(f"cuda:{cuda_device_index(local_rank)}")
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        layout = rank_layout(world, tp, pp)  # raises ConfigError when world % (tp*pp) != 0
        mine: dict[str, Any] = {}
        for kind, groups in layout.items():  # new_group is collective: every rank builds every group
            for ranks in groups:
                group = dist.new_group(ranks, timeout=timeout)
                if rank in ranks:
                    mine[kind] = (group, tuple(ranks))
        dp = world // (tp * pp)
        return cls(tp=tp, pp=pp, dp=dp, world_size=world, rank=rank, tp_rank=rank % tp,
                   dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp),
                   sequence_parallel=bool(sequence_parallel and tp > 1),
                   tp_group=mine["tp"][0], dp_group=mine["dp"][0], pp_group=mine["pp"][0],
                   embedding_group=mine.get("embedding", (None,))[0], device=device, backend=backend_used,
                   local_rank=local_rank, tp_ranks=mine["tp"][1], dp_ranks=mine["dp"][1], pp_ranks=mine["pp"][1])

    def __deepcopy__(self, memo):
        return self  # process groups are shared, never copied (deepcopy of a model keeps its context)

    # ------------------------------------------------------------------ helpers
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_tp_src(self) -> bool:
        """True on TP rank 0 (the rank that reads data / writes replicated tensors)."""
        return self.tp_rank == 0

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this process's TP group (``src`` for dist.broadcast)."""
        return self.tp_ranks[0]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0 (logging, metrics)."""
        return self.rank == 0

    def describe(self) -> str:
        """One line for logs: ``rank 3/8 tp 1/2 dp 1/2 pp 0/2 sp=off gloo cpu``."""
        return (f"rank {self.rank}/{self.world_size} tp {self.tp_rank}/{self.tp} dp {self.dp_rank}/{self.dp} "
                f"pp {self.pp_rank}/{self.pp} sp={'on' if self.sequence_parallel else 'off'} "
                f"{self.backend or 'no-dist'} {self.device}")
