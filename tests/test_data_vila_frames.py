"""Our frames against VILA's own preprocessing (OpenCV + PIL + transformers' SigLIP processor).

The reference is tests/vila_reference.py. The default (`rgb`) must equal it within float
rounding; the faster `yuv` resize must differ (it is a different resampling) but stay close.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from longvila_mcore.config import VisionConfig
from longvila_mcore.data.media import load_image, load_video
from tests.vila_reference import (
    ASPECTS,
    colour_edge_frames,
    h264_clip,
    pil_siglip_processor,
    scene_frames,
    vila_image,
    vila_video_frames,
)

# The tower's size of the releases, with a per-channel mean and std (CLIP's), so that a channel
# swap or a mean/std mix-up cannot go unnoticed.
VISION = VisionConfig(
    image_size=384,
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
)
TOLERANCE = 1e-5

CLIPS = {
    # name: (height, width, H.264 pixel format, colour tag)
    "320x240 4:2:0": (240, 320, "yuv420p", None),
    "portrait 182x322 4:2:0, BT.709 tag": (322, 182, "yuv420p", "ITU709"),
    "odd 201x117 4:4:4": (117, 201, "yuv444p", None),
    "full-range 4:2:0 150x94": (94, 150, "yuvj420p", None),
    # Larger than the tower: shrunk by 3.3 x 1.9, where Pillow's optional `reducing_gap` would act.
    "landscape 1282x722 4:2:0": (722, 1282, "yuv420p", None),
}


@pytest.fixture(scope="module")
def processor():
    return pil_siglip_processor(VISION.image_size, VISION.image_mean, VISION.image_std)


@pytest.fixture(scope="module", params=list(CLIPS))
def clip(request, tmp_path_factory):
    height, width, pix_fmt, colorspace = CLIPS[request.param]
    seed = list(CLIPS).index(request.param)
    frames = colour_edge_frames(16, height, width, seed)
    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    path.write_bytes(h264_clip(frames, pix_fmt=pix_fmt, colorspace=colorspace))
    return path


def difference(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    d = (ours - reference).abs().flatten()
    return {"max": d.max().item(), "mean": d.mean().item(), "p99": d.quantile(0.99).item()}


def test_video_frames_equal_vilas(clip, processor):
    ours = load_video(clip, 8, VISION)
    for aspect in ASPECTS:
        reference = vila_video_frames(clip, 8, processor, aspect)
        assert ours.shape == reference.shape == (8, 3, 384, 384)
        assert ours.dtype == reference.dtype == torch.float32
        assert difference(ours, reference)["max"] <= TOLERANCE, aspect
    # Bytes instead of a path: the same frames.
    assert torch.equal(load_video(clip.read_bytes(), 8, VISION), ours)


@pytest.mark.parametrize("height, width", [(240, 320), (480, 854)])
def test_the_yuv_resize_is_close_but_not_vilas(tmp_path, height, width):
    vision = VisionConfig(image_size=384)  # the releases' mean and std 0.5: units of [-1, 1]
    processor = pil_siglip_processor(384, vision.image_mean, vision.image_std)
    path = tmp_path / "scene.mp4"
    path.write_bytes(h264_clip(scene_frames(16, height, width)))
    d = difference(load_video(path, 8, vision, resize="yuv"), vila_video_frames(path, 8, processor))
    # Another resampling (chroma resized at half resolution, on its own): it differs at the
    # colour edges, by up to half the range, but the picture is the same (one level is 0.008).
    assert d["max"] > 0.5 and d["mean"] < 0.015 and d["p99"] < 0.15, d


def test_uniform_sampling_takes_vilas_frames(tmp_path, processor):
    path = tmp_path / "clip.mp4"
    path.write_bytes(h264_clip(colour_edge_frames(13, 64, 96, seed=7)))
    for num_frames in (1, 5, 13):
        ours = load_video(path, num_frames, VISION)
        assert difference(ours, vila_video_frames(path, num_frames, processor))["max"] <= TOLERANCE


def image_files() -> dict[str, bytes]:
    """JPEG (4:2:0, odd size), portrait PNG, and a PNG with alpha."""
    rgb = colour_edge_frames(1, 117, 203, seed=3)[0]
    files = {}
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    files["jpeg 203x117"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(rgb.transpose(1, 0, 2).copy()).save(buffer, format="PNG")
    files["png portrait 117x203"] = buffer.getvalue()
    alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :, None]
    rgba = np.concatenate([rgb, np.broadcast_to(alpha, (*rgb.shape[:2], 1))], axis=2)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    files["png with alpha"] = buffer.getvalue()
    return files


def test_images_equal_vilas(tmp_path, processor):
    for name, data in image_files().items():
        path = tmp_path / name.replace(" ", "_")
        path.write_bytes(data)
        ours = load_image(path, VISION)
        assert torch.equal(load_image(data, VISION), ours)
        for aspect in ASPECTS:
            reference = vila_image(path, processor, aspect)
            assert ours.shape == reference.shape == (1, 3, 384, 384)
            assert difference(ours, reference)["max"] <= TOLERANCE, (name, aspect)


def test_unknown_video_resize_is_refused(clip):
    with pytest.raises(ValueError, match="video_resize='bicubic'.*'rgb'.*'yuv'"):
        load_video(clip, 8, VISION, resize="bicubic")
