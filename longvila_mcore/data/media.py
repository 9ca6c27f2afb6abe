"""Videos and images to frames for the vision tower: decode, sample, resize, normalise.

By default every frame is prepared as VILA's own pipeline prepares it, which is what the released
checkpoints were trained and evaluated on: each sampled video frame is decoded to RGB at the
video's own size (VILA: OpenCV; here PyAV: the same libswscale conversion, equal on every clip
tested), becomes a Pillow image and is squashed to the tower's square with Pillow's bicubic
filter, as transformers' PIL `SiglipImageProcessor` resizes; then it is scaled to [0, 1] and
normalised with the tower's mean and std in that processor's float order (REFERENCE 1). Images
take the same Pillow path.

`video_resize="yuv"` is the faster alternative for videos: swscale resizes while the frame is
still in the decoder's YUV 4:2:0, which treats chroma differently (README: speed and difference).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import av
import numpy as np
import torch
from PIL import Image

from longvila_mcore.config import VisionConfig
from longvila_mcore.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MediaSource = str | Path | bytes
"""A file path, or the encoded bytes of a file (as read from a shard)."""


VIDEO_RESIZES = ("rgb", "yuv")
"""How video frames reach the tower's size: `rgb` (VILA's way, the default) or `yuv` (faster)."""


class MediaError(DataError):
    """A video or image that cannot be decoded: missing, truncated or not a media file."""


def uniform_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over `total` frames, first and last included.

    round(linspace(0, total - 1, num_frames)); a clip with fewer frames gives all of them, so an
    index never repeats.
    """
    if total <= num_frames:
        return list(range(total))
    return np.round(np.linspace(0, total - 1, num_frames)).astype(int).tolist()


def fps_indices(total: int, frame_rate: float, fps: float, num_frames: int) -> list[int]:
    """Indices of the frames nearest to every 1/fps seconds of a clip at `frame_rate`.

    A clip that would give more than `num_frames` frames at `fps` gets `num_frames` uniform ones
    instead, so the whole clip stays covered.
    """
    indices = np.unique(np.round(np.arange(0, total, frame_rate / fps)).astype(int))
    indices = indices[indices < total].tolist()
    if len(indices) > num_frames:
        return uniform_indices(total, num_frames)
    return indices


def normalize(rgb: np.ndarray, vision: VisionConfig) -> torch.Tensor:
    """uint8 `[F, H, W, 3]` -> float32 `[F, 3, H, W]`, scaled to [0, 1] and normalised.

    The float steps of transformers' image processors: x / 255 in float32 (for every uint8 value
    equal to their float64 product with 1/255 rounded to float32), then (x - mean) / std in float32.
    """
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def check_video_resize(resize: str) -> None:
    """Raise ValueError unless `resize` is one of VIDEO_RESIZES."""
    if resize not in VIDEO_RESIZES:
        raise ConfigError(
            f"video_resize={resize!r} (data.video_resize, generate --video-resize) must be 'rgb' "
            "(VILA's preprocessing) or 'yuv' (faster: resized before the conversion to RGB)"
        )


class FrameSource(Protocol):
    """The frames of one medium, prepared for the tower only when `load` asks for them."""

    frame_shape: tuple[int, ...]
    """One prepared frame's shape (`(3, S, S)` for pixels)."""

    def __len__(self) -> int: ...

    def load(self, start: int, stop: int) -> torch.Tensor:
        """Frames `start` to `stop` (of this medium's `len(self)`), `[stop - start, *frame_shape]`."""
        ...


@dataclass(frozen=True)
class PreparedFrames:
    """Frames already in memory (`[F, ...]`: pixels, or ids an `encode` callback understands)."""

    frames: torch.Tensor

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return tuple(self.frames.shape[1:])

    def __len__(self) -> int:
        return self.frames.shape[0]

    def load(self, start: int, stop: int) -> torch.Tensor:
        return self.frames[start:stop]


