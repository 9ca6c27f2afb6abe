"""Packing samples into micro-batches: boundaries, padding, positions, limits."""

import dataclasses

import pytest
import torch

from longvila_mcore.data.batch import IGNORE_INDEX
from longvila_mcore.data.media import PreparedFrames
from longvila_mcore.data.packing import collate, pack, padding_multiples, plan_micro_batches
from longvila_mcore.data.samples import Sample

PAD = 0


def sample(length: int, frames: int = 0, tokens_per_frame: int = 2) -> Sample:
    """Ids 100 + i; the first frames * (tokens_per_frame + 1) positions are frame tokens + "\\n"."""
    media = torch.full((length,), -1)
    for f in range(frames):
        start = f * (tokens_per_frame + 1)
        media[start : start + tokens_per_frame] = (
            torch.arange(tokens_per_frame) + f * tokens_per_frame
        )
    labels = torch.arange(length) + 101
    labels[-1] = IGNORE_INDEX
    return Sample(
        key=f"s{length}",
        input_ids=torch.arange(length) + 100,
        media_index=media,
        labels=labels,
        frames=torch.full((frames, 3, 2, 2), float(length)),
    )


def test_pack_pads_each_sample_and_restarts_positions():
    batch = pack([sample(5, frames=1), sample(6, frames=2)], PAD, pad_multiple=4)
    assert batch.cu_seqlens.tolist() == [0, 8, 16]
    assert batch.input_ids.tolist() == [*range(100, 105), PAD, PAD, PAD, *range(100, 106), PAD, PAD]
    assert batch.position_ids.tolist() == [*range(8), *range(8)]  # continuing through the pad
    assert batch.labels[5:8].tolist() == [IGNORE_INDEX] * 3
    assert batch.labels[4] == IGNORE_INDEX and batch.labels[13] == IGNORE_INDEX
    # The second sample's frames follow the first's in `frames` and in `media_index`.
    assert batch.media_index.tolist() == [0, 1, -1, -1, -1, -1, -1, -1,
                                          2, 3, -1, 4, 5, -1, -1, -1]  # fmt: skip
    assert batch.frames[:, 0, 0, 0].tolist() == [5.0, 6.0, 6.0]
    assert all(t.dtype == torch.int64 for t in (batch.input_ids, batch.cu_seqlens, batch.labels))


def test_collate_respects_max_length_and_micro_batch_size():
    lengths = [5, 9, 3, 7, 16, 1, 1, 1, 1]  # padded to 8, 12, 4, 8, 16, 4, 4, 4, 4
    groups = plan_micro_batches(
        [-(-n // 4) * 4 for n in lengths], micro_batch_size=3, max_length=20
    )
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7, 8]]
    batches = collate(
        [sample(n) for n in lengths], micro_batch_size=3, max_length=20, pad_id=PAD, pad_multiple=4
    )
    assert [b.cu_seqlens.tolist() for b in batches] == [
        [0, 8, 20], [0, 4, 12], [0, 16, 20], [0, 4, 8, 12]
    ]  # fmt: skip
    assert all(len(b.input_ids) <= 20 and len(b.input_ids) % 4 == 0 for b in batches)
    assert all(b.frames.shape == (0, 3, 2, 2) for b in batches)
    with pytest.raises(ValueError, match="max_length"):
        plan_micro_batches([24], micro_batch_size=1, max_length=20)


def test_most_frames_is_the_longest_sample_not_the_pack():
    batch = pack(
        [sample(10, frames=3), sample(4), sample(20, frames=5), sample(9, frames=2)], PAD, 4
    )
    assert batch.frames.shape[0] == 10 and batch.most_frames() == 5
    three = pack([sample(20, frames=5, tokens_per_frame=3)], PAD, 4)  # another tokens_per_frame
    assert three.most_frames() == 5
    assert pack([sample(7), sample(5)], PAD, 4).most_frames() == 0


