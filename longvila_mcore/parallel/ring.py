"""Zigzag ring attention: causal attention over the R ranks of a ring group (REFERENCE 4).

Layout. Every packed sample of global length L is cut into 2R chunks of c = L / 2R tokens; ring
rank r holds chunks r and 2R-1-r of every sample. Its local sequence is, sample after sample, the
"front" chunk r followed by the "back" chunk 2R-1-r (`local_lengths` = L / R per sample). Samples
never attend to each other.

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
the sum that arrives from r - 1 and passes it on to r + 1, so after R - 1 hops the sum reaches the
block's owner, which adds its own (causal) part. K/V and dK/dV each take R - 1 hops: backward
traffic is twice the forward's.

Each transfer is started before the compute it overlaps and waited for after it (double buffers).
Batch rows (dim 1) are independent sequences with the same boundaries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from longvila_mcore.parallel.collectives import ring_shift_start
from longvila_mcore.parallel.local_attention import attention_backward, attention_forward

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


def merge_partial(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each.

    `out` `[t, h, d]` and `lse` `[h, t]` are the running result (in the accumulation dtype); the
    block's are cast to it. Stable form of `lse' = log(exp(lse) + exp(lse_b))`,
    `out' = exp(lse - lse') out + exp(lse_b - lse') out_b`.
    """
    block_lse = block_lse.to(lse.dtype)
    weight = torch.sigmoid(block_lse - lse).t().unsqueeze(-1)
    out = out - weight * (out - block_out.to(out.dtype))
    return out, lse - F.logsigmoid(lse - block_lse)


class _Layout:
    """Boundaries and token indices of the front and back halves of the folded local sequence."""

    def __init__(self, local_lengths: Sequence[int], batch: int, device: torch.device):
        lengths = list(local_lengths) * batch
        self.cu_full = list(accumulate(lengths, initial=0))
        self.cu_half = list(accumulate((n // 2 for n in lengths), initial=0))
        n = torch.tensor(lengths, device=device)
        starts = torch.tensor(self.cu_full[:-1], device=device)
        offset = torch.arange(self.cu_full[-1], device=device) - starts.repeat_interleave(n)
        in_front = offset < (n // 2).repeat_interleave(n)
        self.front = in_front.nonzero().squeeze(1)
        self.back = (~in_front).nonzero().squeeze(1)


def _ring_blocks(
    k: torch.Tensor, v: torch.Tensor, group: ProcessGroup
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(source rank, k, v) of each K/V block visiting this rank, its own first. The transfer of
    the next block runs while the caller computes with the current one."""
    rank, size = group.rank(), group.size()
    buffers = [[torch.empty_like(k), torch.empty_like(v)] for _ in range(min(size - 1, 2))]
    block = [k, v]
    for step in range(size):
        last = step + 1 == size
        if not last:
            transfer = ring_shift_start(block, buffers[step % 2], group, tag=_KV_TAG)
        yield (rank - step) % size, *block
        if not last:
            block = transfer.wait()


class _ZigzagRingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, local_lengths, group, scale):
        batch = q.shape[1]
        q, k, v = fold_batch(q), fold_batch(k), fold_batch(v)
        layout = _Layout(local_lengths, batch, q.device)
        rank = group.rank()
        if rank < group.size() - 1:
            q_back = q.index_select(0, layout.back)
        for source, k_blk, v_blk in _ring_blocks(k, v, group):
            if source == rank:
                out, lse = attention_forward(q, k, v, layout.cu_full, layout.cu_full, True, scale)
                out = out.to(lse.dtype)
            elif source < rank:
                front = layout.front
                block = attention_forward(
                    q, k_blk[front], v_blk[front], layout.cu_full, layout.cu_half, False, scale
                )
                out, lse = merge_partial(out, lse, *block)
            else:
                back = layout.back
                block = attention_forward(
                    q_back, k_blk, v_blk, layout.cu_half, layout.cu_full, False, scale
                )
                out_back, lse_back = merge_partial(out[back], lse[:, back], *block)
                out.index_copy_(0, back, out_back)
                lse.index_copy_(1, back, lse_back)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (layout, group, scale, batch)
        return unfold_batch(out, batch)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout, group, scale, batch = ctx.args
        dout = fold_batch(dout).contiguous()
        rank, acc = group.rank(), lse.dtype
        front, back = layout.front, layout.back
        if rank < group.size() - 1:
            q_b, dout_b, out_b = (x.index_select(0, back) for x in (q, dout, out))
            lse_b = lse.index_select(1, back)
        arriving = None  # the dK/dV sums of the current block, from the previous ring rank
        for source, k_blk, v_blk in _ring_blocks(k, v, group):
            if source == rank:
                grads = attention_backward(
                    dout, q, k, v, out, lse, layout.cu_full, layout.cu_full, True, scale
                )
                dq, dk, dv = (g.to(acc) for g in grads)
                continue
            if source < rank:
                dq_blk, dk_front, dv_front = attention_backward(
                    dout,
                    q,
                    k_blk[front],
                    v_blk[front],
                    out,
                    lse,
                    layout.cu_full,
                    layout.cu_half,
                    False,
                    scale,
                )
                dq += dq_blk
                dk_blk = k.new_zeros(k.shape, dtype=acc).index_copy_(0, front, dk_front.to(acc))
                dv_blk = v.new_zeros(v.shape, dtype=acc).index_copy_(0, front, dv_front.to(acc))
            else:
                dq_back, dk_blk, dv_blk = attention_backward(
                    dout_b,
                    q_b,
                    k_blk,
                    v_blk,
                    out_b,
                    lse_b,
                    layout.cu_half,
                    layout.cu_full,
                    False,
                    scale,
                )
                dq.index_add_(0, back, dq_back.to(acc))
                dk_blk, dv_blk = dk_blk.to(acc), dv_blk.to(acc)
            if arriving is not None:
                dk_sum, dv_sum = arriving.wait()
                dk_blk += dk_sum
                dv_blk += dv_sum
            buffers = [torch.empty_like(dk_blk), torch.empty_like(dv_blk)]
            arriving = ring_shift_start([dk_blk, dv_blk], buffers, group, tag=_GRAD_TAG)
        if arriving is not None:  # the sums for this rank's own block, from every other rank
            dk_sum, dv_sum = arriving.wait()
            dk += dk_sum
            dv += dv_sum
        grads = (unfold_batch(g.to(x.dtype), batch) for g, x in ((dq, q), (dk, k), (dv, v)))
        return (*grads, None, None, None)


def zigzag_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    local_lengths: Sequence[int],
    group: ProcessGroup,
    scale: float,
) -> torch.Tensor:
    """Causal attention of this ring rank's zigzag shard (layout above), autograd-aware.

    q `[t, b, hq, d]`, k/v `[t, b, hkv, d]` with `t = sum(local_lengths)`; returns `[t, b, hq, d]`.
    """
    local_lengths = tuple(int(n) for n in local_lengths)
    halves = group.size() > 1  # one rank never splits a sample into front and back
    if sum(local_lengths) != q.shape[0] or any(n <= 0 or halves and n % 2 for n in local_lengths):
        raise ValueError(
            f"local sample lengths {list(local_lengths)} must be positive, even on more than one "
            f"ring rank, and sum to the {q.shape[0]} local tokens"
        )
    return _ZigzagRingAttention.apply(q, k, v, local_lengths, group, scale)
