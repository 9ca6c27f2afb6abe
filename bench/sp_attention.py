"""Sequence-parallel attention on 4 gloo ranks: 2D (2x2), ring (1x4), Ulysses (4x1), all-gather.

For each layout, one attention layer's forward + backward on S tokens: the collective calls and
the bytes each rank sends, counted at our collectives and compared with REFERENCE 4's formulas;
the host syncs (`runtime.device.count_host_syncs`, a separate untimed pass); the time; the
per-rank peak memory (tensors alive during the step, inputs included). Then the per-rank peak
memory against N for a long sequence, and the padding a pack needs under the old rule (every
sample to a multiple of 2N) and the new one (2R per sample, N for the pack). Prints tables, writes
bench/results/sp_attention.json; with --json the last line of stdout is one JSON object.

    python bench/sp_attention.py [--seq 4096] [--heads 8] [--kv-heads 4] [--head-dim 64]
                                 [--iters 3] [--long-seq 32768] [--long-heads 8]
                                 [--memory-repeats 2] [--json]

The "main" columns are not measured here: they are this script's numbers on main before the
fused path (commit b211d05, `python bench/sp_attention.py`, the same defaults, 4 gloo ranks on the
same 2-core machine, run 2026-12-02), kept in MAIN_BASELINE; calls and host syncs of main were
counted by the same counters on that commit. Times on a shared machine vary by tens of percent.
The memory scaling runs 8 heads (and 8 K/V heads) at every N: 4 per Ulysses rank at U = 2, so the
2D backward runs in 4 chunks of heads (`attention_2d.backward_chunks`); main's memory numbers were
measured with 2 heads (the ratios are comparable: every term scales with the heads).

Formulas (elements per rank per layer; H = heads x d; H_a2a = U w x d, where w is the number of
distinct KV heads the query heads of a Ulysses rank use, at most, `attention_2d.KVHeadPlan.width`;
H_kv = lcm(kv heads, U) x d, the KV heads of the U ranks' local attention):
  forward:  Ulysses (2H + 2H_a2a) S/N (U-1)/U + ring 2 S H_kv (R-1)/N
  backward: Ulysses the same (the adjoint all-to-alls have the forward's sizes) + ring twice the
            forward (K/V travel again, dK/dV travel with them); with c > 1 backward chunks
            (`attention_2d.backward_chunks`) q, k, v and out travel again too, chunk by chunk
            (2 c all-to-alls): Ulysses (4H + 4H_a2a) S/N (U-1)/U
  all-gather baseline: 2 (N-1) S/N H_kv forward (all-gather K, V), the same backward
            (reduce-scatter dK, dV)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longvila_mcore.data.packing import padding_multiples

WORLD = 4
LAYOUTS = {"2d": (2, 2), "ring": (1, 4), "ulysses": (4, 1), "all_gather": (1, 4)}
RESULTS = Path(__file__).parent / "results" / "sp_attention.json"
# main at b211d05 (see the module docstring): per layout, fwd/bwd all-to-all and ring calls
# (one ring call = one batch of point-to-point ops), host syncs per layer, time, peak memory;
# then the per-rank peak memory of the 2D attention at S=32768 against N.
MAIN_BASELINE = {
    "layouts": {
        "2d": {"a2a": (4, 4), "ring": (1, 2), "syncs": 6, "time_ms": 1297, "peak_mb": 30.1},
        "ring": {"a2a": (0, 0), "ring": (3, 6), "syncs": 6, "time_ms": 854, "peak_mb": 32.1},
        "ulysses": {"a2a": (4, 4), "ring": (0, 0), "syncs": 6, "time_ms": 1249, "peak_mb": 20.1},
        "all_gather": {"a2a": (0, 0), "ring": (0, 0), "syncs": 0, "time_ms": 1198, "peak_mb": 36.1},
    },
    "memory_mb": {1: 128.5, 2: 104.4, 4: 84.2},
}
# Layouts of the padding table: N = 4, 32 and 256.
PADDING_LAYOUTS = ((2, 2), (8, 4), (8, 32))


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storage alive while the mode is active (CPU has no allocator stats):
    every op's outputs are counted until their storage is freed. The mode holds one reference to
    each storage it counts and lets it go, at the next op, once that reference is the last one:
    a buffer that gloo's thread releases after a transfer counts until it is released, not until
    that thread next gets the GIL (which a weakref callback on the storage would wait for; such
    delays added up to 2 units of the 2D peak at random)."""

    def __init__(self, *inputs: torch.Tensor):
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, torch.UntypedStorage] = {}
        for t in inputs:
            self._track(t)

    def _sweep(self) -> None:
        for key, storage in list(self._alive.items()):
            if torch._C._storage_Use_Count(key) == 1:  # only this mode's reference is left
                self.live -= storage.nbytes()
                del self._alive[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        self._alive[key] = storage
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)

    def __exit__(self, *exc):
        self._alive.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


