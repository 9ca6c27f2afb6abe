"""2D sequence-parallel attention (Ulysses x zigzag ring) against full causal attention in float64.

Every multi-process case runs inside one spawn per world size: the world-4 spawn covers the 1x4,
4x1 and 2x2 layouts, the collectives, the validation errors and the Megatron modules; the world-6
spawn covers 2x3 and 3x2.
"""

import pytest
import torch

from tests.multiproc import run_ranks

TOLERANCE = 1e-5


def reference_attention(q, k, v, bounds, scale):
    """Causal attention with packed samples isolated, from the definition (float64, sbhd)."""
    total = q.shape[0]
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    pos = torch.arange(total)
    sample = torch.bucketize(pos, torch.tensor(bounds[1:]), right=True)
    allowed = (sample[:, None] == sample[None, :]) & (pos[None, :] <= pos[:, None])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).abs().max() / ref.abs().max()).item()


def attention_errors(sp, hq, hkv, bounds, batch, head_dim=8, seed=0) -> dict[str, float]:
    """Relative errors of sp.attention's output and dq/dk/dv against the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    total = bounds[-1]
    q, k, v, dout = (
        torch.randn(total, batch, h, head_dim, generator=gen, dtype=torch.float64)
        for h in (hq, hkv, hkv, hq)
    )
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out = reference_attention(*full, bounds, head_dim**-0.5)
    ref_out.backward(dout)
    cu = torch.tensor(bounds)
    local = [sp.shard(x.float(), 0, cu).requires_grad_() for x in (q, k, v)]
    out = sp.attention(*local, cu_seqlens=cu)
    out.backward(sp.shard(dout.float(), 0, cu))
    pairs = [("out", out.detach(), ref_out)]
    pairs += [(f"d{n}", x.grad, f.grad) for n, x, f in zip("qkv", local, full)]
    return {name: relative_error(sp.gather(ours, 0, cu), ref) for name, ours, ref in pairs}


def attention_cases(heads, samples, single) -> dict[str, float]:
    """The worst error of each case: every (ulysses, ring) layout of `heads` with each of its
    (hq, hkv), on packed samples (`samples` boundaries) and on a single sequence of batch 2."""
    from longvila_mcore.parallel import init_sequence_parallel

    errors = {}
    for (ulysses, ring), layout_heads in heads.items():
        sp = init_sequence_parallel(ulysses, ring)
        for hq, hkv in layout_heads:
            for name, bounds, batch in (("packed", samples, 1), ("single", single, 2)):
                case = f"{ulysses}x{ring} hq{hq} hkv{hkv} {name} b{batch}"
                errors[case] = max(attention_errors(sp, hq, hkv, bounds, batch).values())
    return errors


def adjoint_gaps() -> dict[str, float]:
    """|<A x, g> - <x, A^T g>| summed over ranks, relative, for each collective and its backward:
    asymmetric shapes (parts of different head counts, different row counts per rank), on Ulysses
    groups of 2 and 4 and on rings of 2 and 4."""
    import torch.distributed as dist

    from longvila_mcore.parallel import collectives, groups
    from longvila_mcore.parallel.collectives import ring_shift_start

    u2r2, u4, r4 = groups.new_groups(2, 2), groups.new_groups(4, 1), groups.new_groups(1, 4)
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(10 + rank)
    sends = [(rank + j) % 3 + j for j in range(4)]
    recvs = [(j + rank) % 3 + rank for j in range(4)]  # what rank j sends to this rank

    def fused(group, widths):
        """heads_to_sequence of parts with `widths` heads per rank, and its adjoint."""
        u = group.size()
        shapes = [(3, 2, u * w, 5) for w in widths]
        forward = lambda xs: [collectives.heads_to_sequence(xs, group)]  # noqa: E731
        adjoint = lambda gs: collectives.sequence_to_heads(gs[0], widths, group)  # noqa: E731
        return shapes, forward, adjoint

    def autograd(op, shape):
        """An autograd-aware collective: the adjoint is its backward."""

        def adjoint(gs):
            x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
            op(x).backward(gs[0])
            return [x.grad]

        return [shape], lambda xs: [op(xs[0])], adjoint

    def ring(group):
        """ring_shift_start and its reverse (backward=True), on a [3, 2] block."""

        def shift(xs, backward):
            return ring_shift_start(xs, [torch.empty_like(xs[0])], group, backward).wait()

        return [(3, 2)], lambda xs: shift(xs, False), lambda gs: shift(gs, True)

    cases = {
        "ulysses u2 q,k,v": fused(u2r2.ulysses, (2, 1, 1)),
        "ulysses u4 q,k,v": fused(u4.ulysses, (3, 1, 2)),
        "ulysses u4 out": (
            [(12, 2, 2, 5)],
            lambda xs: collectives.sequence_to_heads(xs[0], (2,), u4.ulysses),
            lambda gs: [collectives.heads_to_sequence(gs, u4.ulysses)],
        ),
        "all_to_all_variable": autograd(
            lambda x: collectives.all_to_all_variable(x, sends, recvs, u2r2.sp), (sum(sends), 3)
        ),
        "all_gather": autograd(lambda x: collectives.all_gather(x, u2r2.sp), (3, 2)),
        "ring_shift r2": ring(u2r2.ring),
        "ring_shift r4": ring(r4.ring),
    }
    gaps = {}
    for name, (shapes, forward, adjoint) in cases.items():
        xs = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes]
        ys = forward(xs)
        gs = [torch.randn(y.shape, generator=gen, dtype=torch.float64) for y in ys]
        xts = adjoint(gs)
        sums = torch.stack(
            [
                sum((y * g).sum() for y, g in zip(ys, gs)),
                sum((x * xt).sum() for x, xt in zip(xs, xts)),
            ]
        ).detach()
        dist.all_reduce(sums)
        gaps[name] = (abs(sums[0] - sums[1]) / abs(sums[0])).item()
    return gaps


def ring_sources() -> dict[str, list[int]]:
    """The ring rank each rank of a ring of 4 receives from: forward (from the previous rank,
    as ring attention's block order assumes) and backward."""
    import torch.distributed as dist

    from longvila_mcore.parallel import groups
    from longvila_mcore.parallel.collectives import ring_shift_start

    ring = groups.new_groups(1, 4).ring
    sources = {}
    for name, backward in (("forward", False), ("backward", True)):
        mine = torch.tensor([float(ring.rank())])
        got = ring_shift_start([mine], [torch.empty_like(mine)], ring, backward).wait()[0]
        every = [torch.empty_like(got) for _ in range(ring.size())]
        dist.all_gather(every, got, group=ring)
        sources[name] = [int(t) for t in every]
    return sources


def host_syncs() -> dict[str, list[str]]:
    """The host syncs of one 2D attention layer's forward and of its backward, after a first
    call with the same boundaries (which builds the cached layout), for packed samples (index
    rows) and for one sample (slices)."""
    from longvila_mcore.parallel import init_sequence_parallel
    from longvila_mcore.runtime.device import count_host_syncs

    sp = init_sequence_parallel(2, 2)
    syncs = {}
    for name, bounds, batch in (("packed", (0, 4, 24, 32, 36, 52), 1), ("single", (0, 32), 2)):
        gen = torch.Generator().manual_seed(5)
        s = bounds[-1] // 4
        q, k, v, dout = (torch.randn(s, batch, h, 8, generator=gen) for h in (4, 2, 2, 4))
        for _ in range(2):  # the second call finds the layout cached
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            with count_host_syncs() as forward:
                out = sp.attention(*leaves, cu_seqlens=bounds)
            with count_host_syncs() as backward:
                out.backward(dout)
        syncs[f"{name} forward"], syncs[f"{name} backward"] = forward, backward
    return syncs


def peak_memory_units() -> dict[str, float]:
    """The largest per-rank peak of one 2 x 2 attention layer's forward and backward (one sample
    of 1024 tokens, head dim 64), in units of one input's bytes (S/N tokens x heads x head dim),
    counted as `bench/sp_attention.py` counts it (its `PeakMemory`: the inputs, the output and
    every tensor alive): with 2 heads and 2 K/V heads (one K/V head per Ulysses rank, a backward
    of one chunk) and with 8 and 8 (4 per rank, a backward of 4 chunks). The least of 3 steps
    (see the test for what varies)."""
    import importlib.util
    from pathlib import Path

    import torch.distributed as dist

    from longvila_mcore.parallel import init_sequence_parallel

    path = Path(__file__).parents[1] / "bench" / "sp_attention.py"
    spec = importlib.util.spec_from_file_location("sp_attention_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sp = init_sequence_parallel(2, 2)
    peaks = {}
    for heads in (2, 8):
        q, k, v, dout = bench._inputs(1024 // sp.size, heads, heads, 64, sp.rank)
        runs = []
        for _ in range(3):
            with bench.PeakMemory(q, k, v, dout) as memory:
                bench.step("2d", sp, q, k, v, dout)
            peak = torch.tensor(memory.peak / q.nbytes)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            runs.append(peak.item())
        peaks[f"{heads} heads"] = min(runs)
    return peaks


def validation_errors() -> dict[str, str]:
    """The ValueError message of each misuse, raised through the public entry points."""
    from longvila_mcore.parallel import init_sequence_parallel

    sp = init_sequence_parallel(2, 2)
    x = torch.zeros(4, 1, 4, 8)
    misuses = {
        "world": lambda: init_sequence_parallel(3, 1),
        "sample": lambda: sp.attention(x, x, x, cu_seqlens=torch.tensor([0, 6, 16])),
        "heads": lambda: sp.attention(x[:, :, :3], x[:, :, :1], x[:, :, :1]),
        "shard": lambda: sp.shard(torch.zeros(18)),
    }
    messages = {}
    for name, misuse in misuses.items():
        try:
            misuse()
        except ValueError as e:
            messages[name] = str(e)
    return messages


def megatron_errors() -> dict[str, float]:
    """CoreAttention (2x2 through Megatron's context-parallel groups) and a Qwen2 decoder built
    with it, against the same modules on the whole sequence on one rank."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.enums import AttnMaskType

    from longvila_mcore.config import LLMConfig, ParallelConfig
    from longvila_mcore.models.qwen2 import Qwen2Model, qwen2_transformer_config
    from longvila_mcore.parallel import init_sequence_parallel
    from longvila_mcore.parallel.core_attention import CoreAttention, PackedSamples
    from longvila_mcore.runtime import init_model_parallel, spec_backend

    init_model_parallel(ParallelConfig(ulysses=2, ring=2))
    sp = init_sequence_parallel(2, 2)  # Megatron's groups
    bounds = (0, 16, 24, 48)
    packed = PackedSamples(boundaries=bounds)
    errors = {}

    llm = LLMConfig(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    config = qwen2_transformer_config(llm)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(48, 2, h, 16, generator=gen) for h in (4, 2, 2))
    single = CoreAttention(config, 1, AttnMaskType.causal, "self", pg_collection=pgs)
    parallel = CoreAttention(
        config, 1, AttnMaskType.causal, "self", pg_collection=pgs, sequence_parallel=True
    )
    expected = single(q, k, v, None, packed_seq_params=packed)
    local = parallel(*(sp.shard(x, 0, bounds) for x in (q, k, v)), None, packed_seq_params=packed)
    errors["core_attention"] = relative_error(sp.gather(local, 0, bounds), expected.double())

    torch.manual_seed(0)
    model = Qwen2Model(llm, config, spec_backend(torch.device("cpu")))
    embeddings = torch.randn(48, 1, llm.hidden_size, generator=gen)
    positions = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])[None]
    g = torch.randn(48, 1, llm.vocab_size, generator=gen)
    logits = model(sp.shard(embeddings, 0, bounds), sp.shard(positions, 1, bounds), packed)
    (logits * sp.shard(g, 0, bounds)).sum().backward()
    sp_logits = sp.gather(logits.detach(), 0, bounds)
    params = [p for p in model.parameters() if p.grad is not None]
    sp_grads = [p.grad.clone() for p in params]
    for grad in sp_grads:
        dist.all_reduce(grad, group=sp.groups.sp)
    model.zero_grad()
    for layer in model.decoder.layers:  # the same weights, attention on the whole sequence
        layer.self_attention.core_attention.sp = None
    ref_logits = model(embeddings, positions, packed)
    (ref_logits * g).sum().backward()
    errors["decoder logits"] = relative_error(sp_logits, ref_logits.double())
    errors["decoder grads"] = max(
        relative_error(ours, p.grad.double()) for ours, p in zip(sp_grads, params)
    )
    return errors


def _world4():
    heads = {layout: [(4, 2), (4, 1)] for layout in ((1, 4), (4, 1), (2, 2))}
    heads[2, 2].append((8, 4))  # 2 K/V heads per Ulysses rank: a backward of 2 chunks
    heads[4, 1].append((12, 6))  # U = 4 neither divides nor is divided by 6 K/V heads
    # Samples of 2R, not 2N, tokens: 4 + 20 + 8 + 4 + 16 = 52 = 13 x N on 2 x 2; 12 on 1 x 4 / 4 x 1
    asymmetric = {(2, 2): [(4, 2)], (4, 1): [(4, 1)]}
    return {
        "attention": attention_cases(heads, (0, 16, 24, 48), (0, 32)),
        "asymmetric": attention_cases(asymmetric, (0, 4, 24, 32, 36, 52), (0, 12))
        | attention_cases({(1, 4): [(4, 2)]}, (0, 8, 32, 40, 48), (0, 24)),
        "adjoint": adjoint_gaps(),
        "ring_sources": ring_sources(),
        "syncs": host_syncs(),
        "memory": peak_memory_units(),
        "validation": validation_errors(),
        "megatron": megatron_errors(),
    }


def _world6():
    heads = {(2, 3): [(4, 2), (4, 1)], (3, 2): [(6, 2), (12, 4)]}  # 12/4 over U = 3: 2 of 4
    return {
        "attention": attention_cases(heads, (0, 24, 36, 72), (0, 48)),
        # 2R per sample, N for the pack: 6 + 18 + 18 on 2 x 3; 4 + 12 + 8 + 12 on 3 x 2
        "asymmetric": attention_cases({(2, 3): [(4, 2)]}, (0, 6, 24, 42), (0, 18))
        | attention_cases({(3, 2): [(6, 2)]}, (0, 4, 16, 24, 36), (0, 12)),
    }


@pytest.fixture(scope="module")
def world4():
    return run_ranks(4, _world4)


@pytest.mark.slow
def test_attention_matches_float64_reference_on_4_ranks(world4):
    errors = world4["attention"]
    assert len(errors) == 16
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
def test_samples_padded_to_2r_match_float64_reference_on_4_ranks(world4):
    errors = world4["asymmetric"]
    assert len(errors) == 6
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
def test_attention_matches_float64_reference_on_6_ranks():
    results = run_ranks(6, _world6)
    assert len(results["attention"]) == 8 and len(results["asymmetric"]) == 4
    for errors in results.values():
        assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.slow
def test_no_host_syncs_in_an_attention_layer(world4):
    syncs = world4["syncs"]
    assert len(syncs) == 4
    assert all(calls == [] for calls in syncs.values()), syncs


@pytest.mark.slow
def test_ring_backward_peak_memory(world4):
    """One chunk (2 heads), 15 units at the backward's peak: the inputs and output (5), the
    received q, k, v, out (4) and dout (1), dQ (1) and the dK/dV sums sent and received (4)
    (docs/mm_sp.md); 17.5 with the own block's gradients computed first. Four chunks (8 heads),
    10.5 units: the inputs and output (5) and the gradients (3) of the whole layer and the
    all-to-all of one chunk's q, k, v, out and dout, its send and receive buffers (2 x 5/4);
    up to 2 more at random when buffers of the previous chunk are still referenced from outside
    Python (no Python object refers to them): its gradients' all-to-all buffers, which gloo's
    worker thread drops after the transfer has completed (late on a busy machine), or its ring
    inputs (not traced further); 14.5 and more when the forward's received tensors are held
    for the backward as with one chunk."""
    peaks = world4["memory"]
    assert peaks["2 heads"] <= 15.1, peaks
    assert peaks["8 heads"] <= 12.6, peaks


@pytest.mark.slow
def test_collectives_backward_is_adjoint(world4):
    gaps = world4["adjoint"]
    assert max(gaps.values()) <= 1e-12, gaps


@pytest.mark.slow
def test_ring_shift_receives_from_the_previous_rank(world4):
    """Rank r receives rank r - 1's block (rank r + 1's going backward): ring attention's
    block bookkeeping depends on the direction, which the adjoint test cannot see."""
    assert world4["ring_sources"] == {"forward": [3, 0, 1, 2], "backward": [1, 2, 3, 0]}


@pytest.mark.slow
def test_validation_errors_name_the_fix(world4):
    messages = world4["validation"]
    assert "does not divide the world size 4" in messages["world"]
    assert "sample 0 has length 6" in messages["sample"]
    assert "multiple of 2 x ring = 4" in messages["sample"]
    assert "not divisible by ulysses=2" in messages["heads"]
    assert "multiple of 2 x ring = 4" in messages["shard"]


@pytest.mark.slow
def test_megatron_core_attention_and_decoder_match_one_rank(world4):
    errors = world4["megatron"]
    assert max(errors.values()) <= TOLERANCE, errors


def test_shard_order_is_ring_zigzag_then_contiguous():
    from longvila_mcore.parallel.attention_2d import zigzag_order

    bounds, ring = (0, 16, 24, 48), 2
    order = zigzag_order(bounds, ring)
    assert sorted(order.tolist()) == list(range(48))
    # Ring rank r's sequence: chunks r and 2R-1-r (of 2R) of every sample, sample after sample.
    ring0, ring1 = order[:24].tolist(), order[24:].tolist()
    assert ring0 == [*range(0, 4), *range(12, 16), 16, 17, 22, 23, *range(24, 30), *range(42, 48)]
    assert ring1 == [*range(4, 12), *range(18, 22), *range(30, 42)]


def test_each_ulysses_rank_receives_the_distinct_kv_heads_of_its_query_heads():
    """Following the plan's indices (select, all-to-all, local expand) gives every local query
    head its own K/V head under grouped-query attention's local mapping, and a rank receives no
    more heads than the most any rank's query heads use (lcm(hkv, U) / U before)."""
    from longvila_mcore.parallel.attention_2d import kv_head_plan

    cpu = torch.device("cpu")
    # (hq, hkv, U, heads each rank receives): U | hkv, hkv | U, and neither (12/4/3, 12/6/4)
    cases = [(4, 2, 4, 1), (4, 1, 2, 1), (6, 2, 3, 2), (8, 4, 2, 2), (12, 2, 4, 1)]
    cases += [(12, 4, 3, 2), (12, 6, 4, 2), (24, 4, 6, 2)]
    for hq, hkv, ulysses, width in cases:
        per_rank_q = hq // ulysses
        for rank in range(ulysses):
            plan = kv_head_plan(hq, hkv, ulysses, rank, cpu)
            assert plan.width == width, (hq, hkv, ulysses)
            sent = torch.arange(hkv) if plan.send is None else plan.send
            received = sent.view(ulysses, plan.width)[rank]
            local = received if plan.local is None else received[plan.local]
            assert per_rank_q % len(local) == 0
            needed = {(rank * per_rank_q + i) // (hq // hkv) for i in range(per_rank_q)}
            assert set(received.tolist()) == needed, (hq, hkv, ulysses, rank)
            for i in range(per_rank_q):
                kv_head = local[i // (per_rank_q // len(local))]
                assert kv_head == (rank * per_rank_q + i) // (hq // hkv), (hq, hkv, ulysses, rank)


def test_layout_errors_before_any_group_exists():
    from longvila_mcore.parallel.attention_2d import check_heads, sample_boundaries
    from longvila_mcore.parallel.groups import check_layout

    with pytest.raises(ValueError, match="does not divide the world size 6"):
        check_layout(2, 2, 6)
    with pytest.raises(ValueError, match="not divisible by ulysses=4"):
        check_heads(6, 4)
    with pytest.raises(ValueError, match=r"sample 1 has length 14.*multiple of 2 x ring = 4"):
        sample_boundaries([0, 16, 30, 36], 36, 2, 2)
    with pytest.raises(ValueError, match="pack has 36 tokens.*multiple of 8"):
        sample_boundaries([0, 16, 28, 36], 36, 4, 2)
    with pytest.raises(ValueError, match="must run from 0 to the sequence length 40"):
        sample_boundaries([0, 16, 32], 40, 2, 2)
    # 2R per sample and N for the pack are enough: 12 = 3 x 2R, 36 = 9 x N (not 2N per sample)
    assert sample_boundaries([0, 12, 36], 36, 2, 2) == (0, 12, 36)


def test_one_rank_is_plain_causal_attention(single_rank):
    from longvila_mcore.parallel import init_sequence_parallel

    sp = init_sequence_parallel(1, 1)
    bounds = (0, 5, 16)  # one rank takes any sample lengths
    errors = attention_errors(sp, hq=4, hkv=2, bounds=bounds, batch=2)
    assert max(errors.values()) <= TOLERANCE, errors
    x = torch.randn(16, 3)
    assert torch.equal(sp.shard(x, 0, bounds), x)
    assert torch.equal(sp.gather(x, 0, bounds), x)
