"""VILA's frame preprocessing, written independently as the reference for ours, and test clips.

NVlabs/VILA (transformers 4.46) prepares a video for the tower like this: OpenCV opens the file,
finds its last readable frame, takes round(linspace(0, last, n)) indices, seeks to each one and
reads it (BGR at the video's own size), converts it to RGB and wraps it in a PIL image; every
image then goes through `process_image`: `.convert("RGB")`, with `image_aspect_ratio == "resize"`
a Pillow `resize` to the tower's square (Pillow's default filter, bicubic), and the tower's
`SiglipImageProcessor` (PIL backend): resize (bicubic), rescale by 1/255, normalise. Images are
opened with PIL and take the same `process_image` path.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import cv2
import numpy as np
import PIL.Image
import torch

ASPECTS = ("resize", None)
"""VILA's `image_aspect_ratio` values that squash to the square: a Pillow resize before the
processor, or the processor's own resize."""


def pil_siglip_processor(size: int, mean, std):
    """transformers' SigLIP image processor on its PIL backend, configured like a released tower.

    transformers 4 (VILA's 4.46) names the PIL processor `SiglipImageProcessor`; transformers 5
    gives that name to a torchvision backend (when torchvision is installed) that resizes
    differently, and calls the PIL one `SiglipImageProcessorPil`.
    """
    try:
        from transformers import SiglipImageProcessorPil as processor_class
    except ImportError:  # transformers 4
        from transformers import SiglipImageProcessor as processor_class
    processor = processor_class(
        do_resize=True,
        size={"height": size, "width": size},
        resample=PIL.Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
    )
    backend = getattr(processor, "backend", "pil")  # transformers 4 has only the PIL path here
    if backend != "pil" or type(processor).__name__.endswith("Fast"):
        raise RuntimeError(f"{type(processor).__name__} is not transformers' PIL image processor")
    return processor


def vila_process_image(image: PIL.Image.Image, processor, aspect: str | None) -> torch.Tensor:
    """`[3, S, S]` float32: VILA's `process_image` for a squashing `image_aspect_ratio`."""
    image = image.convert("RGB")
    if aspect == "resize":
        size = processor.size
        image = image.resize((size["width"], size["height"]))
    return processor.preprocess(image, return_tensors="pt")["pixel_values"][0]


def vila_video_frames(
    path: Path, num_frames: int, processor, aspect: str | None = "resize"
) -> torch.Tensor:
    """`[F, 3, S, S]`: uniformly sampled frames of the video at `path`, read as VILA reads them."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise RuntimeError(f"OpenCV cannot open {path}")
    # The header's frame count can be too large: step back to the last frame that can be read.
    last = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) - 1
    while last >= 0:
        capture.set(cv2.CAP_PROP_POS_FRAMES, last)
        if capture.grab():
            break
        last -= 1
    if last < 0:
        raise RuntimeError(f"{path} has no readable frame")
    indices = np.round(np.linspace(0, last, num_frames)).astype(int)
    images = {}
    for index in dict.fromkeys(indices.tolist()):
        capture.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, bgr = capture.read()
        if not ok:
            raise RuntimeError(f"OpenCV cannot read frame {index} of {path}")
        images[index] = PIL.Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return torch.stack([vila_process_image(images[i], processor, aspect) for i in indices])


def vila_image(source: Path | bytes, processor, aspect: str | None = "resize") -> torch.Tensor:
    """`[1, 3, S, S]`: an image file as VILA reads and preprocesses it."""
    opened = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return vila_process_image(opened, processor, aspect)[None]


# --- test clips --------------------------------------------------------------------------------

PRIMARIES = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
     [255, 255, 255], [0, 0, 0], [200, 30, 120], [20, 140, 60]],
    np.uint8,
)  # fmt: skip


def colour_edge_frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 `[F, H, W, 3]`: saturated colour tiles with one-pixel-sharp edges at odd offsets,
    a smooth gradient band and some noise, moving from frame to frame (so frames differ)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    frames = np.empty((num, height, width, 3), np.uint8)
    for i in range(num):
        tile = int(rng.integers(3, 10))
        index = ((x + 3 * i) // tile + 7 * ((y + i) // (tile + 2))) % len(PRIMARIES)
        frame = PRIMARIES[index].astype(np.int16)
        band = (y > height // 3) & (y < height // 2)
        frame[band] = np.stack(
            [x[band] * 255 // width, y[band] * 255 // height, 128 + 0 * x[band]], 1
        )
        frame += rng.integers(-12, 13, frame.shape, dtype=np.int16)
        frames[i] = frame.clip(0, 255)
    return frames


def scene_frames(num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 `[F, H, W, 3]`: a scene more like filmed video: smooth colour gradients behind a few
    solid coloured discs and boxes with sharp edges that move, and mild sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width] / max(height, width)
    background = np.stack([160 + 80 * x, 90 + 100 * y, 200 - 120 * x * y], axis=-1)
    shapes = [
        (rng.uniform(0.1, 0.9, 2), rng.uniform(0.05, 0.2), rng.uniform(-0.01, 0.01, 2),
         PRIMARIES[rng.integers(len(PRIMARIES))], bool(rng.integers(2)))
        for _ in range(6)
    ]  # fmt: skip
    frames = np.empty((num, height, width, 3), np.uint8)
    for i in range(num):
        frame = background.copy()
        for centre, radius, velocity, colour, disc in shapes:
            cy, cx = centre + i * velocity
            if disc:
                inside = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
            else:
                inside = (abs(y - cy) <= radius) & (abs(x - cx) <= radius / 2)
            frame[inside] = colour
        frame += rng.normal(0, 2, frame.shape)
        frames[i] = frame.clip(0, 255)
    return frames


def h264_clip(
    frames: np.ndarray,
    *,
    pix_fmt: str = "yuv420p",
    rate: int = 10,
    colorspace: str | None = None,
) -> bytes:
    """H.264 mp4 bytes of uint8 `[F, H, W, 3]` frames (4:2:0 needs even H and W; 4:4:4 does not).
    `colorspace` tags the stream (e.g. "ITU709") without changing how it is encoded."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264", rate=rate, options={"preset": "ultrafast", "crf": "20"}
        )
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if colorspace is not None:
            stream.codec_context.colorspace = getattr(av.video.reformatter.Colorspace, colorspace)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()
