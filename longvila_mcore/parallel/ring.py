"""Zigzag ring attention: causal attention over the R ranks of a ring group (REFERENCE 4).

Layout. Every packed sample of global length L is cut into 2R chunks of c = L / 2R tokens; ring
rank r holds chunks r and 2R-1-r of every sample. Its local sequence is, sample after sample, the
"front" chunk r followed by the "back" chunk 2R-1-r (`local_lengths` = L / R per sample). Samples
never attend to each other. `ring_layout` turns the local lengths into the boundaries and the
front / back row sets once per set of sample boundaries, on the device, for every layer and step.

Forward. K/V blocks travel round the ring (rank r sends to r + 1); at step s rank r holds the block
of source rank (r - s) mod R, and every step costs the same:
- its own block: causal (within a sample the two local chunks are in global order);
- source < r: both local chunks come after the source's front chunk and before its back chunk,
  so all of Q attends to the front half of each sample's K/V, no mask;
- source > r: only the local back chunk comes after the source's chunks, so the back half of Q
  attends to all of each sample's K/V, no mask.
Partial results are merged by their log-sum-exp in float32 (float64 for float64 inputs).

Backward. Every block's gradient uses the final `out` and `lse`. dQ stays local. K/V travel round
the ring again, and each block's dK/dV accumulate along its path: rank r adds its contribution to
the sums that arrive from r - 1 (in place, in the buffers they arrived in) and passes them to r + 1,
so after R - 1 hops the sum reaches the block's owner, which adds its own (causal) part. K/V and
dK/dV each take R - 1 hops: backward traffic is twice the forward's. The own block comes last,
in its three zigzag pieces (front -> front causal, back -> front, back -> back causal), added in
place into the sums that arrived for it: a rank never holds full-size own gradients next to a
visiting block and its sums. The first K/V transfer is then not overlapped with compute.

K and V travel as one `[2, t, h, d]` message per step, received into a fresh buffer while the
current block is in use (two blocks alive at a time); dK and dV travel in one batch of two. The
tensors are "thd": batch rows are folded into further samples by the caller (`fold_batch`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from longvila_mcore.parallel.collectives import ring_shift_start
from longvila_mcore.parallel.local_attention import (
    Segments,
    attention_backward,
    attention_forward,
    segments,
)

# K and V of one block: one `[2, t, h, d]` tensor (what the ring sends) or a (k, v) pair.
KV = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

# Distinct tags keep the K/V and dK/dV streams apart on backends that match messages by tag.
_KV_TAG, _GRAD_TAG = 0, 1


def fold_batch(x: torch.Tensor) -> torch.Tensor:
    """[s, b, h, d] -> [b * s, h, d], batch rows back to back (a view when b == 1)."""
    s, b, h, d = x.shape
    return x.reshape(s, h, d) if b == 1 else x.transpose(0, 1).reshape(b * s, h, d)


def unfold_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of `fold_batch`, as a view: [b * s, h, d] -> [s, b, h, d]."""
    t, h, d = x.shape
    return x.view(batch, t // batch, h, d).transpose(0, 1)


def merge_partial_(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from the attention over each, written
    into `out` (one temporary of its size); returns the merged lse.

    `out` `[t, h, d]` and `lse` `[h, t]` are the running result (in the accumulation dtype); the
    block's are cast to it. Stable form of `lse' = log(exp(lse) + exp(lse_b))`,
    `out' = exp(lse - lse') out + exp(lse_b - lse') out_b`.
    """
    block_lse = block_lse.to(lse.dtype)
    weight = torch.sigmoid(block_lse - lse).t().unsqueeze(-1)
    out.sub_(torch.sub(out, block_out).mul_(weight))
    return lse - F.logsigmoid(lse - block_lse)


class Rows:
    """A set of rows of a dim: a slice when they are contiguous (a view, no copy), else an index
    on the device, built once."""

    def __init__(self, ranges: Sequence[tuple[int, int]], device: torch.device):
        merged: list[list[int]] = []
        for start, length in ranges:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += length
            else:
                merged.append([start, length])
        self.span = tuple(merged[0]) if len(merged) == 1 else None
        self.index = None
        if self.span is None:
            self.index = torch.cat([torch.arange(a, a + n, device=device) for a, n in merged])

    def take(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.span is not None:
            return x.narrow(dim, *self.span)
        return x.index_select(dim, self.index)

    def put_(self, x: torch.Tensor, dim: int, src: torch.Tensor) -> None:
        if self.span is not None:
            x.narrow(dim, *self.span).copy_(src)
        else:
            x.index_copy_(dim, self.index, src.to(x.dtype))

    def add_(self, x: torch.Tensor, dim: int, src: torch.Tensor) -> None:
        if self.span is not None:
            x.narrow(dim, *self.span).add_(src)
        else:
            x.index_add_(dim, self.index, src.to(x.dtype))


class RingLayout:
    """Boundaries of the whole local samples and of their halves, and the front / back rows."""

    def __init__(self, local_lengths: tuple[int, ...], batch: int, device: torch.device):
        lengths = local_lengths * batch
        starts = list(accumulate(lengths, initial=0))
        self.full: Segments = segments(tuple(starts), device)
        self.half: Segments = segments(
            tuple(accumulate((n // 2 for n in lengths), initial=0)), device
        )
        self.front = Rows([(a, n // 2) for a, n in zip(starts, lengths)], device)
        self.back = Rows([(a + n // 2, n // 2) for a, n in zip(starts, lengths)], device)


@functools.lru_cache(maxsize=8)
def ring_layout(local_lengths: tuple[int, ...], batch: int, device: torch.device) -> RingLayout:
    """The layout of one set of local sample lengths, built once for every layer and ring step
    (the cache holds a few: the micro-batches in flight share none)."""
    return RingLayout(local_lengths, batch, device)


def _visiting_blocks(kv: KV, group: ProcessGroup) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """(source rank, [kv `[2, t, h, d]`]) of every other rank's K/V block, in ring order. The
    first transfer starts here, before the caller computes with its own block; each next one
    starts before the current block is handed out. The block comes in a list the caller pops,
    so that the caller alone holds it and frees it as soon as it is done with it. A `[2, t, h,
    d]` block is sent as it is; a (k, v) pair is stacked into one first (a copy)."""
    rank, size = group.rank(), group.size()
    block = kv if isinstance(kv, torch.Tensor) else torch.stack(kv)
    transfer = ring_shift_start([block], [torch.empty_like(block)], group, tag=_KV_TAG)
    del block, kv  # the transfer keeps it alive until it is sent

    def blocks():
        nonlocal transfer
        for step in range(1, size):
            block = transfer.wait()[0]
            if step + 1 < size:
                transfer = ring_shift_start([block], [torch.empty_like(block)], group, tag=_KV_TAG)
            else:
                transfer = None
            holder = [block]
            del block
            yield (rank - step) % size, holder

    return blocks()


def ring_forward(
    q: torch.Tensor,
    kv: KV,
    layout: RingLayout,
    group: ProcessGroup,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of this ring rank's zigzag shard (thd): `(out, lse)` in the
    accumulation dtype (float32, or float64 for float64 inputs). `kv`: see `KV`; in a list of
    one, the caller hands its reference over and the block is freed once sent and used."""
    rank, size = group.rank(), group.size()
    if isinstance(kv, list):  # the caller handed its reference over
        kv = kv.pop()
    blocks = _visiting_blocks(kv, group) if size > 1 else iter(())
    full, half, front, back = layout.full, layout.half, layout.front, layout.back
    out, lse = attention_forward(q, kv[0], kv[1], full, full, True, scale)
    del kv  # sent (the transfer holds it until then) and used
    out = out.to(lse.dtype)
    q_back = back.take(q) if rank < size - 1 else None
    for source, holder in blocks:
        kv = holder.pop()
        if source < rank:
            kv = front.take(kv, 1)
            block = attention_forward(q, kv[0], kv[1], full, half, False, scale)
            del kv
            lse = merge_partial_(out, lse, *block)
        else:
            block = attention_forward(q_back, kv[0], kv[1], half, full, False, scale)
            del kv
            out_back = back.take(out)  # a view of `out` when the back rows are one slice
            lse_back = merge_partial_(out_back, back.take(lse, 1), *block)
            if back.index is not None:
                back.put_(out, 0, out_back)
            back.put_(lse, 1, lse_back)
        del block
    return out, lse


def ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    kv: KV,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: RingLayout,
    group: ProcessGroup,
    scale: float,
) -> list[torch.Tensor]:
    """`[dq, dk, dv]` of `ring_forward` in the accumulation dtype, from the final `out` / `lse`.

    The visiting blocks come first and the own block last: the dK/dV sums that arrive for the
    own block become its dK/dV accumulators, and the own block's gradients are computed in its
    three zigzag pieces and added in place, so no rank holds full-size own gradients next to the
    sums and a visiting block (a rank's peak). Every buffer is dropped as soon as it is used."""
    rank, size = group.rank(), group.size()
    full, half, front, back = layout.full, layout.half, layout.front, layout.back
    acc = lse.dtype
    k, v = kv[0], kv[1]
    if size == 1:
        grads = attention_backward(dout, q, k, v, out, lse, full, full, True, scale)
        return [g.to(acc) for g in grads]
    blocks = _visiting_blocks(kv, group)
    del kv
    dq = arriving = None  # arriving: the dK/dV sums of the current block, from the previous rank
    for source, holder in blocks:
        kv = holder.pop()
        if source < rank:
            kv = front.take(kv, 1)
            dq_blk, dk_front, dv_front = attention_backward(
                dout, q, kv[0], kv[1], out, lse, full, half, False, scale
            )
            del kv
            dq = dq_blk.to(acc) if dq is None else dq.add_(dq_blk)
            del dq_blk
            if arriving is None:
                sums = [k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc)]
            else:
                sums = arriving.wait()
            front.add_(sums[0], 0, dk_front)
            front.add_(sums[1], 0, dv_front)
            del dk_front, dv_front
        else:
            dq_back, dk_blk, dv_blk = attention_backward(
                back.take(dout),
                back.take(q),
                kv[0],
                kv[1],
                back.take(out),
                back.take(lse, 1),
                half,
                full,
                False,
                scale,
            )
            del kv
            if dq is None:
                dq = q.new_zeros(q.shape, dtype=acc)
            back.add_(dq, 0, dq_back)
            del dq_back
            if arriving is None:
                sums = [dk_blk.to(acc), dv_blk.to(acc)]
            else:
                sums = arriving.wait()
                sums[0].add_(dk_blk)
                sums[1].add_(dv_blk)
            del dk_blk, dv_blk
        arriving = ring_shift_start(sums, [torch.empty_like(x) for x in sums], group, tag=_GRAD_TAG)
        del sums
    # The sums for this rank's own block, from every other rank, accumulate its own part: the
    # causal attention of each sample's [front | back] chunks is front->front (causal),
    # back->front (no mask) and back->back (causal).
    dk, dv = arriving.wait()
    del arriving
    for q_rows, k_rows, causal in ((front, front, True), (back, front, False), (back, back, True)):
        dq_part, dk_part, dv_part = attention_backward(
            q_rows.take(dout),
            q_rows.take(q),
            k_rows.take(k),
            k_rows.take(v),
            q_rows.take(out),
            q_rows.take(lse, 1),
            half,
            half,
            causal,
            scale,
        )
        q_rows.add_(dq, 0, dq_part)
        k_rows.add_(dk, 0, dk_part)
        k_rows.add_(dv, 0, dv_part)
        del dq_part, dk_part, dv_part
    return [dq, dk, dv]


def check_local_lengths(local_lengths: Sequence[int], tokens: int, ring: int) -> tuple[int, ...]:
    """Validated local sample lengths: positive, even on more than one ring rank (front and back
    halves), summing to the local tokens."""
    lengths = tuple(int(n) for n in local_lengths)
    if sum(lengths) != tokens or any(n <= 0 or ring > 1 and n % 2 for n in lengths):
        raise ValueError(
            f"local sample lengths {list(lengths)} must be positive, even on more than one "
            f"ring rank, and sum to the {tokens} local tokens"
        )
    return lengths
