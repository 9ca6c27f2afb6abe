"""The training pipeline: deterministic stream, data-parallel split, resume, skipped samples."""

import json
import logging
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import webdataset as wds
from transformers import AutoTokenizer

from longvila_mcore.config import DataConfig, ModelConfig
from longvila_mcore.data import pipeline as pipeline_module
from longvila_mcore.data.pipeline import build_pipeline
from longvila_mcore.data.stream import expand_shards, index_shard
from longvila_mcore.data.synthetic import generate_synthetic
from longvila_mcore.errors import DataError

MODEL = ModelConfig()  # tiny tower: 28 px, one token a frame


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = generate_synthetic(root / "syn", num_frames=16, samples=24, shards=2, text_length=64)
    broken = root / "broken.tar"
    write_broken_shard(broken, expand_shards(paths.shards["conversation"])[0])
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer_dir)
    return paths.shards, str(broken), tokenizer


def write_broken_shard(path, good_shard: str) -> None:
    """Test-only: five good conversation samples with four broken ones between them."""
    good = [ref.read() for ref in index_shard(good_shard)]
    video = next(files for files in good if "mp4" in files)
    image = next(files for files in good if "jpg" in files)
    two_placeholders = [
        {"from": "human", "value": "<video>\n<video>\nWhat?"},
        {"from": "gpt", "value": "red"},
    ]
    broken = [
        {"json": video["json"], "mp4": video["mp4"][: len(video["mp4"]) // 2]},  # truncated mp4
        {"json": b'{"caption": "no conversation here"}', "mp4": video["mp4"]},
        {"json": json.dumps({"conversations": two_placeholders}).encode(), "mp4": video["mp4"]},
        {"json": image["json"], "jpg": b"\xff\xd8 not really a jpeg"},
    ]
    with wds.TarWriter(str(path), encoder=False) as writer:
        for i in range(5):
            writer.write({"__key__": f"good-{i}", **good[i]})
            if i < len(broken):
                writer.write({"__key__": f"broken-{i}", **broken[i]})


def make(dataset, kind="conversation", *, pattern=None, shuffle_buffer=8, num_workers=0,
         video_resize="rgb", **kw):  # fmt: skip
    shards, _, tokenizer = dataset
    data = DataConfig(name="test", **shards, shuffle_buffer=shuffle_buffer,
                      num_workers=num_workers, video_resize=video_resize)  # fmt: skip
    if pattern:
        setattr(data, kind, pattern)
    args = dict(num_frames=16, fps=None, max_length=256, global_batch_size=4, micro_batch_size=2,
                pad_multiple=4, dp_rank=0, dp_size=1, seed=0)  # fmt: skip
    return build_pipeline(data, kind, tokenizer, MODEL, **(args | kw))


def samples_of(step) -> list[tuple]:
    """Each packed sample as (ids, frames), in order."""
    out = []
    for batch in step:
        bounds = batch.cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            media = batch.media_index[start:end]
            frames = media[media >= 0] // MODEL.tokens_per_frame
            frame_bytes = batch.frames[frames.unique()].numpy().tobytes() if len(frames) else b""
            out.append((tuple(batch.input_ids[start:end].tolist()), hash(frame_bytes)))
    return out


def run(pipeline, steps: int) -> list[list[tuple]]:
    return [samples_of(next(pipeline)) for _ in range(steps)]


def test_data_video_resize_picks_how_frames_are_resized(dataset):
    rgb, yuv = (next(make(dataset, video_resize=resize)) for resize in ("rgb", "yuv"))
    assert [b.input_ids.tolist() for b in rgb] == [b.input_ids.tolist() for b in yuv]
    frames_rgb, frames_yuv = (torch.cat([b.frames for b in step]) for step in (rgb, yuv))
    assert len(frames_rgb) > 1  # the step holds a video
    difference = (frames_rgb - frames_yuv).abs()
    assert 0 < difference.max() < 1 and difference.mean() < 0.05  # tests/test_data_vila_frames.py
    with pytest.raises(ValueError, match="video_resize='area'"):
        make(dataset, video_resize="area")


def test_same_seed_same_stream_whatever_the_workers(dataset):
    reference = run(make(dataset, seed=3), 4)
    assert run(make(dataset, seed=3, num_workers=2), 4) == reference
    assert run(make(dataset, seed=4), 4) != reference
    assert all(len(step) == 4 for step in reference)


def test_data_parallel_ranks_split_each_step(dataset):
    # 6 steps of 8 caption samples: 48 samples, two epochs of the 24.
    single = run(make(dataset, "caption", global_batch_size=8, micro_batch_size=3), 6)
    ranks = [
        run(make(dataset, "caption", global_batch_size=8, dp_rank=r, dp_size=2), 6) for r in (0, 1)
    ]
    for step, rank0, rank1 in zip(single, *ranks, strict=True):
        assert rank0 == step[0::2] and rank1 == step[1::2]
    assert len({s for step in single[:3] for s in step}) == 24  # every sample once per epoch
    with pytest.raises(ValueError, match="global_batch_size=6"):
        make(dataset, global_batch_size=6, dp_size=4)


def count_builds(pipeline) -> list:
    calls = []
    build = pipeline.builder.build
    pipeline.builder.build = lambda kind, key, files: calls.append(key) or build(kind, key, files)
    return calls


def test_resume_continues_the_stream_without_decoding_the_past(dataset):
    _, broken, _ = dataset
    shards = dataset[0]["conversation"] + "::" + broken  # skips and an epoch boundary
    uninterrupted = make(dataset, pattern=shards, dp_rank=1, dp_size=2, global_batch_size=6)
    run(uninterrupted, 3)
    state = uninterrupted.state_dict()
    calls = count_builds(uninterrupted)
    expected = run(uninterrupted, 5)
    assert sum(uninterrupted.skipped.values()) > 0 and state["epoch"] == 0

    resumed = make(dataset, pattern=shards, dp_rank=1, dp_size=2, global_batch_size=6)
    resumed.load_state_dict(state)
    resumed_calls = count_builds(resumed)
    assert run(resumed, 5) == expected
    assert resumed.skipped == uninterrupted.skipped
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed_calls == calls  # nothing before the saved position was decoded again
    with pytest.raises(ValueError, match="dp_size"):
        make(dataset, pattern=shards).load_state_dict(state)


def test_bad_samples_are_skipped_counted_and_replaced(dataset, caplog):
    _, broken, _ = dataset
    pipeline = make(
        dataset,
        pattern=broken,
        shuffle_buffer=0,
        max_length=1024,
        global_batch_size=5,
        micro_batch_size=5,
    )
    with caplog.at_level(logging.WARNING):
        (batch,) = next(pipeline)
    assert len(batch.cu_seqlens) == 6  # five samples: the batch keeps its size
    assert pipeline.skipped == {
        "corrupt_media": 2,
        "bad_conversation": 2,
        "malformed": 0,
        "too_long": 0,
    }
    assert "broken.tar/broken-0: cannot decode video" in caplog.text


def test_too_long_samples_are_skipped_with_a_warning(dataset, caplog):
    # Images take ~40 positions, 16-frame videos 60-100 (two positions a frame).
    pipeline = make(dataset, max_length=64, global_batch_size=8, micro_batch_size=8)
    with caplog.at_level(logging.WARNING):
        step = next(pipeline)
    assert sum(len(b.cu_seqlens) - 1 for b in step) == 8
    assert all(len(b.input_ids) <= 64 for b in step)
    assert pipeline.skipped["too_long"] > 0
    assert "positions, more than max_length=64" in caplog.text and "conversation-0" in caplog.text


def test_all_unusable_stops_with_a_clear_error(dataset, monkeypatch):
    monkeypatch.setattr(pipeline_module, "MAX_SKIPS_IN_A_ROW", 30)
    with pytest.raises(DataError, match="30 samples in a row"):
        next(make(dataset, "text", max_length=32))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unusable_data_stops_when_its_step_is_due(dataset, monkeypatch, num_workers):
    """With workers the next step is laid out early: its data error is raised only when that
    step is asked for, after the current one was returned."""
    pipeline = make(dataset, "text", max_length=512, num_workers=num_workers)
    calls = 0
    real = pipeline._next_samples

    def second_fails():
        nonlocal calls
        calls += 1
        if calls == 2:
            raise DataError("30 samples in a row were unusable")
        return real()

    monkeypatch.setattr(pipeline, "_next_samples", second_fails)
    assert sum(len(b.cu_seqlens) - 1 for b in next(pipeline)) == 4
    with pytest.raises(DataError, match="in a row"):
        next(pipeline)
    pipeline.close()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(max_length=250), "max_length=250 must be a positive multiple of 4"),
        (dict(micro_batch_size=0), "micro_batch_size"),
        (dict(dp_rank=2, dp_size=2), "rank 2 of 2"),
        (dict(kind="video"), "unknown sample kind"),
        (dict(pattern="/nonexistent/x-{000..001}.tar"), "matches no file"),
    ],
)
def test_bad_settings_are_named(dataset, overrides, match):
    with pytest.raises(ValueError, match=match):
        make(dataset, **overrides)


