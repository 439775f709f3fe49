"""Parallel layout configuration."""
from __future__ import annotations

from dataclasses import dataclass

from megaocto.config.base import ConfigError, field


@dataclass
class ParallelConfig:
    tp: int = field(1, "Tensor-parallel size: ranks that split every layer (Megatron --tensor-model-parallel-size).")
    pp: int = field(1, "Pipeline-parallel size: ranks that split the layer stack (Megatron --pipeline-model-parallel-size).")
    pp_layers: list[int] = field(None, "Transformer blocks per pipeline stage, e.g. [3, 5, 5, 3] (one count per stage, summing to model.num_layers); empty: an even split (num_layers divisible by pp).", default_factory=list)
    virtual_pp: int = field(1, "Interleaved pipeline: model chunks per stage (Megatron --num-layers-per-virtual-pipeline-stage = num_layers / (pp * virtual_pp)); needs pp > 1, micro batches per DP rank divisible by pp. 1: plain 1F1B.")
    sequence_parallel: bool = field(False, "Shard norm/dropout activations along the sequence over the TP group (needs tp > 1 to have effect).")
    backend: str = field("auto", "torch.distributed backend: auto (nccl on GPU, gloo on CPU), nccl or gloo.")
    timeout_minutes: int = field(10, "Collective timeout in minutes (raise for slow index builds on huge corpora).")

    def validate(self, world_size: int | None = None) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ConfigError(f"parallel.tp and parallel.pp must be >= 1 (got tp={self.tp}, pp={self.pp})")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"parallel.backend must be auto, nccl or gloo (got {self.backend!r})")
        if world_size is not None and world_size % (self.tp * self.pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp}; "
                f"choose tp and pp whose product divides the number of processes")
