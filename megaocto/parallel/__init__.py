"""Tensor/pipeline/data parallel core: context (groups), mappings, TP layers, vocab-parallel CE, RNG, grads."""
from megaocto.parallel.context import ParallelContext, rank_layout
from megaocto.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      gather_full_tensor, pad_vocab_size)
from megaocto.parallel.mappings import (copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp,
                                        reduce_scatter_to_sp, scatter_to_sp, scatter_to_tp)

__all__ = [
    "ParallelContext", "rank_layout", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
    "gather_full_tensor", "pad_vocab_size", "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
    "scatter_to_sp", "gather_from_sp", "reduce_scatter_to_sp",
]
