"""Videos and images to frames for the vision tower: decode, sample, resize, normalise.

Videos are decoded with PyAV; the frames kept are resized by swscale while still in the decoder's
pixel format (bicubic, squashed to a square, as the tower was trained), then scaled to [0, 1] and
normalised with the tower's mean and std (REFERENCE 1). Images go through Pillow the same way.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from longvila_mcore.config import VisionConfig

logger = logging.getLogger(__name__)

MediaSource = str | Path | bytes
"""A file path, or the encoded bytes of a file (as read from a shard)."""


class MediaError(ValueError):
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
    """uint8 `[F, H, W, 3]` -> float32 `[F, 3, H, W]`, scaled to [0, 1] and normalised."""
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def load_video(
    source: MediaSource, num_frames: int, vision: VisionConfig, *, fps: float | None = None
) -> torch.Tensor:
    """Decode a video into `[F, 3, S, S]` frames (S = vision.image_size), F <= num_frames.

    Frames are sampled uniformly over the clip, or at `fps` frames a second when given (both
    capped at `num_frames`). Raises MediaError naming the source when it cannot be decoded.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps={fps} must be > 0 (or None for uniform sampling)")
    name = _describe(source)
    try:
        with _open(source) as container:
            if not container.streams.video:
                raise MediaError(f"{name} has no video stream")
            stream = container.streams.video[0]
            total = stream.frames
            rate = stream.average_rate or stream.guessed_rate
        if total <= 0:  # containers such as mkv do not store the count: count packets instead
            with _open(source) as container:
                total = sum(1 for p in container.demux(video=0) if p.size)
        if total == 0:
            raise MediaError(f"{name} has no frames")
        if fps is None:
            wanted = uniform_indices(total, num_frames)
        elif rate is None:
            raise MediaError(f"{name} has no frame rate; sample it uniformly (fps=None)")
        else:
            wanted = fps_indices(total, float(rate), fps, num_frames)
        if fps is None and total < num_frames:
            logger.debug("%s has %d frames, fewer than %d: taking all", name, total, num_frames)
        frames = _decode(source, wanted, vision.image_size)
    except (av.FFmpegError, OSError) as err:
        raise MediaError(
            f"cannot decode video {name}: {err}; check that it exists and is a complete video file"
        ) from err
    if len(frames) < len(wanted):
        raise MediaError(
            f"video {name} has fewer frames than the {total} its header promises (decoded "
            f"{len(frames)} of the {len(wanted)} sampled); the file is truncated"
        )
    return normalize(np.stack(frames), vision)


def load_image(source: MediaSource, vision: VisionConfig) -> torch.Tensor:
    """Decode an image into one frame `[1, 3, S, S]`; raises MediaError naming the source."""
    name = _describe(source)
    size = vision.image_size
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            rgb = np.array(image)
    except OSError as err:  # Pillow's UnidentifiedImageError and truncation errors are OSErrors
        raise MediaError(
            f"cannot decode image {name}: {err}; check that it exists and is a complete image"
        ) from err
    return normalize(rgb[None], vision)


def _decode(source: MediaSource, wanted: list[int], size: int) -> list[np.ndarray]:
    """The frames at the sorted indices `wanted`, as uint8 `[S, S, 3]`; stops after the last."""
    frames: list[np.ndarray] = []
    if not wanted:
        return frames
    with _open(source) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index == wanted[len(frames)]:
                rgb = frame.reformat(size, size, "rgb24", interpolation="BICUBIC")
                frames.append(rgb.to_ndarray())
                if len(frames) == len(wanted):
                    break
    return frames


def _open(source: MediaSource):
    return av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source))


def _describe(source: MediaSource) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else f"'{source}'"
