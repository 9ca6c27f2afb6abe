"""`python -m longvila_mcore.generate` on a tiny VILA-layout checkpoint against the HF assembly."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from longvila_mcore.config import VisionConfig
from longvila_mcore.data.chat import render_prompt
from longvila_mcore.data.layout import MediaLayout
from longvila_mcore.data.tokenizer import IM_END, train_tokenizer
from tests.hf_reference import HFLongVILA, make_vila_checkpoint, tiny_llm_config, tiny_vision_config
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
def test_generate_matches_hf_greedy(tmp_path):
    tokenizer_dir = train_tokenizer(TEXTS, 300, tmp_path / "tokenizer")
    vision = tiny_vision_config()
    llm = tiny_llm_config(vocab_size=320)
    root = make_vila_checkpoint(tmp_path / "ckpt", tokenizer_dir, llm, vision)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, vision.image_size, vision.image_size, 3), dtype=np.uint8)
    video = tmp_path / "clip.mkv"
    video.write_bytes(lossless_video(pixels, rate=4))

    done = run_generate(
        "--load",
        str(root),
        "--video",
        str(video),
        "--prompt",
        PROMPT,
        "--num-frames",
        "5",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])

    reference = HFLongVILA(root)
    tokenizer = reference_tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(
        root / "llm"
    )
    layout = MediaLayout.from_tokenizer(reference_tokenizer, 4)
    prompt = layout.expand(render_prompt(tokenizer, PROMPT, "video"), [5])
    expected = reference.greedy(
        prompt.input_ids,
        prompt.media_index,
        reference_frames(pixels, 5, vision),
        12,
        tokenizer.convert_tokens_to_ids(IM_END),
    )
    assert result["token_ids"] == expected
    assert result["text"] == tokenizer.decode(expected, skip_special_tokens=True)


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
