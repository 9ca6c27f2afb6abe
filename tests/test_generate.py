"""`python -m longvila_mcore.generate` on a tiny VILA-layout checkpoint against the HF assembly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from longvila_mcore.config import VisionConfig
from longvila_mcore.data.chat import render_prompt
from longvila_mcore.data.layout import MediaLayout
from longvila_mcore.data.tokenizer import IM_END, train_tokenizer
from tests.hf_reference import (
    HFLongVILA,
    make_vila_checkpoint,
    tiny_llm_config,
    tiny_vision_config,
    vila_sequence,
)
from tests.test_data_media import lossless_video

TEXTS = ["What colour is the shape? The shape is red.", "A blue circle moves left.\n" * 3] * 20
PROMPT = "What colour is the shape?"


def reference_frames(pixels: np.ndarray, num_frames: int, vision: VisionConfig) -> torch.Tensor:
    """Uniformly sampled frames, normalised with the tower's mean / std, written out directly."""
    picks = np.round(np.linspace(0, len(pixels) - 1, num_frames)).astype(int)
    x = torch.from_numpy(pixels[picks]).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def run_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longvila_mcore.generate", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_generate_matches_hf_greedy_in_both_token_orders(tmp_path):
    """A VILA-layout checkpoint runs in the raster order by default and in the legacy one with
    `--token-order legacy`; each equals the HF assembly's greedy tokens in that order. The
    checkpoint's attention is sharpened (qk_scale) so that the two orders continue differently."""
    tokenizer_dir = train_tokenizer(TEXTS, 300, tmp_path / "tokenizer")
    vision = tiny_vision_config()
    llm = tiny_llm_config(vocab_size=320)
    root = make_vila_checkpoint(tmp_path / "ckpt", tokenizer_dir, llm, vision, qk_scale=10.0)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, vision.image_size, vision.image_size, 3), dtype=np.uint8)
    video = tmp_path / "clip.mkv"
    video.write_bytes(lossless_video(pixels, rate=4))

    tokenizer = AutoTokenizer.from_pretrained(root / "llm")
    layout = MediaLayout.from_tokenizer(tokenizer, 4)
    prompt = layout.expand(render_prompt(tokenizer, PROMPT, ["video"]), [5])
    expected = {
        order: HFLongVILA(root, order).greedy(
            prompt.input_ids,
            prompt.media_index,
            reference_frames(pixels, 5, vision),
            12,
            tokenizer.convert_tokens_to_ids(IM_END),
        )
        for order in ("raster", "legacy")
    }
    assert expected["raster"] != expected["legacy"]

    args = ["--load", str(root), "--video", str(video), "--prompt", PROMPT]
    args += ["--num-frames", "5", "--max-new-tokens", "12", "--json"]
    for order, flag in (("raster", []), ("legacy", ["--token-order", "legacy"])):
        done = run_generate(*args, *flag)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["token_ids"] == expected[order], order
        assert result["text"] == tokenizer.decode(expected[order], skip_special_tokens=True)


@pytest.mark.slow
def test_generate_with_several_media_matches_hf_greedy(tmp_path):
    """`--image` twice and `--video`: the media tokens open the user turn as VILA's LLaVADataset
    orders them (images, then videos); the greedy tokens equal the HF assembly's on VILA's
    layout written from the prompt text (tests/hf_reference.vila_sequence)."""
    tokenizer_dir = train_tokenizer(TEXTS, 300, tmp_path / "tokenizer")
    vision = tiny_vision_config()
    root = make_vila_checkpoint(
        tmp_path / "ckpt", tokenizer_dir, tiny_llm_config(vocab_size=320), vision, qk_scale=10.0
    )
    rng = np.random.default_rng(1)
    size = vision.image_size
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    clip = rng.integers(0, 256, (12, size, size, 3), dtype=np.uint8)
    for name, pixels in (("a.png", images[0]), ("b.png", images[1])):
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "clip.mkv").write_bytes(lossless_video(clip, rate=4))

    tokenizer = AutoTokenizer.from_pretrained(root / "llm")
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<image><image><vila/video>{PROMPT}<|im_end|>\n<|im_start|>assistant\n"
    )
    media = [reference_frames(images[:1], 1, vision), reference_frames(images[1:], 1, vision),
             reference_frames(clip, 5, vision)]  # fmt: skip
    ids, reads, _ = vila_sequence([(prompt, False)], tokenizer, media, 4)
    expected = HFLongVILA(root).greedy(
        torch.tensor(ids).clamp(min=0),  # frame positions read frames, not ids
        torch.tensor(reads),
        torch.cat(media),
        12,
        tokenizer.convert_tokens_to_ids(IM_END),
    )
    swapped = HFLongVILA(root).greedy(
        torch.tensor(ids).clamp(min=0), torch.tensor(reads), torch.cat(media[::-1]), 12, -1
    )
    assert swapped[: len(expected)] != expected  # the order of the media matters here

    done = run_generate(
        "--load", str(root), "--image", str(tmp_path / "a.png"), "--video",
        str(tmp_path / "clip.mkv"), "--image", str(tmp_path / "b.png"), "--prompt", PROMPT,
        "--num-frames", "5", "--max-new-tokens", "12", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["token_ids"] == expected


@pytest.mark.slow
def test_generate_reports_bad_input_in_one_line(tmp_path):
    done = run_generate("--load", str(tmp_path), "--video", "x.mp4", "--prompt", "hi")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "error:" in done.stderr
    assert "Traceback" not in done.stderr


def test_video_resize_flag_defaults_to_vilas_preprocessing(capsys):
    from longvila_mcore.generate import parse_args

    required = ["--load", "ckpt", "--video", "clip.mp4", "--prompt", "hi"]
    assert parse_args(required).video_resize == "rgb"
    assert parse_args([*required, "--video-resize", "yuv"]).video_resize == "yuv"
    with pytest.raises(SystemExit):
        parse_args([*required, "--video-resize", "area"])
    assert "invalid choice: 'area'" in capsys.readouterr().err
