"""Collectives for sequence parallelism, autograd-aware: each backward is the forward's adjoint.

- `heads_to_sequence` / `sequence_to_heads`: the Ulysses all-to-alls, several tensors in one
  collective (q, k and v travel together); each is the other's adjoint. Plain functions: the 2D
  attention's autograd function calls them in its forward and backward.
- `all_to_all_variable`: rows of different counts to each rank (the image-first sharder); the
  adjoint sends the gradients back with the counts swapped.
- `all_gather`: along dim 0; the adjoint is a reduce-scatter (sum over ranks of their gradients).
- `ring_shift_start`: send to the next ring rank, receive from the previous, without waiting
  (ring attention overlaps the transfers with compute); `backward=True` shifts the other way,
  the adjoint.

`count_communication()` records the calls and the bytes each call sends and receives, for the
benchmarks; outside it the cost is one `None` check per call.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# torch >= 2.10 renamed these; the NGC images may ship an older torch.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommCounter:
    """Calls, and bytes this rank sent to and received from other ranks, per kind of collective."""

    def __init__(self):
        self.calls: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)
        self.received: dict[str, int] = defaultdict(int)

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


_counter: CommCounter | None = None


@contextmanager
def count_communication() -> Iterator[CommCounter]:
    """Count the bytes of every collective in this module while the block runs."""
    global _counter
    outer, _counter = _counter, CommCounter()
    try:
        yield _counter
    finally:
        _counter = outer


def _count(kind: str, sent: int, received: int) -> None:
    if _counter is not None:
        _counter.calls[kind] += 1
        _counter.sent[kind] += sent
        _counter.received[kind] += received


def heads_to_sequence(
    parts: Sequence[torch.Tensor],
    group: ProcessGroup,
    select: Sequence[slice] | None = None,
) -> torch.Tensor:
    """Ulysses forward for several tensors in one all-to-all: parts `[s, b, h_i, d]` (every h_i a
    multiple of U) -> `[U * s, b, sum(h_i) / U, d]` in the first part's dtype. Rows
    `j * s : (j + 1) * s` come from Ulysses rank j; along dim 2 come, part after part, this rank's
    `h_i / U` heads of each part, or only the heads `select[i]` of them (a slice of
    `range(h_i / U)`: every rank sends each other rank that subset of its heads). One packing copy
    into the send buffer; the parts of the result are views of one buffer."""
    u = group.size()
    s, b, _, d = parts[0].shape
    full = [p.shape[2] // u for p in parts]
    if select is None:
        select = [slice(0, w) for w in full]
    widths = [len(range(w)[sl]) for w, sl in zip(full, select)]
    send = parts[0].new_empty((u, s, b, sum(widths), d))
    offset = 0
    for part, w, sl, width in zip(parts, full, select, widths):
        send[..., offset : offset + width, :] = part.unflatten(2, (u, w))[:, :, :, sl].movedim(2, 0)
        offset += width
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    piece = send[0].nbytes
    _count("ulysses", piece * (u - 1), piece * (u - 1))
    return recv.flatten(0, 1)


def sequence_to_heads(
    x: torch.Tensor,
    widths: Sequence[int],
    group: ProcessGroup,
    into: Sequence[torch.Tensor] | None = None,
    select: Sequence[slice] | None = None,
) -> list[torch.Tensor]:
    """The adjoint of `heads_to_sequence` (and the Ulysses output step): `x` `[U * s, b, H, d]`,
    rows `j * s : (j + 1) * s` to Ulysses rank j; dim 2 holds blocks of `widths` heads. Returns one
    `[s, b, U * width, d]` tensor per block, the heads from rank j at position j. With `into`
    (tensors `[s, b, U * w_i, d]`) block i is written into the heads `select[i]` (a slice of
    `range(w_i)`) of every rank's w_i heads of `into[i]` instead, and `into` is returned: the
    adjoint of `heads_to_sequence` with `select`. `x` is sent as it is when contiguous (no packing
    copy)."""
    u = group.size()
    send = x.unflatten(0, (u, -1)).contiguous()
    del x  # a caller that passes a temporary gets its memory back once it is sent
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    piece = send[0].nbytes
    _count("ulysses", piece * (u - 1), piece * (u - 1))
    del send
    s, b, _, d = recv.shape[1:]
    parts, offset = [], 0
    for i, width in enumerate(widths):
        block = recv[..., offset : offset + width, :]
        if into is None:
            parts.append(block.movedim(0, 2).reshape(s, b, u * width, d))
        else:
            into[i].unflatten(2, (u, -1))[:, :, :, select[i]].copy_(block.movedim(0, 2))
            parts.append(into[i])
        offset += width
    return parts


def _all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group: ProcessGroup):
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    row = math.prod(x.shape[1:]) * x.element_size()
    me = group.rank()
    _count("all_to_all_variable", row * (sum(send) - send[me]), row * (sum(recv) - recv[me]))
    return out


class _AllToAllVariable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.args = (send, recv, group)
        return _all_to_all_rows(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        send, recv, group = ctx.args
        return _all_to_all_rows(grad, recv, send, group), None, None, None


def all_to_all_variable(
    x: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], group: ProcessGroup
) -> torch.Tensor:
    """Send `x`'s rows in consecutive blocks, `send_counts[j]` rows to rank j; returns the rows
    received, `recv_counts[j]` of them from rank j, in rank order."""
    send, recv = [int(c) for c in send_counts], [int(c) for c in recv_counts]
    if len(send) != group.size() or len(recv) != group.size() or sum(send) != x.shape[0]:
        raise ValueError(
            f"send counts {send} / receive counts {recv} must have one entry per rank "
            f"({group.size()}) and the send counts must sum to the {x.shape[0]} rows"
        )
    if group.size() == 1:
        return x
    return _AllToAllVariable.apply(x, send, recv, group)


def _all_gather(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((group.size() * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    _count("all_gather", x.nbytes * (group.size() - 1), x.nbytes * (group.size() - 1))
    return out


def _reduce_scatter(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    n = group.size()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    _reduce_scatter_single(out, x, group=group)
    _count("reduce_scatter", out.nbytes * (n - 1), out.nbytes * (n - 1))
    return out


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group), None


def all_gather(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0, in rank order. The gradient of a rank's `x` is the
    sum over ranks of the gradients of its rows (each rank's copy feeds its own loss)."""
    if group.size() == 1:
        return x
    return _AllGather.apply(x, group)


