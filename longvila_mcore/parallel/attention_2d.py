"""2D sequence-parallel attention (Ulysses all-to-all x zigzag ring) and the `sp` object.

Shard order. With N = U x R ranks, SP rank i = r * U + u (ring rank r, Ulysses rank u) holds:
  1. zigzag over the ring: every packed sample of length L is cut into 2R chunks of L / 2R
     tokens; ring rank r's sequence is, sample after sample, chunk r then chunk 2R-1-r;
  2. contiguous within the Ulysses group: ring rank r's sequence (S / R tokens) is cut into U
     equal contiguous pieces and piece u goes to SP rank r * U + u (a piece may span chunks and
     samples).
Equivalently: reorder the sequence as [ring rank 0's sequence, ring rank 1's, ...]
(`SequenceParallel.order`) and cut it into N equal pieces, one per SP rank in order. The Ulysses
all-to-all concatenates the U pieces of a ring rank in Ulysses-rank order, so its output is exactly
that ring rank's zigzag sequence: nothing is reordered after communication.

Padding. With more than one ring rank every packed sample is a multiple of 2R long (two chunks per
ring rank); the pack is a multiple of N (equal shards). Nothing depends on per-sample multiples of
2N: a piece of the Ulysses cut may span chunks and samples.

Attention, one autograd function. q/k/v shards `[S/N, b, h, d]` -> ONE all-to-all in the Ulysses
group moves q, k and v together (scatter heads, gather sequence) -> `[S/R, b, h/U, d]` views of one
buffer -> zigzag ring attention over the ring group -> ONE all-to-all back (scatter sequence,
gather heads) -> `[S/N, b, hq, d]`. The backward mirrors it: one all-to-all for dout, the ring
writes dq/dk/dv into one buffer laid out as that all-to-all sends it, one all-to-all back. When U
divides the K/V heads and a rank has several, the backward runs in chunks of whole K/V heads
(`backward_chunks`): per chunk one all-to-all moves that chunk's q, k, v, out and dout (the
forward kept the rank's own, not the received ones) and one sends its dq/dk/dv back, so a rank
holds a chunk's received tensors, dQ and dK/dV sums at a time (docs/mm_sp.md, "Memory"). Each
Ulysses rank receives only the distinct K/V heads its query heads use (`KVHeadPlan`: a K/V head
goes to every rank that needs it, once), expanded locally when grouped-query attention needs
copies of them.

No host syncs. The shard pieces, the validated boundaries and the ring layout (boundaries as device
tensors, front / back rows) are built once per set of sample boundaries and cached; a layer's
forward and backward then read no value back from the device and build no tensor from host data
(tests/test_sp_attention.py counts them). Pass the boundaries as a tuple of ints, as
`CoreAttention` does: a device tensor must be read back (`tolist`) on every call.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longvila_mcore.parallel.collectives import all_gather, heads_to_sequence, sequence_to_heads
from longvila_mcore.parallel.groups import SequenceParallelGroups, sequence_parallel_groups
from longvila_mcore.parallel.ring import (
    RingLayout,
    check_local_lengths,
    fold_batch,
    ring_backward,
    ring_forward,
    ring_layout,
    unfold_batch,
)

CuSeqlens = torch.Tensor | Sequence[int] | None


def check_heads(num_heads: int, ulysses: int) -> None:
    """Raise unless the query heads of a tensor-parallel rank split over the Ulysses ranks."""
    if num_heads % ulysses:
        raise ValueError(
            f"{num_heads} attention heads per tensor-parallel rank are not divisible by "
            f"ulysses={ulysses}; choose parallel.ulysses dividing {num_heads}"
        )


def sample_boundaries(
    cu_seqlens: CuSeqlens, total: int, ulysses: int, ring: int
) -> tuple[int, ...]:
    """Validated global sample boundaries (`None`: one sample of `total` tokens). With more than
    one ring rank every sample is a multiple of 2R long; the pack is a multiple of N = U x R."""
    if cu_seqlens is None:
        bounds = (0, total)
    elif isinstance(cu_seqlens, torch.Tensor):
        bounds = tuple(cu_seqlens.tolist())
    else:
        bounds = tuple(int(b) for b in cu_seqlens)
    return _check_boundaries(bounds, total, ulysses, ring)


@functools.lru_cache(maxsize=64)
def _check_boundaries(
    bounds: tuple[int, ...], total: int, ulysses: int, ring: int
) -> tuple[int, ...]:
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens {list(bounds)} must run from 0 to the sequence length {total}"
        )
    if any(end <= start for start, end in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens {list(bounds)} must increase (no empty samples)")
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if ring > 1 and (end - start) % (2 * ring):
            raise ValueError(
                f"packed sample {i} has length {end - start}; with ring={ring} every sample "
                f"must be a multiple of 2 x ring = {2 * ring}: pad each sample to that multiple "
                "when packing"
            )
    if total % (ulysses * ring):
        raise ValueError(
            f"the pack has {total} tokens; with sequence parallel size ulysses x ring = "
            f"{ulysses} x {ring} it must be a multiple of {ulysses * ring}: pad the pack to that "
            "multiple"
        )
    return bounds


@functools.lru_cache(maxsize=64)
def zigzag_pieces(bounds: tuple[int, ...], ring: int) -> tuple[tuple[int, int], ...]:
    """(global start, length) of the runs of positions in shard order: ring rank 0's sequence
    (sample after sample, chunk r then chunk 2R-1-r), then ring rank 1's, ... Adjacent runs are
    merged. O(samples x R) integers: the S-long order is never built to shard."""
    if ring == 1:  # no zigzag without a ring (and a single ring rank takes odd lengths)
        return ((0, bounds[-1]),)
    pieces: list[list[int]] = []
    for r in range(ring):
        for start, end in zip(bounds[:-1], bounds[1:]):
            chunk = (end - start) // (2 * ring)
            for first in (start + r * chunk, end - (r + 1) * chunk):
                if pieces and sum(pieces[-1]) == first:
                    pieces[-1][1] += chunk
                else:
                    pieces.append([first, chunk])
    return tuple((a, n) for a, n in pieces)


def _window(pieces: Sequence[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs of global positions at shard-order positions [lo, hi)."""
    runs, offset = [], 0
    for start, length in pieces:
        a, b = max(lo, offset), min(hi, offset + length)
        if a < b:
            runs.append((start + a - offset, b - a))
        offset += length
    return runs