class _PrefixAttention(torch.autograd.Function):
    """The all-gather baseline's local step: each local Q chunk against the K/V prefix it needs
    (all earlier tokens, no mask, merged by LSE with its own chunk, causal)."""

    @staticmethod
    def forward(ctx, q, k, v, chunks, scale):
        from longvila_mcore.parallel.local_attention import attention_forward
        from longvila_mcore.parallel.ring import merge_partial_

        out = torch.empty_like(q)
        lse = q.new_empty((q.shape[1], q.shape[0]))
        for local, start, n in chunks:
            qc, rows = q[local : local + n], slice(local, local + n)
            own = slice(start, start + n)
            o, l_ = attention_forward(qc, k[own], v[own], [0, n], [0, n], True, scale)
            if start:
                prefix = attention_forward(
                    qc, k[:start], v[:start], [0, n], [0, start], False, scale
                )
                l_ = merge_partial_(o, l_, *prefix)
            out[rows], lse[:, rows] = o, l_
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (chunks, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        from longvila_mcore.parallel.local_attention import attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        chunks, scale = ctx.args
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for local, start, n in chunks:
            rows = slice(local, local + n)
            args = (dout[rows], q[rows])
            final = (out[rows], lse[:, rows])
            own = slice(start, start + n)
            g = attention_backward(*args, k[own], v[own], *final, [0, n], [0, n], True, scale)
            dq[rows] += g[0]
            dk[own] += g[1]
            dv[own] += g[2]
            if start:
                prefix = (k[:start], v[:start], *final, [0, n], [0, start], False, scale)
                g = attention_backward(*args, *prefix)
                dq[rows] += g[0]
                dk[:start] += g[1]
                dv[:start] += g[2]
        return dq, dk, dv, None, None


def all_gather_attention(sp, q, k, v):
    """All-gather K/V over the group, then local attention of this rank's zigzag Q chunks."""
    total, ring = q.shape[0] * sp.size, sp.size
    n = total // (2 * ring)
    chunks = [(0, sp.rank * n, n), (n, (2 * ring - 1 - sp.rank) * n, n)]
    k_full, v_full = (sp.gather(x, 0)[:, 0] for x in (k, v))
    out = _PrefixAttention.apply(q[:, 0], k_full, v_full, chunks, q.shape[-1] ** -0.5)
    return out[:, None]


def forward(mode, sp, q, k, v):
    if mode == "all_gather":
        return all_gather_attention(sp, q, k, v)
    return sp.attention(q, k, v)


def step(mode, sp, q, k, v, dout):
    """One attention layer's forward and backward (fresh gradients)."""
    for x in (q, k, v):
        x.grad = None
    forward(mode, sp, q, k, v).backward(dout)


def check_baseline_matches_ring(args) -> None:
    """The all-gather baseline computes the same attention and gradients as the ring (1x4, same
    shard order), so the comparison is between equal results."""
    from longvila_mcore.parallel import init_sequence_parallel

    sp = init_sequence_parallel(*LAYOUTS["ring"])
    results = []
    for mode in ("ring", "all_gather"):
        q, k, v, dout = _inputs(512 // sp.size, args.heads, args.kv_heads, args.head_dim, sp.rank)
        out = forward(mode, sp, q, k, v)
        out.backward(dout)
        results.append([out, q.grad, k.grad, v.grad])
    for ring, baseline in zip(*results):
        torch.testing.assert_close(baseline, ring, rtol=1e-5, atol=1e-5)


def expected_elements(mode, ulysses, ring, seq, heads, kv_heads, head_dim):
    """(forward, backward) elements sent per rank, from the formulas in the module docstring."""
    from longvila_mcore.parallel.attention_2d import backward_chunks, kv_head_plan

    n = ulysses * ring
    h, h_kv = heads * head_dim, math.lcm(kv_heads, ulysses) * head_dim
    plan = kv_head_plan(heads, kv_heads, ulysses, 0, torch.device("cpu"))
    h_a2a = ulysses * plan.width
    if mode == "all_gather":
        per_direction = 2 * (n - 1) * seq / n * kv_heads * head_dim
        return per_direction, per_direction
    a2a = (2 * h + 2 * h_a2a * head_dim) * seq / n * (ulysses - 1) / ulysses
    a2a_bwd = 2 * a2a if backward_chunks(kv_heads, ulysses, plan) > 1 else a2a
    ring_fwd = 2 * seq * h_kv * (ring - 1) / n
    return a2a + ring_fwd, a2a_bwd + 2 * ring_fwd


def _max_over_ranks(values: list[float], group=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def _inputs(seq_local, heads, kv_heads, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [heads, kv_heads, kv_heads, heads]
    q, k, v, dout = (torch.randn(seq_local, 1, h, head_dim, generator=gen) for h in shapes)
    return [x.requires_grad_() for x in (q, k, v)] + [dout]


def measure_layout(mode, args) -> dict:
    from longvila_mcore.parallel import init_sequence_parallel
    from longvila_mcore.parallel.collectives import count_communication
    from longvila_mcore.runtime.device import count_host_syncs

    ulysses, ring = LAYOUTS[mode]
    sp = init_sequence_parallel(ulysses, ring)
    q, k, v, dout = _inputs(args.seq // sp.size, args.heads, args.kv_heads, args.head_dim, sp.rank)
    step(mode, sp, q, k, v, dout)  # warm-up
    times = []
    for _ in range(args.iters):
        dist.barrier()
        start = time.perf_counter()
        step(mode, sp, q, k, v, dout)
        times.append(_max_over_ranks([time.perf_counter() - start])[0])
    with count_communication() as fwd_counter:
        out = forward(mode, sp, q, k, v)
    with count_communication() as bwd_counter:
        out.backward(dout)
    with count_host_syncs() as syncs:
        step(mode, sp, q, k, v, dout)
    with PeakMemory(q, k, v, dout) as memory:
        step(mode, sp, q, k, v, dout)
        peak = memory.peak
    fwd_sent, bwd_sent, peak, num_syncs = _max_over_ranks(
        [fwd_counter.total_sent, bwd_counter.total_sent, peak, len(syncs)]
    )
    fwd_expected, bwd_expected = (
        4 * e
        for e in expected_elements(
            mode, ulysses, ring, args.seq, args.heads, args.kv_heads, args.head_dim
        )
    )
    return {
        "layout": f"{ulysses}x{ring}",
        "sent_fwd_bytes": fwd_sent,
        "sent_bwd_bytes": bwd_sent,
        "expected_fwd_bytes": fwd_expected,
        "expected_bwd_bytes": bwd_expected,
        "ratio": (fwd_sent + bwd_sent) / (fwd_expected + bwd_expected),
        "all_to_all_calls": [fwd_counter.calls["ulysses"], bwd_counter.calls["ulysses"]],
        "ring_calls": [fwd_counter.calls["ring"], bwd_counter.calls["ring"]],
        "host_syncs": int(num_syncs),
        "time_s": statistics.median(times),
        "peak_bytes": peak,
    }


def measure_memory_scaling(args) -> dict:
    """Per-rank peak memory of the 2D attention on `long_seq` tokens for N = 1, 2, 4 (only the
    first sequence-parallel group computes, so the cores are not shared with idle copies): the
    least of `memory_repeats` steps on each rank, the largest over ranks. A step's peak varies by
    up to 2 units of S/N tokens x heads x d (about 0.06x N=1) with the machine's load: gloo's
    worker thread drops its reference to a finished all-to-all's buffers only when it next runs,
    and until then they count next to the buffers allocated after it."""
    from longvila_mcore.parallel import init_sequence_parallel

    results = {}
    for ulysses, ring in ((1, 1), (2, 1), (2, 2)):
        sp = init_sequence_parallel(ulysses, ring)
        n = sp.size
        peak = 0.0
        if dist.get_rank() < n:
            heads = args.long_heads
            q, k, v, dout = _inputs(args.long_seq // n, heads, heads, args.head_dim, sp.rank)
            peaks = []
            for _ in range(args.memory_repeats):
                with PeakMemory(q, k, v, dout) as memory:
                    step("2d", sp, q, k, v, dout)
                peaks.append(memory.peak)
            peak = min(peaks)
        results[n] = {"layout": f"{ulysses}x{ring}", "peak_bytes": _max_over_ranks([peak])[0]}
    for r in results.values():
        r["ratio"] = r["peak_bytes"] / results[1]["peak_bytes"]
    return results


def _worker(rank, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import longvila_mcore  # noqa: F401  (Megatron-Core's CPU support)

    check_baseline_matches_ring(args)
    layouts = {mode: measure_layout(mode, args) for mode in LAYOUTS}
    scaling = measure_memory_scaling(args) if args.long_seq else {}
    if rank == 0:
        report(args, layouts, scaling, padding_overhead())
    dist.barrier()
    dist.destroy_process_group()


def padding_overhead(seed: int = 0, samples: int = 64) -> list[dict]:
    """Tokens of one pack of `samples` random lengths, and the padding under each rule."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(200, 8000, (samples,), generator=gen).tolist()

    def up(n, m):
        return -(-n // m) * m

    rows = []
    for ulysses, ring in PADDING_LAYOUTS:
        n = ulysses * ring
        old = sum(up(x, 2 * n) for x in lengths)
        sample, pack = padding_multiples(ulysses, ring)  # what data/packing.py pads to
        new = up(sum(up(x, sample) for x in lengths), pack)
        raw = sum(lengths)
        rows.append(
            {"layout": f"{ulysses}x{ring}", "tokens": raw, "padded_old": old, "padded_new": new}
        )
    return rows


def report(args, layouts, scaling, padding):
    mb = 2**20
    main = MAIN_BASELINE
    print(
        f"\none attention layer, forward + backward, {WORLD} gloo ranks, S={args.seq}, "
        f"heads={args.heads}, kv_heads={args.kv_heads}, head_dim={args.head_dim}, fp32; "
        "'main' columns: MAIN_BASELINE (see the module docstring)"
    )
    header = (
        f"{'mode':<11}{'UxR':>5}{'a2a f/b':>9}{'main':>6}{'ring f/b':>9}{'main':>6}"
        f"{'sent fwd MB':>12}{'sent bwd MB':>12}{'formula':>8}{'ratio':>6}{'syncs':>6}{'main':>5}"
        f"{'ms':>7}{'main':>6}{'peak MB':>8}{'main':>6}"
    )
    print(header)
    for mode, r in layouts.items():
        base = main["layouts"][mode]
        sent = (r["sent_fwd_bytes"] + r["sent_bwd_bytes"]) / mb
        formula = (r["expected_fwd_bytes"] + r["expected_bwd_bytes"]) / mb
        a2a, ring = "{}/{}".format(*r["all_to_all_calls"]), "{}/{}".format(*r["ring_calls"])
        print(
            f"{mode:<11}{r['layout']:>5}{a2a:>9}{'{}/{}'.format(*base['a2a']):>6}{ring:>9}"
            f"{'{}/{}'.format(*base['ring']):>6}{r['sent_fwd_bytes'] / mb:>12.2f}"
            f"{r['sent_bwd_bytes'] / mb:>12.2f}{formula:>8.2f}{sent / formula:>6.3f}"
            f"{r['host_syncs']:>6}{base['syncs']:>5}{r['time_s'] * 1e3:>7.0f}{base['time_ms']:>6}"
            f"{r['peak_bytes'] / mb:>8.1f}{base['peak_mb']:>6.1f}"
        )
    if scaling:
        print(
            f"\nper-rank peak memory, 2D attention, S={args.long_seq}, heads={args.long_heads} "
            "(main: 2 heads)"
        )
        print(f"{'N':>3}{'UxR':>6}{'peak MB':>10}{'/ N=1':>7}{'main MB':>9}{'/ N=1':>7}")
        for n, r in scaling.items():
            peak = r["peak_bytes"] / mb
            base = main["memory_mb"][n]
            print(
                f"{n:>3}{r['layout']:>6}{peak:>10.1f}{r['ratio']:>7.3f}{base:>9.1f}"
                f"{base / main['memory_mb'][1]:>7.3f}"
            )
    print("\npadding of one pack of 64 samples (200-8000 tokens): old = every sample to 2N,")
    print("new = every sample to 2R, the pack to N (and 2R)")
    print(f"{'UxR':>6}{'tokens':>9}{'old':>9}{'new':>9}{'old %':>7}{'new %':>7}")
    for r in padding:
        old, new = (r[k] / r["tokens"] - 1 for k in ("padded_old", "padded_new"))
        print(
            f"{r['layout']:>6}{r['tokens']:>9}{r['padded_old']:>9}{r['padded_new']:>9}"
            f"{100 * old:>7.2f}{100 * new:>7.2f}"
        )
    results = {
        "args": vars(args),
        "layouts": layouts,
        "memory_vs_n": scaling,
        "padding": padding,
        "main_baseline": main,
        "host_syncs_per_layer": max(r["host_syncs"] for r in layouts.values()),
        "ulysses_all_to_all_calls_per_layer_fwd": layouts["2d"]["all_to_all_calls"][0],
        "memory_ratio_n4": scaling[4]["ratio"] if scaling else None,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {RESULTS}")
    if args.json:
        print(json.dumps(results))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=4096, help="tokens (a multiple of 8)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per layout")
    parser.add_argument("--long-seq", type=int, default=32768, help="0 skips the memory scaling")
    parser.add_argument(
        "--long-heads", type=int, default=8, help="heads (and K/V heads) of the memory scaling"
    )
    parser.add_argument(
        "--memory-repeats", type=int, default=2, help="steps per N (the least peak counts)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON last")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args), nprocs=WORLD)


if __name__ == "__main__":
    main()