@pytest.mark.parametrize("size", [2, 3, 4, 5, 8])
def test_each_sequence_parallel_rank_gets_the_layout_and_only_its_frames(size):
    """5 frames over 2, 3, 4 (N does not divide F), 5 (F = N) and 8 (F < N) ranks: every rank's
    pack has the whole pack's integer layout and exactly its block of the frames."""
    samples = [sample(10, frames=3), sample(4), sample(9, frames=2)]
    for s in samples:  # distinct frames
        s.frames = [PreparedFrames(torch.randn(s.num_frames, 3, 2, 2))]
    whole = pack(samples, PAD, 4)
    assert whole.num_frames == 5 and whole.frame_offset == 0
    per = -(-5 // size)
    held = []
    for rank in range(size):
        ours = pack(samples, PAD, 4, sp_rank=rank, sp_size=size)
        for name in ("input_ids", "media_index", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(getattr(ours, name), getattr(whole, name)), name
        start = min(rank * per, 5)
        assert ours.num_frames == 5 and ours.frame_offset == start
        assert torch.equal(ours.frames, whole.frames[start : start + per])
        assert ours.frames.shape[1:] == (3, 2, 2)  # an empty block keeps the frame shape
        assert torch.equal(whole.frames_of(rank, size).frames, ours.frames)
        held.append(len(ours.frames))
        assert ours.most_frames() == whole.most_frames() == 3
    assert sum(held) == 5  # no frame twice in the group


def test_a_batch_must_hold_the_frames_it_claims():
    batch = pack([sample(10, frames=3)], PAD, 4, sp_rank=1, sp_size=2)
    with pytest.raises(
        ValueError, match="rank 0 of 2 encodes frames 0:2, but this batch holds 2:3"
    ):
        batch.frames_of(0, 2)
    with pytest.raises(ValueError, match="not among the pack's num_frames=2"):
        dataclasses.replace(batch, num_frames=2)


@pytest.mark.parametrize("ulysses, ring", [(1, 1), (4, 1), (1, 4), (2, 2), (8, 4), (3, 2)])
def test_samples_padded_to_2r_and_the_pack_to_n_are_what_the_attention_accepts(ulysses, ring):
    """Each sample to 2R (1 without a ring), the last one further so the pack is a multiple of N:
    the 2D attention's own check takes the boundaries, and no sample carries a whole 2R of
    padding more than it needs except the last, which carries less than the pack multiple."""
    from longvila_mcore.parallel.attention_2d import sample_boundaries

    sample_multiple, pack_multiple = padding_multiples(ulysses, ring)
    assert sample_multiple == (2 * ring if ring > 1 else 1)
    assert pack_multiple % (ulysses * ring) == 0 and pack_multiple % sample_multiple == 0
    lengths = [5, 9, 3, 17, 1]
    batch = pack([sample(n) for n in lengths], PAD, sample_multiple, pack_multiple=pack_multiple)
    bounds = tuple(batch.cu_seqlens.tolist())
    assert sample_boundaries(bounds, len(batch.input_ids), ulysses, ring) == bounds
    padded = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    for n, p in zip(lengths[:-1], padded[:-1]):
        assert 0 <= p - n < sample_multiple
    assert 0 <= padded[-1] - lengths[-1] < sample_multiple + pack_multiple
    assert len(batch.input_ids) % pack_multiple == 0
    assert batch.position_ids[bounds[-2] :].tolist() == list(range(padded[-1]))
    assert (batch.labels[bounds[-2] + lengths[-1] :] == IGNORE_INDEX).all()
    old = sum(-(-n // (2 * ulysses * ring)) * 2 * ulysses * ring for n in lengths)
    assert len(batch.input_ids) <= old  # never more than every sample to 2N
    with pytest.raises(ValueError, match="pack_multiple=6 must be a multiple of pad_multiple=4"):
        pack([sample(5)], PAD, 4, pack_multiple=6)