def zigzag_order(bounds: tuple[int, ...], ring: int) -> torch.Tensor:
    """Global positions in shard order (S entries, built on request, never cached)."""
    return torch.cat([torch.arange(a, a + n) for a, n in zigzag_pieces(bounds, ring)])


@dataclass(frozen=True, eq=False)
class KVHeadPlan:
    """Which K/V heads travel in the Ulysses all-to-all, for one Ulysses rank.

    The local attention needs `lcm(hkv, U) / U` K/V heads per rank, laid out so that its query
    heads map to them as grouped-query attention does (local query head i uses local K/V head
    i // (hq / lcm)). A rank receives only the distinct K/V heads its query heads use, `width` of
    them (the largest such count over the ranks; a rank that needs fewer gets its last one
    again), and `local` expands them to the lcm layout after the receive. `send` is None when U
    divides hkv (each head goes to one rank, in order); `local` is None when U divides hkv or hkv
    divides U (what a rank receives is its layout)."""

    width: int
    send: torch.Tensor | None  # [U * width] K/V heads, rank after rank, to select before sending
    local: torch.Tensor | None  # [lcm / U] received heads of the local layout, or None if all


@functools.lru_cache(maxsize=64)
def kv_head_plan(hq: int, hkv: int, ulysses: int, rank: int, device: torch.device) -> KVHeadPlan:
    """The `KVHeadPlan` of Ulysses rank `rank` (hq a multiple of hkv and U), built once on the
    device for every layer."""
    per_rank = math.lcm(hkv, ulysses) // ulysses
    group = math.lcm(hkv, ulysses) // hkv  # replicas of each K/V head in the lcm layout
    layout = [[(u * per_rank + j) // group for j in range(per_rank)] for u in range(ulysses)]
    needed = [sorted(set(heads)) for heads in layout]
    width = max(len(heads) for heads in needed)
    sent = [heads + heads[-1:] * (width - len(heads)) for heads in needed]
    flat = [h for heads in sent for h in heads]
    local = [sent[rank].index(h) for h in layout[rank]]
    return KVHeadPlan(
        width,
        None if flat == list(range(hkv)) else torch.tensor(flat, device=device),
        None if local == list(range(width)) else torch.tensor(local, device=device),
    )


# The most head chunks the backward of a layer is split into (see `backward_chunks`).
MAX_BACKWARD_CHUNKS = 4


def backward_chunks(kv_heads: int, ulysses: int, plan: KVHeadPlan) -> int:
    """Into how many chunks of whole K/V heads (each with the query heads that use them) the 2D
    attention's backward is split: the largest divisor of the rank's local K/V heads up to
    `MAX_BACKWARD_CHUNKS`, when U divides the K/V heads (`plan` moves each head to one rank);
    1 otherwise, and without Ulysses. Chunks never share a K/V head, so nothing travels twice."""
    if ulysses == 1 or plan.send is not None or plan.local is not None:
        return 1
    local = kv_heads // ulysses
    return max(c for c in range(1, MAX_BACKWARD_CHUNKS + 1) if local % c == 0)


def _fold_copy(x: torch.Tensor, batch: int) -> torch.Tensor:
    """An own `[b * s, h, d]` copy of `x` `[s, b, h, d]` (one copy, no temporary)."""
    s, b, h, d = x.shape
    out = x.new_empty((b * s, h, d))
    unfold_batch(out, batch).copy_(x)
    return out


def _receive(parts, widths, plan: KVHeadPlan, group, batch: int, select=None):
    """The Ulysses all-to-all of q, k, v (and any further parts with q's heads: out, dout):
    folded own copies of the received q and further parts `[T, h, d]` and the K/V block
    `[2, T, h_kv, d]` the ring sends as it is, expanded to the local heads (`plan.local`). The
    all-to-all's buffer is freed on return, so that nothing holds it next to the copies."""
    recv = heads_to_sequence(parts, group, select).split(widths, dim=2)
    k, v = recv[1], recv[2]
    if plan.local is not None:
        k, v = k.index_select(2, plan.local), v.index_select(2, plan.local)
    s, b, h, d = k.shape
    kv = k.new_empty((2, b * s, h, d))
    for i, x in enumerate((k, v)):
        unfold_batch(kv[i], batch).copy_(x)
    del k, v
    return [_fold_copy(recv[0], batch), kv, *(_fold_copy(x, batch) for x in recv[3:])]


class _Attention2D(torch.autograd.Function):
    """The 2D attention. With U > 1 and one backward chunk the forward holds the received q and
    K/V and the output before its all-to-all back for the backward (one all-to-all there, for
    dout). With several chunks it saves the rank's own q, k, v and output instead (which its
    caller's autograd graph mostly holds anyway) and the backward moves, chunk by chunk, q, k, v,
    out and dout of the chunk's heads in one all-to-all, runs the ring backward on them and
    sends the chunk's gradients back: a rank holds 1/c of the received tensors, of dQ and of
    the dK/dV sums at a time (docs/mm_sp.md, "Memory")."""

    @staticmethod
    def forward(ctx, q, k, v, layout: RingLayout, groups: SequenceParallelGroups, scale: float):
        ulysses, u = groups.ulysses, groups.ulysses.size()
        batch, kv_heads = q.shape[1], k.shape[2]
        plan = kv_head_plan(q.shape[2], kv_heads, u, ulysses.rank(), q.device)
        chunks = backward_chunks(kv_heads, u, plan)
        widths = (q.shape[2] // u, plan.width, plan.width)
        ctx.args = (layout, groups, scale, batch, widths, kv_heads, plan, chunks)
        if u == 1:
            q, k, v = fold_batch(q), fold_batch(k), fold_batch(v)
            out, lse = ring_forward(q, (k, v), layout, groups.ring, scale)
            out = out.to(q.dtype)
            ctx.save_for_backward(q, k, v, out, lse)
            return unfold_batch(out, batch)
        sent = [k, v] if plan.send is None else [x.index_select(2, plan.send) for x in (k, v)]
        q_recv, kv = _receive([q, *sent], widths, plan, ulysses, batch)
        del sent
        if chunks > 1:  # handed over: freed once sent round the ring and used
            kv = [kv]
        out, lse = ring_forward(q_recv, kv, layout, groups.ring, scale)
        out = out.to(q.dtype)
        if chunks == 1:
            # Held on ctx rather than saved for backward, which keeps saved tensors until the
            # backward returns: the backward drops them before the gradients' all-to-all (a
            # rank's peak). All are this function's own intermediates (the q/k/v received, the
            # output before its all-to-all), which nothing else can modify in place.
            ctx.held = [q_recv, kv, out, lse]
        else:
            ctx.held = [lse]
        del q_recv, kv
        result = sequence_to_heads(unfold_batch(out, batch), widths[:1], ulysses)[0]
        if chunks > 1:
            ctx.save_for_backward(q, k, v, result)
        return result

    @staticmethod
    def backward(ctx, dout):
        layout, groups, scale, batch, widths, kv_heads, plan, chunks = ctx.args
        ulysses, u = groups.ulysses, groups.ulysses.size()
        if u == 1:
            q, k, v, out, lse = ctx.saved_tensors
            dout = fold_batch(dout).contiguous()
            grads = ring_backward(dout, q, (k, v), out, lse, layout, groups.ring, scale)
            return (*(unfold_batch(g.to(q.dtype), batch) for g in grads), None, None, None)
        if chunks > 1:
            return (*_chunked_backward(ctx, dout), None, None, None)
        q, kv, out, lse = ctx.held
        ctx.held = None
        dtype = q.dtype
        dout = fold_batch(heads_to_sequence([dout], ulysses)).contiguous()
        grads = ring_backward(dout, q, kv, out, lse, layout, groups.ring, scale)
        del dout, q, kv, out, lse
        if plan.local is not None:  # the gradients of a received head's local copies add up
            t, d = grads[1].shape[0], grads[1].shape[2]
            for i in (1, 2):
                grads[i] = (
                    grads[i].new_zeros((t, plan.width, d)).index_add_(1, plan.local, grads[i])
                )
        # Passed without a name here, so the all-to-all frees the buffer once it is sent.
        dq, dk, dv = sequence_to_heads(_pack(grads, widths, batch, dtype), widths, ulysses)
        if plan.send is not None:  # the gradients of the copies sent to several ranks add up
            shape = (*dk.shape[:2], kv_heads, dk.shape[3])
            dk, dv = (x.new_zeros(shape).index_add_(2, plan.send, x) for x in (dk, dv))
        return dq, dk, dv, None, None, None


def _chunked_backward(ctx, dout):
    """The backward in `chunks` chunks of the local heads: chunk j is local query heads
    [j hq_l / c, (j + 1) hq_l / c) and the K/V heads they use (U divides the K/V heads, so each
    K/V head is on one rank and the local heads are contiguous)."""
    layout, groups, scale, batch, widths, kv_heads, plan, chunks = ctx.args
    q, k, v, out = ctx.saved_tensors
    (lse,) = ctx.held
    ctx.held = None
    wq, wkv = widths[0] // chunks, widths[1] // chunks
    grads = [torch.empty_like(x) for x in (q, k, v)]
    for j in range(chunks):
        q_heads, kv_heads = slice(j * wq, (j + 1) * wq), slice(j * wkv, (j + 1) * wkv)
        select = (q_heads, kv_heads, kv_heads, q_heads, q_heads)
        received = _receive(
            [q, k, v, out, dout], (wq, wkv, wkv, wq, wq), plan, groups.ulysses, batch, select
        )
        part = ring_backward(
            received[3],
            received[0],
            received[1],
            received[2],
            lse[q_heads],
            layout,
            groups.ring,
            scale,
        )
        del received
        chunk_widths = (wq, wkv, wkv)
        sequence_to_heads(
            _pack(part, chunk_widths, batch, q.dtype), chunk_widths, groups.ulysses, grads, select
        )
    return grads


def _pack(grads: list[torch.Tensor], widths, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """`[t, b, sum(widths), d]`, the folded gradients side by side along heads, as the all-to-all
    back sends them; each gradient is dropped from `grads` once it is copied."""
    t, d = grads[0].shape[0] // batch, grads[0].shape[2]
    buffer = grads[0].new_empty((t, batch, sum(widths), d), dtype=dtype)
    for view in buffer.split(widths, dim=2):
        view.copy_(unfold_batch(grads.pop(0), batch))
    return buffer


class SequenceParallel:
    """Sharding and attention for one sequence-parallel group (the DESIGN contract's `sp`)."""

    def __init__(self, groups: SequenceParallelGroups):
        self.groups = groups
        self.size, self.rank = groups.size, groups.rank
        self.ulysses, self.ring = groups.ulysses.size(), groups.ring.size()

    def boundaries(self, total: int, cu_seqlens: CuSeqlens = None) -> tuple[int, ...]:
        """The validated global sample boundaries of a pack of `total` tokens."""
        return sample_boundaries(cu_seqlens, total, self.ulysses, self.ring)

    def order(self, total: int, cu_seqlens: CuSeqlens = None) -> torch.Tensor:
        """Global positions in shard order: SP rank i holds `order[i * S/N : (i + 1) * S/N]`."""
        return zigzag_order(self.boundaries(total, cu_seqlens), self.ring)

    def shard(self, x: torch.Tensor, dim: int = 0, cu_seqlens: CuSeqlens = None) -> torch.Tensor:
        """This rank's tokens of the full tensor `x` (sequence along `dim`), in shard order."""
        total = x.shape[dim]
        pieces = zigzag_pieces(self.boundaries(total, cu_seqlens), self.ring)
        local = total // self.size
        runs = _window(pieces, self.rank * local, (self.rank + 1) * local)
        return torch.cat([x.narrow(dim, a, n) for a, n in runs], dim)

    def gather(
        self, x_local: torch.Tensor, dim: int = 0, cu_seqlens: CuSeqlens = None
    ) -> torch.Tensor:
        """The full tensor from every rank's shard (inverse of `shard`). Autograd-aware: a
        shard's gradient is the sum over ranks of the gradients of its rows."""
        total = x_local.shape[dim] * self.size
        pieces = zigzag_pieces(self.boundaries(total, cu_seqlens), self.ring)
        gathered = all_gather(x_local.movedim(dim, 0), self.groups.sp)
        offsets, offset = [], 0
        for start, length in pieces:
            offsets.append((start, offset, length))
            offset += length
        runs = [gathered.narrow(0, o, n) for _, o, n in sorted(offsets)]
        return torch.cat(runs).movedim(0, dim)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: CuSeqlens = None,
        softmax_scale: float | None = None,
    ) -> torch.Tensor:
        """Causal attention over the global sequence from local shards; packed samples are
        isolated. q `[S/N, b, hq, d]`, k/v `[S/N, b, hkv, d]` -> `[S/N, b, hq, d]`."""
        s, b, hq, d = q.shape
        if k.shape != v.shape or k.shape[:2] != (s, b) or k.shape[3] != d or hq % k.shape[2]:
            raise ValueError(
                f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must match "
                "q's [s, b, :, d] and have a number of heads dividing q's"
            )
        check_heads(hq, self.ulysses)
        bounds = self.boundaries(s * self.size, cu_seqlens)
        scale = d**-0.5 if softmax_scale is None else softmax_scale
        local_lengths = _local_lengths(bounds, self.ring)
        check_local_lengths(local_lengths, s * self.ulysses, self.ring)
        layout = ring_layout(local_lengths, b, q.device)
        return _Attention2D.apply(q, k, v, layout, self.groups, scale)


@functools.lru_cache(maxsize=64)
def _local_lengths(bounds: tuple[int, ...], ring: int) -> tuple[int, ...]:
    return tuple((end - start) // ring for start, end in zip(bounds[:-1], bounds[1:]))


def init_sequence_parallel(ulysses: int = 1, ring: int = 1) -> SequenceParallel:
    """The `sp` object of a `ulysses x ring` sequence-parallel layout (after torch.distributed is
    initialised; collective). Uses Megatron's context-parallel groups when they exist."""
    return SequenceParallel(sequence_parallel_groups(ulysses, ring))
