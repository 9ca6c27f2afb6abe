"""Video and image decoding: which frames are sampled, and their preprocessing."""

import io

import av
import numpy as np
import pytest
import torch
from PIL import Image

from longvila_mcore.config import VisionConfig
from longvila_mcore.data.media import (
    MediaError,
    fps_indices,
    load_image,
    load_video,
    probe_video,
    uniform_indices,
)
from longvila_mcore.data.synthetic import encode_video

VISION = VisionConfig(image_size=28)


def lossless_video(frames: np.ndarray, rate: int, container: str = "matroska") -> bytes:
    """FFV1 in RGB: decoded pixels equal the written ones."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream("ffv1", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


def counting_video(n: int, rate: int = 10) -> bytes:
    """Frame i is flat grey 4 * i, so a decoded frame tells its index."""
    levels = (4 * np.arange(n)).astype(np.uint8)
    return lossless_video(np.broadcast_to(levels[:, None, None, None], (n, 32, 32, 3)).copy(), rate)


def decoded_indices(frames: torch.Tensor) -> list[int]:
    grey = frames[:, 0] * 0.5 + 0.5  # undo mean/std 0.5
    assert torch.allclose(grey, grey[:, :1, :1].expand_as(grey), atol=1 / 255)
    return (grey[:, 0, 0] * 255 / 4).round().int().tolist()


def test_uniform_sampling_picks_linspace_frames(tmp_path):
    path = tmp_path / "count.mkv"  # matroska stores no frame count: exercises the packet count
    path.write_bytes(counting_video(60))
    frames = load_video(path, 8, VISION)
    assert frames.shape == (8, 3, 28, 28) and frames.dtype == torch.float32
    expected = np.round(np.linspace(0, 59, 8)).astype(int).tolist()
    assert expected == [0, 8, 17, 25, 34, 42, 51, 59]
    assert decoded_indices(frames) == expected
    assert decoded_indices(load_video(path.read_bytes(), 1, VISION)) == [0]


def test_short_clip_gives_every_frame_once():
    assert uniform_indices(5, 8) == [0, 1, 2, 3, 4]
    assert decoded_indices(load_video(counting_video(5), 8, VISION)) == [0, 1, 2, 3, 4]


def test_fps_sampling():
    video = counting_video(30, rate=10)  # 3 s
    assert decoded_indices(load_video(video, 100, VISION, fps=2)) == [0, 5, 10, 15, 20, 25]
    # More frames at that rate than num_frames: uniform over the whole clip instead.
    assert decoded_indices(load_video(video, 4, VISION, fps=2)) == [0, 10, 19, 29]
    assert fps_indices(30, 10.0, 20.0, 100) == list(range(30))  # faster than the clip: no repeats
    assert fps_indices(7, 2.0, 1.0, 100) == [0, 2, 4, 6]


def test_mp4_from_bytes_and_resize():
    frames = np.zeros((12, 56, 56, 3), np.uint8)
    frames[:, :, 28:] = 255  # right half white
    out = load_video(encode_video(frames), 4, VISION)
    assert out.shape == (4, 3, 28, 28)
    assert out[:, :, :, :10].max() < -0.9 and out[:, :, :, -10:].min() > 0.9


def test_preprocessing_uses_the_towers_mean_and_std(tmp_path):
    vision = VisionConfig(image_size=14, image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 0.125))
    rgb = (255, 128, 0)
    expected = torch.tensor([(1 - 0.1) / 0.5, (128 / 255 - 0.2) / 0.25, (0 - 0.3) / 0.125])
    image = np.full((20, 30, 3), rgb, np.uint8)  # not square: squashed to 14 x 14
    path = tmp_path / "flat.png"
    Image.fromarray(image).save(path)
    for frames in (
        load_image(path, vision),
        load_video(lossless_video(np.stack([image[:, :20]] * 3), 1), 2, vision),
    ):
        assert frames.shape[1:] == (3, 14, 14)
        torch.testing.assert_close(
            frames, expected.view(1, 3, 1, 1).expand_as(frames), atol=1e-5, rtol=0
        )


def test_unreadable_media_raise_media_error_naming_the_source(tmp_path):
    with pytest.raises(MediaError, match="missing.mp4"):
        load_video(tmp_path / "missing.mp4", 4, VISION)
    video = encode_video(np.zeros((16, 56, 56, 3), np.uint8))
    with pytest.raises(MediaError, match="bytes"):
        load_video(video[: len(video) // 2], 4, VISION)
    with pytest.raises(MediaError):
        load_video(b"not a video at all", 4, VISION)
    # Index first (faststart): it opens, then ends before the frames its header promises.
    faststart = tmp_path / "faststart.mp4"
    with av.open(str(faststart), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=2)
        stream.width = stream.height = 32
        noise = np.random.default_rng(0).integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
        for frame in noise:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    with pytest.raises(MediaError, match="truncated"):
        load_video(faststart.read_bytes()[: faststart.stat().st_size // 2], 20, VISION)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), "red").save(buffer, format="JPEG")
    with pytest.raises(MediaError, match="image"):
        load_image(buffer.getvalue()[:200], VISION)
    with pytest.raises(ValueError, match="num_frames"):
        load_video(video, 0, VISION)


def gop_video(n: int, rate: int = 8) -> bytes:
    """H.264 with B-frames and a keyframe every 6 frames (open-GOP off): frames depend on each
    other, so a range decoded after a seek must match a decode from the start."""
    rng = np.random.default_rng(4)
    frames = np.cumsum(rng.integers(-6, 7, (n, 32, 32, 3)), axis=0) % 256
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream(
            "libx264", rate=rate, options={"x264-params": "keyint=6:min-keyint=6:bframes=2"}
        )
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for frame in frames.astype(np.uint8):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return buffer.getvalue()


@pytest.mark.parametrize("resize", ["rgb", "yuv"])
def test_a_range_of_the_sampled_frames_equals_the_same_frames_of_a_whole_decode(resize):
    """What a sequence-parallel rank decodes (a seek, then its range) equals its slice of the
    whole decode, bit for bit: H.264 with B-frames and mkv (no frame count in the header), uniform
    and fps sampling, ranges starting on, after and before keyframes."""
    cases = [
        (gop_video(40), 13, None),
        (gop_video(40), 40, None),  # every frame
        (counting_video(60), 8, None),
        (counting_video(30, rate=10), 100, 2.0),
    ]
    for data, num_frames, fps in cases:
        whole = load_video(data, num_frames, VISION, fps=fps, resize=resize)
        video = probe_video(data, num_frames, VISION, fps=fps, resize=resize)
        assert video.pts is not None and len(video) == whole.shape[0]
        n = len(video)
        for start, stop in [(0, n), (n - 1, n), (1, 4), (n // 3, n // 2), (n // 2, n), (3, 3)]:
            assert torch.equal(video.load(start, stop), whole[start:stop]), (start, stop)


def test_probing_a_truncated_video_names_it():
    video = gop_video(40)
    with pytest.raises(MediaError, match="bytes"):
        probe_video(video[: len(video) // 2], 8, VISION)