class PendingTransfer:
    """Point-to-point transfers in flight; `wait()` returns the tensors received."""

    def __init__(self, works: list, sent: list[torch.Tensor], received: list[torch.Tensor]):
        self._works = works
        self._sent = sent  # alive until the transfer is done
        self._received = received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []
        return self._received


def ring_shift_start(
    send: Sequence[torch.Tensor],
    recv: Sequence[torch.Tensor],
    group: ProcessGroup,
    backward: bool = False,
    tag: int = 0,
) -> PendingTransfer:
    """Start sending `send` to the next ring rank and receiving `recv` (same shapes) from the
    previous one; `backward=True` reverses the direction. Returns without waiting."""
    rank, size = group.rank(), group.size()
    step = -1 if backward else 1
    dst = dist.get_global_rank(group, (rank + step) % size)
    src = dist.get_global_rank(group, (rank - step) % size)
    send = [t.contiguous() for t in send]
    ops = [dist.P2POp(dist.isend, t, dst, group, tag) for t in send]
    ops += [dist.P2POp(dist.irecv, t, src, group, tag) for t in recv]
    _count("ring", sum(t.nbytes for t in send), sum(t.nbytes for t in recv))
    return PendingTransfer(dist.batch_isend_irecv(ops), send, list(recv))
