"""The KV cache of generation, sharded over the sequence-parallel ranks.

Prefill runs the prompt through the model's sequence-parallel forward (the image-first sharder,
the 2D attention); each decoder layer's core attention keeps the keys and values of its own
shard (its S/N tokens, every head of its tensor-parallel slice) where they were computed: no
rank ever holds the whole cache. The prompt's padding (to the layout's multiple, at its end) is
not kept.

Every later step feeds the same m new tokens to every rank (m is small: a question's text, or
one decoded token), so the rest of the layer is computed redundantly and nothing else moves.
The new tokens' keys and values go one by one to the rank holding the fewest entries (ties: the
lowest rank): the shards stay balanced. Each rank attends the m queries to its own entries (a
key is visible to the queries at its position and later) and the partial results merge by
log-sum-exp after one all-gather of `[out, lse]` in the sequence-parallel group per layer.
"""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from longvila_mcore.parallel.collectives import all_gather


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries `[m, b, hq, d]` to one shard of keys / values `[t, b, hkv, d]`
    (grouped-query: `hq` a multiple of `hkv`), key j visible to query i when
    `k_positions[j] <= q_positions[i]`. Returns `out` `[m, b, hq, d]` and its log-sum-exp
    `[m, b, hq]`, both float32 (float64 for float64 inputs); a query that sees no key gets
    `out` 0 and `lse` -inf, which `merge_partials` weighs as nothing."""
    m, b, hq, d = q.shape
    hkv = k.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dtype).view(m, b, hkv, hq // hkv, d)
    scores = torch.einsum("mbhgd,tbhd->bhgmt", qg, k.to(dtype)) * scale
    hidden = k_positions[None, :] > q_positions[:, None]  # [m, t]
    scores = scores.masked_fill(hidden, float("-inf"))
    lse = scores.logsumexp(-1)  # [b, hkv, g, m]
    # A query with no visible key: -inf - -inf would be nan; 0 keeps its weights at exp(-inf) = 0.
    weights = (scores - torch.where(lse.isfinite(), lse, 0.0)[..., None]).exp()
    out = torch.einsum("bhgmt,tbhd->mbhgd", weights, v.to(dtype))
    return out.reshape(m, b, hq, d), lse.permute(3, 0, 1, 2).reshape(m, b, hq)


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> torch.Tensor:
    """Attention over the union of N disjoint key sets from each set's `out` `[N, ..., d]` and
    log-sum-exp `[N, ...]`: `sum_i exp(lse_i - M) out_i / sum_i exp(lse_i - M)` with M the
    largest lse (each query sees at least one key somewhere, so M is finite)."""
    top = lses.max(0).values
    weights = (lses - top).exp()
    return (weights[..., None] * outs).sum(0) / weights.sum(0)[..., None]


class ShardedKVCache:
    """This rank's entries of every decoder layer's KV cache, and how many every rank holds.

    Protocol: `prefill(positions, keep)` before the model's forward over the prompt (every
    layer then `store`s its shard), then `extend(positions)` before each forward over new tokens
    (every layer `attend`s). `sizes` / `truncate` rewind to an earlier point (a second question
    about the same prefilled video)."""

    def __init__(self, num_layers: int, group: ProcessGroup | None):
        self.group = group
        self.world = 1 if group is None else group.size()
        self.rank = 0 if group is None else group.rank()
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions = torch.empty(0, dtype=torch.long)
        """Global position of each entry held here, in the order held."""
        self.length = 0
        """Entries held here."""
        self.sizes = [0] * self.world
        """Entries held by every rank of the group (identical on all of them)."""
        self._keep: torch.Tensor | None = None  # prefill: which local rows are kept
        self._new: slice | None = None  # extend: where this step's own rows go
        self._mine: torch.Tensor | None = None  # extend: which new tokens this rank keeps
        self._query_positions: torch.Tensor | None = None

    def layer(self, index: int) -> LayerKV:
        return LayerKV(self, index)

    def prefill(self, positions: torch.Tensor, keep: torch.Tensor) -> None:
        """The next forward is the prompt: `positions` `[S/N]` are this rank's tokens' global
        positions and `keep` marks those to cache (not padding). Collective over the group."""
        if self.length or any(self.sizes):
            raise ValueError("prefill needs an empty cache; rewind with truncate([0, ...])")
        self.positions = positions[keep].cpu()
        self.length = len(self.positions)
        counts = torch.tensor([self.length])
        if self.world > 1:
            counts = all_gather(counts, self.group)
        self.sizes = counts.tolist()
        self._keep, self._new = keep, None

    def extend(self, positions: torch.Tensor) -> None:
        """The next forward feeds new tokens at global `positions` `[m]` (the same on every
        rank); each is placed on the rank with the fewest entries."""
        owners = []
        for _ in range(len(positions)):
            owner = min(range(self.world), key=lambda r: (self.sizes[r], r))
            self.sizes[owner] += 1
            owners.append(owner)
        mine = torch.tensor(owners) == self.rank
        start = self.length
        self.positions = torch.cat([self.positions[:start], positions.cpu()[mine]])
        self.length = len(self.positions)
        self._keep, self._new = None, slice(start, self.length)
        self._mine = mine
        self._query_positions = positions.cpu()

    def truncate(self, sizes: list[int]) -> None:
        """Forget every entry added after the group held `sizes` (a copy of an earlier
        `sizes`): entries are held in the order they were added."""
        self.sizes = list(sizes)
        self.length = sizes[self.rank]
        self.positions = self.positions[: self.length]


class LayerKV:
    """One decoder layer's view of the cache, attached to its core attention."""

    def __init__(self, cache: ShardedKVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def decoding(self) -> bool:
        """Whether the current forward feeds new tokens (else it is the prompt)."""
        return self.cache._new is not None

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keep the prompt's keys / values `[S/N, b, hkv, d]` of this rank (padding dropped)."""
        keep = self.cache._keep
        self.cache.keys[self.index] = key[keep].detach().clone()
        self.cache.values[self.index] = value[keep].detach().clone()

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Append this rank's share of the new keys / values, then the new queries'
        attention `[m, b, hq, d]` over every rank's entries."""
        cache, i = self.cache, self.index
        new, mine = cache._new, cache._mine.to(key.device)
        cache.keys[i] = _write(cache.keys[i], new, key[mine])
        cache.values[i] = _write(cache.values[i], new, value[mine])
        n = cache.length
        k_positions = cache.positions.to(query.device)
        q_positions = cache._query_positions.to(query.device)
        out, lse = partial_attention(
            query, cache.keys[i][:n], cache.values[i][:n], q_positions, k_positions, scale
        )
        if cache.world == 1:
            return out.to(query.dtype)
        # One message per rank: out and lse side by side.
        both = torch.cat([out, lse[..., None]], dim=-1)[None]
        gathered = all_gather(both, cache.group)
        return merge_partials(gathered[..., :-1], gathered[..., -1]).to(query.dtype)


def _write(buffer: torch.Tensor | None, rows: slice, x: torch.Tensor) -> torch.Tensor:
    """`buffer` with `x` written at `rows`, grown (by at least an eighth, so appending one
    token at a time copies the cache a logarithmic number of times) when it is too short; the
    rows beyond `rows.start` are free (a rewind left them)."""
    if buffer is None:
        raise ValueError("the cache was not prefilled; call ShardedKVCache.prefill first")
    if rows.stop > buffer.shape[0]:
        grown = buffer.new_empty((rows.stop + max(64, rows.stop // 8), *buffer.shape[1:]))
        grown[: rows.start] = buffer[: rows.start]
        buffer = grown
    buffer[rows] = x
    return buffer
