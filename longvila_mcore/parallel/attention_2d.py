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

Attention. q/k/v shards `[S/N, b, h, d]` -> all-to-all in the Ulysses group (scatter heads,
gather sequence) -> `[S/R, b, h/U, d]` -> zigzag ring attention over the ring group -> all-to-all
back (scatter sequence, gather heads) -> `[S/N, b, hq, d]`. K/V heads are replicated first when
U does not divide their number, so each Ulysses rank receives the K/V heads its query heads use.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from longvila_mcore.parallel.collectives import all_gather, all_to_all
from longvila_mcore.parallel.groups import SequenceParallelGroups, sequence_parallel_groups
from longvila_mcore.parallel.ring import zigzag_ring_attention

CuSeqlens = torch.Tensor | Sequence[int] | None


def check_heads(num_heads: int, ulysses: int) -> None:
    """Raise unless the query heads of a tensor-parallel rank split over the Ulysses ranks."""
    if num_heads % ulysses:
        raise ValueError(
            f"{num_heads} attention heads per tensor-parallel rank are not divisible by "
            f"ulysses={ulysses}; choose parallel.ulysses dividing {num_heads}"
        )


def sample_boundaries(cu_seqlens: CuSeqlens, total: int, sp_size: int) -> tuple[int, ...]:
    """Validated global sample boundaries (`None`: one sample of `total` tokens). With more than
    one rank every sample is a multiple of 2N long; one rank takes any lengths."""
    if cu_seqlens is None:
        bounds = (0, total)
    elif isinstance(cu_seqlens, torch.Tensor):
        bounds = tuple(cu_seqlens.tolist())
    else:
        bounds = tuple(int(b) for b in cu_seqlens)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"cu_seqlens {list(bounds)} must run from 0 to the sequence length {total}"
        )
    if any(end <= start for start, end in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens {list(bounds)} must increase (no empty samples)")
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if sp_size > 1 and (end - start) % (2 * sp_size):
            raise ValueError(
                f"packed sample {i} has length {end - start}; with sequence parallel size "
                f"{sp_size} every sample must be a multiple of 2 x ulysses x ring = "
                f"{2 * sp_size}: pad each sample to that multiple when packing"
            )
    return bounds


@functools.lru_cache(maxsize=64)
def _zigzag_order(bounds: tuple[int, ...], ring: int) -> torch.Tensor:
    if ring == 1:  # no zigzag without a ring (and a single rank may have odd lengths)
        return torch.arange(bounds[-1])
    per_ring_rank = [[] for _ in range(ring)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        chunk = (end - start) // (2 * ring)
        for r, pieces in enumerate(per_ring_rank):
            pieces.append(torch.arange(start + r * chunk, start + (r + 1) * chunk))
            pieces.append(torch.arange(end - (r + 1) * chunk, end - r * chunk))
    return torch.cat([p for pieces in per_ring_rank for p in pieces])


def replicate_kv_heads(x: torch.Tensor, ulysses: int) -> torch.Tensor:
    """[s, b, hkv, d] -> [s, b, lcm(hkv, U), d], each head repeated in place, so that splitting
    heads over U ranks gives every rank the K/V heads of its query heads (hq is a multiple of
    both hkv and U). Autograd sums the copies' gradients back."""
    s, b, h, d = x.shape
    copies = ulysses // math.gcd(h, ulysses)
    if copies == 1:
        return x
    return x.unsqueeze(3).expand(s, b, h, copies, d).reshape(s, b, h * copies, d)


class SequenceParallel:
    """Sharding and attention for one sequence-parallel group (the DESIGN contract's `sp`)."""

    def __init__(self, groups: SequenceParallelGroups):
        self.groups = groups
        self.size, self.rank = groups.size, groups.rank
        self.ulysses, self.ring = groups.ulysses.size(), groups.ring.size()

    def order(self, total: int, cu_seqlens: CuSeqlens = None) -> torch.Tensor:
        """Global positions in shard order: SP rank i holds `order[i * S/N : (i + 1) * S/N]`."""
        return _zigzag_order(sample_boundaries(cu_seqlens, total, self.size), self.ring)

    def shard(self, x: torch.Tensor, dim: int = 0, cu_seqlens: CuSeqlens = None) -> torch.Tensor:
        """This rank's tokens of the full tensor `x` (sequence along `dim`), in shard order."""
        total = x.shape[dim]
        local = total // self.size
        mine = self.order(total, cu_seqlens)[self.rank * local : (self.rank + 1) * local]
        return x.index_select(dim, mine.to(x.device))

    def gather(
        self, x_local: torch.Tensor, dim: int = 0, cu_seqlens: CuSeqlens = None
    ) -> torch.Tensor:
        """The full tensor from every rank's shard (inverse of `shard`). Autograd-aware: a
        shard's gradient is the sum over ranks of the gradients of its rows."""
        order = self.order(x_local.shape[dim] * self.size, cu_seqlens)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel())
        gathered = all_gather(x_local.movedim(dim, 0), self.groups.sp)
        return gathered.index_select(0, inverse.to(x_local.device)).movedim(0, dim)

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
        bounds = sample_boundaries(cu_seqlens, s * self.size, self.size)
        scale = d**-0.5 if softmax_scale is None else softmax_scale
        heads_to_seq = functools.partial(
            all_to_all, scatter_dim=2, gather_dim=0, group=self.groups.ulysses
        )
        q = heads_to_seq(q)
        k = heads_to_seq(replicate_kv_heads(k, self.ulysses))
        v = heads_to_seq(replicate_kv_heads(v, self.ulysses))
        local_lengths = [(end - start) // self.ring for start, end in zip(bounds[:-1], bounds[1:])]
        out = zigzag_ring_attention(q, k, v, local_lengths, self.groups.ring, scale)
        return all_to_all(out, scatter_dim=0, gather_dim=2, group=self.groups.ulysses)


def init_sequence_parallel(ulysses: int = 1, ring: int = 1) -> SequenceParallel:
    """The `sp` object of a `ulysses x ring` sequence-parallel layout (after torch.distributed is
    initialised; collective). Uses Megatron's context-parallel groups when they exist."""
    return SequenceParallel(sequence_parallel_groups(ulysses, ring))
