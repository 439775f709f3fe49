"""Pipeline parallelism: activations between stages over the PP group, and the 1F1B schedule.

    forward_backward_1f1b(model, micro_batches, pc, shape=(b, s, h), dtype=dtype, loss_fn=..., before_backward=...)

Each rank holds one stage (``build_model`` with ``pc.pp > 1``). Every stage of a pipeline reads the same micro
batches (same DP rank): the first stage embeds ``input_ids``, later stages take the previous stage's output as
``hidden_states`` (all stages use ``position_ids``/``segment_ids``), the last stage computes the loss. Between stages
only the residual stream moves, ``[micro batch, seq (/tp with sequence parallelism), hidden]`` in the model dtype,
each TP rank to its peer of the next stage. Sends and receives of one step go out together
(``dist.batch_isend_irecv``), so two neighbours that both send and receive never wait on each other.

1F1B (PipeDream-flush, Megatron's non-interleaved schedule), stage r of p with m micro batches:
warmup: min(p - r - 1, m) forwards; steady state: one forward then one backward, m - warmup times; cooldown: the
remaining backwards. A stage holds at most p - r micro batches' activations (not m as in GPipe), and the bubble is
(p - 1) / m of the ideal step time. Backwards run in micro-batch order, so the last backward is the last micro
batch's (where the DP grad reduction may start: ``before_backward(last=True)``).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch
import torch.distributed as dist


class StageP2P:
    """Point-to-point transfers of one stage with its neighbours in the PP group (no-ops at the ends)."""

    def __init__(self, pc, shape: tuple[int, ...], dtype: torch.dtype):
        self.pc, self.shape, self.dtype = pc, tuple(shape), dtype
        self.prev = pc.pp_ranks[pc.pp_rank - 1] if pc.pp_rank > 0 else None
        self.next = pc.pp_ranks[pc.pp_rank + 1] if pc.pp_rank < pc.pp - 1 else None

    def _exchange(self, sends: list[tuple[torch.Tensor, int]], recv_from: int | None,
                  requires_grad: bool = False) -> torch.Tensor | None:
        ops = [dist.P2POp(dist.isend, t.detach().contiguous(), peer, group=self.pc.pp_group) for t, peer in sends]
        buf = None
        if recv_from is not None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.pc.device)
            ops.append(dist.P2POp(dist.irecv, buf, recv_from, group=self.pc.pp_group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        if buf is not None and requires_grad:
            buf.requires_grad_(True)
        return buf

    def _check(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) != self.shape:
            raise RuntimeError(f"pipeline stage {self.pc.pp_rank} {what} of shape {tuple(t.shape)}, but the stages "
                               f"exchange {self.shape} (micro batch, seq (/tp with sequence parallel), hidden)")
        return t

    def recv_forward(self, requires_grad: bool = True):
        return self._exchange([], self.prev, requires_grad)

    def send_forward(self, y) -> None:
        if self.next is not None:
            self._exchange([(self._check(y, "sends an activation"), self.next)], None)

    def recv_backward(self):
        return self._exchange([], self.next)

    def send_backward(self, g) -> None:
        if self.prev is not None:
            self._exchange([(self._check(g, "sends a grad"), self.prev)], None)

    def send_forward_recv_backward(self, y):
        if self.next is None:
            return None
        return self._exchange([(self._check(y, "sends an activation"), self.next)], self.next)

    def send_backward_recv_forward(self, g):
        if self.prev is None:
            return None
        return self._exchange([(self._check(g, "sends a grad"), self.prev)], self.prev, requires_grad=True)


def stage_forward(model, batch: dict[str, torch.Tensor], x: torch.Tensor | None, last_stage: bool):
    """One micro batch through this stage: the per-token loss on the last stage, else the output activation."""
    kwargs = {k: batch[k] for k in ("position_ids", "segment_ids") if k in batch}
    return model(batch["input_ids"], labels=batch["labels"] if last_stage else None, hidden_states=x, **kwargs)


def forward_backward_1f1b(model, micro_batches: list[dict], pc, *, shape: tuple[int, ...], dtype: torch.dtype,
                          loss_fn: Callable[[torch.Tensor, dict], torch.Tensor],
                          before_backward: Callable[[bool], None] = lambda last: None) -> None:
    """Forward and backward of all micro batches on this stage with the 1F1B schedule.

    ``loss_fn(per_token_loss, batch)`` (last stage only) returns the scalar to differentiate (already scaled by the
    caller, which also accumulates what it reports). ``before_backward(is_last_micro_batch)`` runs before each
    backward. Grads accumulate into the parameters as with plain gradient accumulation.
    """
    m, first, last = len(micro_batches), pc.pp_rank == 0, pc.pp_rank == pc.pp - 1
    p2p = StageP2P(pc, shape, dtype)
    warmup = min(pc.pp - pc.pp_rank - 1, m)
    inputs: deque = deque()
    outputs: deque = deque()
    counter = {"fwd": 0, "bwd": 0}

    def forward(x):
        batch = micro_batches[counter["fwd"]]
        counter["fwd"] += 1
        out = stage_forward(model, batch, x, last)
        return loss_fn(out, batch) if last else out

    def backward(x, y, grad):
        before_backward(counter["bwd"] == m - 1)
        counter["bwd"] += 1
        if last:
            y.backward()
        else:
            torch.autograd.backward(y, grad_tensors=grad)
        return None if first else x.grad

    for _ in range(warmup):
        x = p2p.recv_forward()
        y = forward(x)
        p2p.send_forward(y)
        inputs.append(x)
        outputs.append(y)
    steady = m - warmup
    x = p2p.recv_forward() if steady > 0 else None
    for i in range(steady):
        y = forward(x)
        grad = p2p.send_forward_recv_backward(y)
        inputs.append(x)
        outputs.append(y)
        gx = backward(inputs.popleft(), outputs.popleft(), grad)
        if i == steady - 1:
            p2p.send_backward(gx)
        else:
            x = p2p.send_backward_recv_forward(gx)
    for _ in range(warmup):
        grad = p2p.recv_backward()
        gx = backward(inputs.popleft(), outputs.popleft(), grad)
        p2p.send_backward(gx)


@torch.no_grad()
def forward_only(model, micro_batches: list[dict], pc, *, shape: tuple[int, ...], dtype: torch.dtype,
                 loss_fn: Callable[[torch.Tensor, dict], None]) -> None:
    """Forward of all micro batches through the pipeline (validation); the last stage calls
    ``loss_fn(per_token_loss, batch)`` for each."""
    last = pc.pp_rank == pc.pp - 1
    p2p = StageP2P(pc, shape, dtype)
    for batch in micro_batches:
        x = p2p.recv_forward(requires_grad=False)
        out = stage_forward(model, batch, x, last)
        if last:
            loss_fn(out, batch)
        else:
            p2p.send_forward(out)


def allreduce_embedding_grads(model, pc) -> None:
    """Sum the grads of the tied word embedding's two copies (first and last stage) over ``pc.embedding_group``.

    Called on those stages after the backward and before the DP grad reduction (which commutes with it), so it is
    right for the plain and the distributed optimizer alike; ``main_grad`` (the optimizer's fp32 buffer) when present.
    """
    weight = model.embedding.word_embeddings.weight
    grad = weight.main_grad if hasattr(weight, "main_grad") else weight.grad
    dist.all_reduce(grad, group=pc.embedding_group)


# ---------------------------------------------------------------------------------------------- interleaved
_FWD_TAG, _BWD_TAG = 1, 2  # with pp = 2 the ring carries activations and grads between the same two ranks


def forward_backward_interleaved(model, micro_batches: list[dict], pc, *, virtual: int, shape: tuple[int, ...],
                                 dtype: torch.dtype, loss_fn: Callable[[torch.Tensor, dict], torch.Tensor],
                                 before_backward: Callable[[bool], None] = lambda last: None) -> None:
    """Interleaved 1F1B (Megatron's virtual pipeline): each stage runs ``virtual`` model chunks
    (``model(..., chunk=c)``); chunk c of stage r is virtual stage c·pp + r, so activations go round the PP ring
    (stage pp - 1 feeds chunk c + 1 of stage 0). The bubble shrinks to (p - 1) / (m · virtual).

    Order of work items k = 0 .. m·virtual - 1 (Megatron's): groups of pp micro batches, chunk by chunk; forward k
    runs chunk (k mod p·v) // p of micro batch (k // p·v)·p + k mod p, backward k the same micro batch in the
    reversed chunk. Warmup (p - r - 1)·2 + (v - 1)·p forwards (all of them when m == p), then one forward and one
    backward, then the remaining backwards. Sends are asynchronous (waited at the end), receives blocking; tags
    keep activations and grads apart on the ring. Needs m divisible by pp.
    """
    from megaocto.config.base import ConfigError

    p, r, v, m = pc.pp, pc.pp_rank, virtual, len(micro_batches)
    if m % p:
        raise ConfigError(f"the interleaved pipeline (parallel.virtual_pp={v}) needs the micro batches per DP rank "
                          f"({m}) divisible by parallel.pp={p}; change train.global_batch_size")
    total = m * v
    warmup = total if m == p else min((p - r - 1) * 2 + (v - 1) * p, total)
    nxt, prv = pc.pp_ranks[(r + 1) % p], pc.pp_ranks[(r - 1) % p]
    pending: list = []  # (work, tensor): the tensor must live until its send completes
    inputs = [deque() for _ in range(v)]
    outputs = [deque() for _ in range(v)]

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def micro_of(k: int) -> int:
        return (k // (p * v)) * p + k % p

    def send(t: torch.Tensor, peer: int, tag: int) -> None:
        t = t.detach().contiguous()
        pending.append((dist.isend(t, peer, group=pc.pp_group, tag=tag), t))

    def recv(peer: int, tag: int, requires_grad: bool) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=pc.device)
        dist.recv(buf, peer, group=pc.pp_group, tag=tag)
        return buf.requires_grad_(requires_grad)

    def forward(k: int) -> None:
        c, batch = chunk_of(k, True), micro_batches[micro_of(k)]
        first, last = r == 0 and c == 0, r == p - 1 and c == v - 1
        x = None if first else recv(prv, _FWD_TAG, True)
        kwargs = {key: batch[key] for key in ("position_ids", "segment_ids") if key in batch}
        out = model(batch["input_ids"], labels=batch["labels"] if last else None, hidden_states=x, chunk=c,
                    **kwargs)
        if last:
            out = loss_fn(out, batch)
        else:
            send(out, nxt, _FWD_TAG)
        inputs[c].append(x)
        outputs[c].append(out)

    def backward(k: int) -> None:
        c = chunk_of(k, False)
        first, last = r == 0 and c == 0, r == p - 1 and c == v - 1
        x, y = inputs[c].popleft(), outputs[c].popleft()
        before_backward(k == total - 1)
        if last:
            y.backward()
        else:
            torch.autograd.backward(y, grad_tensors=recv(nxt, _BWD_TAG, False))
        if not first:
            send(x.grad, prv, _BWD_TAG)

    for k in range(warmup):
        forward(k)
    for k in range(total - warmup):
        forward(warmup + k)
        backward(k)
    for k in range(total - warmup, total):
        backward(k)
    for work, _ in pending:
        work.wait()


@torch.no_grad()
def forward_only_interleaved(model, micro_batches: list[dict], pc, *, virtual: int, shape: tuple[int, ...],
                             dtype: torch.dtype, loss_fn: Callable[[torch.Tensor, dict], None]) -> None:
    """Forward of all micro batches through the interleaved pipeline (validation), micro batch by micro batch."""
    p, r = pc.pp, pc.pp_rank
    nxt, prv = pc.pp_ranks[(r + 1) % p], pc.pp_ranks[(r - 1) % p]
    pending = []
    for batch in micro_batches:
        kwargs = {key: batch[key] for key in ("position_ids", "segment_ids") if key in batch}
        for c in range(virtual):
            first, last = r == 0 and c == 0, r == p - 1 and c == virtual - 1
            x = None
            if not first:
                x = torch.empty(shape, dtype=dtype, device=pc.device)
                dist.recv(x, prv, group=pc.pp_group, tag=_FWD_TAG)
            out = model(batch["input_ids"], labels=batch["labels"] if last else None, hidden_states=x, chunk=c,
                        **kwargs)
            if last:
                loss_fn(out, batch)
            else:
                out = out.contiguous()
                pending.append((dist.isend(out, nxt, group=pc.pp_group, tag=_FWD_TAG), out))
    for work, _ in pending:
        work.wait()