@dataclass(frozen=True)
class VideoFrames:
    """A video's sampled frames, known from its container (`probe_video`), decoded per range.

    `load(start, stop)` seeks to the keyframe before the first frame of the range and decodes up
    to its last, so a sequence-parallel rank decodes only the frames it encodes; the frames equal
    those of a decode from the start (a test keeps them equal).
    """

    source: MediaSource
    indices: tuple[int, ...]
    """The sampled frames' indices in the video, increasing."""
    pts: tuple[int, ...] | None
    """Their presentation timestamps (None when the container has none: decoded from the start)."""
    resize: str
    vision: VisionConfig

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return (3, self.vision.image_size, self.vision.image_size)

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"frames {start}:{stop} of a video of {len(self)} sampled frames")
        if start == stop:
            return torch.empty(0, *self.frame_shape)
        name = _describe(self.source)
        to_tower, size = _FRAME_TO_TOWER[self.resize], self.vision.image_size
        try:
            frames = []
            if self.pts is not None:
                frames = _decode_from_pts(self.source, self.pts[start:stop], to_tower, size)
            if len(frames) < stop - start:  # no timestamps, or a seek that missed: from the start
                frames = _decode(self.source, list(self.indices[start:stop]), to_tower, size)
        except (av.FFmpegError, OSError) as err:
            raise MediaError(f"cannot decode video {name}: {err}") from err
        if len(frames) < stop - start:
            raise MediaError(
                f"video {name} decoded {len(frames)} of its sampled frames {start}:{stop}; "
                "the file is damaged (tools/make_shards checks every frame of a video)"
            )
        return normalize(np.stack(frames), self.vision)


@dataclass(frozen=True)
class ImageFrames:
    """One image (checked to decode by `probe_image`), resized and normalised on `load`."""

    source: MediaSource
    vision: VisionConfig

    @property
    def frame_shape(self) -> tuple[int, ...]:
        return (3, self.vision.image_size, self.vision.image_size)

    def __len__(self) -> int:
        return 1

    def load(self, start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= 1:
            raise ValueError(f"frames {start}:{stop} of an image (one frame)")
        if start == stop:
            return torch.empty(0, *self.frame_shape)
        return load_image(self.source, self.vision)


def probe_video(
    source: MediaSource,
    num_frames: int,
    vision: VisionConfig,
    *,
    fps: float | None = None,
    resize: str = "rgb",
    keep_start: bool = False,
) -> VideoFrames:
    """Which frames of a video `load_video` samples, from its container alone (no decoding).

    The packets are read (demuxed, not decoded) for the frame count and timestamps; a video
    with fewer packets than its header promises is truncated. Raises MediaError naming the
    source when it cannot be opened, has no frames or is truncated.
    """
    if num_frames < 1:
        raise ConfigError(f"num_frames={num_frames} must be >= 1")
    if fps is not None and fps <= 0:
        raise ConfigError(f"fps={fps} must be > 0 (or None for uniform sampling)")
    check_video_resize(resize)
    name = _describe(source)
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise MediaError(f"{name} has no video stream")
            stream = container.streams.video[0]
            promised = stream.frames
            rate = stream.average_rate or stream.guessed_rate
            pts = [p.pts for p in container.demux(stream) if p.size]
    except (av.FFmpegError, OSError) as err:
        raise MediaError(
            f"cannot decode video {name}: {err}; check that it exists and is a complete video file"
        ) from err
    total = len(pts)
    if total == 0:
        raise MediaError(f"{name} has no frames")
    if total < promised:
        raise MediaError(
            f"video {name} holds {total} frames but its header promises {promised}; "
            "the file is truncated"
        )
    if fps is None:
        wanted = uniform_indices(total, num_frames)
    elif rate is None:
        raise MediaError(f"{name} has no frame rate; sample it uniformly (fps=None)")
    elif keep_start:
        wanted = fps_indices(total, float(rate), fps, total)[:num_frames]
    else:
        wanted = fps_indices(total, float(rate), fps, num_frames)
    if fps is None and total < num_frames:
        logger.debug("%s has %d frames, fewer than %d: taking all", name, total, num_frames)
    # Frames come out of the decoder in presentation order: frame i has the i-th smallest pts.
    known = None not in pts and len(set(pts)) == total
    ordered = sorted(pts) if known else None
    return VideoFrames(
        source,
        tuple(wanted),
        tuple(ordered[i] for i in wanted) if ordered else None,
        resize,
        vision,
    )


def load_video(
    source: MediaSource,
    num_frames: int,
    vision: VisionConfig,
    *,
    fps: float | None = None,
    resize: str = "rgb",
    keep_start: bool = False,
) -> torch.Tensor:
    """Decode a video into `[F, 3, S, S]` frames (S = vision.image_size), F <= num_frames.

    Frames are sampled uniformly over the clip, or at `fps` frames a second when given (both
    capped at `num_frames`: a longer clip at `fps` gives `num_frames` uniform frames, or with
    `keep_start` its first `num_frames`), and resized as `resize` says (VIDEO_RESIZES). Raises
    MediaError naming the source when it cannot be decoded. `probe_video` + `load` of a range
    decodes part of them.
    """
    video = probe_video(source, num_frames, vision, fps=fps, resize=resize, keep_start=keep_start)
    return video.load(0, len(video))


def load_image(source: MediaSource, vision: VisionConfig) -> torch.Tensor:
    """Decode an image into one frame `[1, 3, S, S]`; raises MediaError naming the source."""
    name = _describe(source)
    size = vision.image_size
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            rgb = resize_rgb(image.convert("RGB"), size)
    except OSError as err:  # Pillow's UnidentifiedImageError and truncation errors are OSErrors
        raise MediaError(
            f"cannot decode image {name}: {err}; check that it exists and is a complete image"
        ) from err
    return normalize(rgb[None], vision)


def probe_image(source: MediaSource, vision: VisionConfig) -> ImageFrames:
    """An image checked to decode (every rank checks, only the rank encoding it prepares it)."""
    check_image(source)
    return ImageFrames(source, vision)


def check_video(source: MediaSource) -> int:
    """Decode every frame of a video, as training may sample any of them; return their count.

    Raises MediaError naming the source when it cannot be decoded, has no frames or holds fewer
    than its header promises (a truncated file).
    """
    name = _describe(source)
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise MediaError(f"{name} has no video stream")
            stream = container.streams.video[0]
            promised = stream.frames
            decoded = sum(1 for _ in container.decode(stream))
    except (av.FFmpegError, OSError) as err:
        raise MediaError(
            f"cannot decode video {name}: {err}; is it a complete video file?"
        ) from err
    if decoded == 0 or decoded < promised:
        raise MediaError(
            f"video {name} decodes to {decoded} frames but its header promises {promised}; "
            "the file is truncated or empty"
        )
    return decoded


def check_image(source: MediaSource) -> None:
    """Decode an image fully; raises MediaError naming the source when that fails."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
    except OSError as err:
        raise MediaError(
            f"cannot decode image {_describe(source)}: {err}; is it a complete image file?"
        ) from err


def resize_rgb(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image squashed to uint8 `[S, S, 3]` as transformers' PIL image processors resize:
    Pillow's bicubic filter in one step (no `reducing_gap`)."""
    return np.array(image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None))