def test_every_kind_builds_batches(dataset):
    for kind in ("caption", "interleaved", "conversation", "text"):
        step = next(make(dataset, kind, max_length=512))
        assert sum(len(b.cu_seqlens) - 1 for b in step) == 4
        for batch in step:
            assert len(batch.input_ids) % 4 == 0 and batch.num_targets > 0
            media = batch.media_index[batch.media_index >= 0]
            assert torch.equal(
                media.sort().values, torch.arange(len(batch.frames))
            )  # 1 token a frame


def test_damaged_shard_gives_the_samples_before_the_damage(dataset, tmp_path, caplog):
    shard = expand_shards(dataset[0]["caption"])[0]
    data = Path(shard).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    whole = [ref.key for ref in index_shard(shard)]
    with caplog.at_level(logging.WARNING):
        part = [ref.key for ref in index_shard(str(cut))]
    assert 0 < len(part) < len(whole) and part == whole[: len(part)]
    assert "cut.tar is damaged at sample" in caplog.text


def test_sequence_parallel_ranks_decode_and_hold_only_their_frames(dataset, monkeypatch):
    """Packs of one sample, videos of 3 frames and single images, over 2 (N does not divide F),
    3 (F = N) and 4 ranks (F < N): each rank gets the full-decode pipeline's layout, its block
    of the frames bit for bit, and decodes exactly those frames."""
    from longvila_mcore.data import media as media_module

    decoded = []
    load = media_module.VideoFrames.load

    def counted(self, start, stop):
        decoded.append(stop - start)
        return load(self, start, stop)

    monkeypatch.setattr(media_module.VideoFrames, "load", counted)
    kw = dict(num_frames=3, micro_batch_size=1, global_batch_size=6)
    full_pipeline = make(dataset, **kw)
    whole = [b for _ in range(2) for b in next(full_pipeline)]
    whole_decoded, decoded[:] = sum(decoded), []
    assert {b.num_frames for b in whole} == {1, 3}  # images and videos
    for size in (2, 3, 4):
        held = torch.zeros(len(whole), dtype=torch.int64)
        for rank in range(size):
            pipeline = make(dataset, sp_rank=rank, sp_size=size, **kw)
            ours = [b for _ in range(2) for b in next(pipeline)]
            for i, (mine, full) in enumerate(zip(ours, whole, strict=True)):
                for name in ("input_ids", "media_index", "labels", "position_ids", "cu_seqlens"):
                    assert torch.equal(getattr(mine, name), getattr(full, name)), name
                expected = full.frames_of(rank, size)
                assert mine.num_frames == full.num_frames
                assert mine.frame_offset == expected.frame_offset
                assert torch.equal(mine.frames, expected.frames)
                held[i] += len(mine.frames)
        assert held.tolist() == [b.num_frames for b in whole]  # each frame on one rank
        assert sum(decoded) == whole_decoded  # the group decodes each video frame once
        decoded[:] = []
    with pytest.raises(ValueError, match="sequence-parallel rank 4 of 4"):
        make(dataset, sp_rank=4, sp_size=4)


def test_workers_decode_the_next_step_ahead_without_moving_the_saved_position(dataset):
    """With workers the next step's frames are decoded while this one trains, but the position
    and skip counts saved are those of the steps returned, as without workers."""
    _, broken, _ = dataset
    shards = broken + "::" + dataset[0]["conversation"]
    kw = dict(pattern=shards, global_batch_size=3, micro_batch_size=1, shuffle_buffer=0)
    inline, ahead = make(dataset, **kw), make(dataset, num_workers=2, **kw)
    for _ in range(4):
        assert samples_of(next(ahead)) == samples_of(next(inline))
        assert ahead.state_dict() == inline.state_dict()
        assert isinstance(ahead._ahead[0], Future) and inline._ahead is None
    assert sum(ahead.skipped.values()) > 0
    resumed = make(dataset, num_workers=2, **kw)
    resumed.load_state_dict(ahead.state_dict())
    assert samples_of(next(resumed)) == samples_of(next(inline))
    ahead.close()
    assert ahead._ahead is None
