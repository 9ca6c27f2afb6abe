"""Image-first sharder against the single-process splice, with a toy tower and embedding.

5 frames over 4 ranks (N does not divide F): the gathered embeddings and the gradients of the
toy encoder and embedding match the single-process ones; each rank encodes at most ceil(F/N)
frames; the per-rank buffers hold S/N tokens, not S.
"""

import pytest
import torch

from tests.multiproc import run_ranks

TOLERANCE = 1e-5
HIDDEN, TOKENS_PER_FRAME, VOCAB, PLACEHOLDER = 8, 4, 32, 31


def toy_batch(extra_text: int, seed: int = 0):
    """Two packed samples; frames 0-2 in the first, frames 3 and 4 interleaved with text in the
    second. `extra_text` more text tokens per sample keep the frames and grow S."""
    gen = torch.Generator().manual_seed(seed)
    tpf = TOKENS_PER_FRAME
    media = [
        [-1] * 3 + list(range(0, 3 * tpf)) + [-1] * (9 + extra_text),
        [-1] * 2
        + list(range(3 * tpf, 4 * tpf))
        + [-1] * 2
        + list(range(4 * tpf, 5 * tpf))
        + [-1] * (4 + extra_text),
    ]
    media_index = torch.tensor(media[0] + media[1])
    input_ids = torch.randint(0, PLACEHOLDER, media_index.shape, generator=gen)
    input_ids[media_index >= 0] = PLACEHOLDER
    cu_seqlens = torch.tensor([0, len(media[0]), len(media[0]) + len(media[1])])
    frames = torch.randn(5, 3, 4, 4, generator=gen)
    return input_ids, media_index, frames, cu_seqlens


class ToyEncoder(torch.nn.Module):
    """A Linear from a frame's pixels to its tokens; remembers how many frames each call got."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 4 * 4, TOKENS_PER_FRAME * HIDDEN)
        self.calls: list[int] = []

    def forward(self, frames):
        self.calls.append(frames.shape[0])
        return self.linear(frames.flatten(1)).view(-1, TOKENS_PER_FRAME, HIDDEN)


def toy_modules():
    torch.manual_seed(1)
    return ToyEncoder(), torch.nn.Embedding(VOCAB, HIDDEN)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def single_process(input_ids, media_index, frames, target):
    """Embeddings spliced on the whole sequence, and the gradients of sum(embeddings * target)."""
    encoder, embedding = toy_modules()
    embeddings = embedding(input_ids)
    is_media = media_index >= 0
    features = encoder(frames).flatten(0, 1)
    embeddings = embeddings.masked_scatter(is_media[:, None], features[media_index[is_media]])
    (embeddings * target).sum().backward()
    return embeddings.detach(), [p.grad for m in (encoder, embedding) for p in m.parameters()]


def sharder_results(ulysses: int, ring: int) -> dict[str, float]:
    """Errors against the single-process splice and the sizes of the per-rank buffers (max over
    ranks), for two sequence lengths with the same frames."""
    import torch.distributed as dist

    from longvila_mcore.parallel import ImageFirstSharder, init_sequence_parallel
    from longvila_mcore.parallel.collectives import count_communication

    sp = init_sequence_parallel(ulysses, ring)
    sharder = ImageFirstSharder(sp)
    results = {}
    for extra_text in (0, 16):
        input_ids, media_index, frames, cu = toy_batch(extra_text)
        total = input_ids.shape[0]
        target = torch.randn(total, HIDDEN, generator=torch.Generator().manual_seed(2))
        expected, expected_grads = single_process(input_ids, media_index, frames, target)
        encoder, embedding = toy_modules()
        embedded_ids = []

        def embed_tokens(ids, embedding=embedding, embedded_ids=embedded_ids):
            embedded_ids.append(ids.numel())
            return embedding(ids)

        with count_communication() as counter:
            local = sharder.embed(
                input_ids, media_index, frames, encoder, embed_tokens, TOKENS_PER_FRAME, cu
            )
        (local * sp.shard(target, 0, cu)).sum().backward()
        grads = [p.grad for m in (encoder, embedding) for p in m.parameters()]
        for grad in grads:
            dist.all_reduce(grad, group=sp.groups.sp)
        row_bytes = HIDDEN * local.element_size()
        sizes = torch.tensor(
            [
                local.shape[0],
                sum(embedded_ids),
                counter.received["all_to_all_variable"] // row_bytes,
                max(encoder.calls),
                len(encoder.calls),
                sharder.frame_slice(5).stop - sharder.frame_slice(5).start,
            ]
        )
        real_frames = sizes[-1:].clone()
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=sp.groups.sp)
        dist.all_reduce(real_frames, group=sp.groups.sp)
        names = ("rows", "embedded_ids", "received_rows", "frames_per_call", "calls")
        results[total] = dict(zip(names, sizes.tolist()))
        results[total]["frames_encoded"] = int(real_frames)
        results[total]["embeddings"] = relative_error(sp.gather(local.detach(), 0, cu), expected)
        results[total]["grads"] = max(map(relative_error, grads, expected_grads))
    return results


def text_only_error(ulysses: int, ring: int) -> float:
    """A batch without frames: text embedded locally, nothing encoded."""
    from longvila_mcore.parallel import ImageFirstSharder, init_sequence_parallel

    sp = init_sequence_parallel(ulysses, ring)
    input_ids, _, _, cu = toy_batch(0)
    encoder, embedding = toy_modules()
    local = ImageFirstSharder(sp).embed(
        input_ids,
        torch.full_like(input_ids, -1),
        torch.zeros(0, 3, 4, 4),
        encoder,
        embedding,
        TOKENS_PER_FRAME,
        cu,
    )
    assert encoder.calls == []
    expected = embedding(input_ids)
    return ((sp.gather(local.detach(), 0, cu) - expected).abs().max()).item()


def _world4():
    return {"results": sharder_results(2, 2), "text_only": text_only_error(2, 2)}


def check(results, sp_size):
    for total, r in results.items():
        assert r["embeddings"] <= TOLERANCE and r["grads"] <= TOLERANCE, r
        assert r["frames_encoded"] == 5, r  # every frame once, none truncated
        assert r["frames_per_call"] == -(-5 // sp_size) and r["calls"] == 1, r
        # Token buffers hold this rank's S/N tokens, never the whole sequence.
        assert r["rows"] == total // sp_size, r
        assert r["embedded_ids"] <= total // sp_size, r
        assert r["received_rows"] <= total // sp_size, r


@pytest.mark.slow
def test_sharder_matches_single_process_on_2x2():
    out = run_ranks(4, _world4)
    check(out["results"], 4)
    # The same frames for 40 and 72 tokens: only the S/N token buffers grew.
    small, large = out["results"][40], out["results"][72]
    assert (small["rows"], large["rows"]) == (10, 18)
    assert out["text_only"] == 0.0


def test_sharder_on_one_rank_is_the_plain_splice(single_rank):
    check(sharder_results(1, 1), 1)
    assert text_only_error(1, 1) == 0.0