def _rgb_then_resize(frame: av.VideoFrame, size: int) -> np.ndarray:
    # to_image converts at the frame's own size: the same swscale call as OpenCV's decoder.
    return resize_rgb(frame.to_image(), size)


def _resize_in_yuv(frame: av.VideoFrame, size: int) -> np.ndarray:
    return frame.reformat(size, size, "rgb24", interpolation="BICUBIC").to_ndarray()


_FRAME_TO_TOWER = {"rgb": _rgb_then_resize, "yuv": _resize_in_yuv}


def _decode(
    source: MediaSource,
    wanted: list[int],
    to_tower: Callable[[av.VideoFrame, int], np.ndarray],
    size: int,
) -> list[np.ndarray]:
    """The frames at the sorted indices `wanted`, as uint8 `[S, S, 3]`; stops after the last.

    Every frame up to the last wanted one is decoded (frames depend on each other), but only the
    wanted ones are converted and resized.
    """
    frames: list[np.ndarray] = []
    if not wanted:
        return frames
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index == wanted[len(frames)]:
                frames.append(to_tower(frame, size))
                if len(frames) == len(wanted):
                    break
    return frames


def _decode_from_pts(
    source: MediaSource,
    wanted: tuple[int, ...],
    to_tower: Callable[[av.VideoFrame, int], np.ndarray],
    size: int,
) -> list[np.ndarray]:
    """The frames of presentation timestamps `wanted` (increasing), as uint8 `[S, S, 3]`: a seek
    to the keyframe at or before the first, then decoding up to the last."""
    frames: list[np.ndarray] = []
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        container.seek(wanted[0], stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is None or frame.pts > wanted[len(frames)]:
                break  # the seek landed past the frame, or a frame is missing: the caller says
            if frame.pts == wanted[len(frames)]:
                frames.append(to_tower(frame, size))
                if len(frames) == len(wanted):
                    break
    return frames


def _open(source: MediaSource):
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))


def _describe(source: MediaSource) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else f"'{source}'"
