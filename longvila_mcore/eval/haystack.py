"""What the needle evaluation shows the model: a haystack video and needle pictures with a question.

Haystack: any video PyAV decodes, sampled at `fps` from its start (a haystack of L frames is the
first L), or the synthetic one anyone can rebuild: `synthetic_haystack(frames, seed)`, the grey
drifting blocks of the synthetic training videos (`data.synthetic.haystack` with
`numpy.random.default_rng(seed)`; a shorter haystack is the start of a longer one).

Needles: a folder (docs/needle_eval.md: `needles.json`, a list of `{"image", "question",
"answer"}`, images relative to the folder), or the generated set of 12: the synthetic needle
pictures (one of 4 colours x 3 shapes, centred on black), even indices asking the
colour, odd ones the shape, with the training data's questions and one-word answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from longvila_mcore.config import VisionConfig
from longvila_mcore.data.media import MediaError, load_image, load_video, normalize, resize_rgb
from longvila_mcore.data.synthetic import (
    COLOURS,
    NEEDLE_QUESTIONS,
    SHAPES,
    haystack,
    needle_picture,
)
from longvila_mcore.errors import DataError

SYNTHETIC = "synthetic"
NEEDLES_FILE = "needles.json"


@dataclass(frozen=True)
class Needle:
    name: str
    image: torch.Tensor
    """`[1, 3, S, S]` normalised for the tower."""
    question: str
    answer: str


def synthetic_haystack(num_frames: int, seed: int = 0) -> np.ndarray:
    """uint8 `[num_frames, 56, 56, 3]`: the documented synthetic haystack."""
    return haystack(np.random.default_rng(seed), num_frames)


def load_haystack(
    source: str, num_frames: int, vision: VisionConfig, *, fps: float, seed: int, resize: str
) -> torch.Tensor:
    """`[num_frames, 3, S, S]` haystack frames: `source` is `synthetic` or a video path."""
    if source == SYNTHETIC:
        frames = synthetic_haystack(num_frames, seed)
        return normalize(np.stack([_to_tower(f, vision) for f in frames]), vision)
    if not Path(source).is_file():
        raise DataError(f"--haystack {source!r} is not a file; give a video or 'synthetic'")
    try:
        frames = load_video(source, num_frames, vision, fps=fps, resize=resize, keep_start=True)
    except MediaError as err:
        raise DataError(str(err)) from err
    if frames.shape[0] < num_frames:
        raise DataError(
            f"--haystack {source} gives {frames.shape[0]} frames at --fps {fps}, fewer than the "
            f"longest of --lengths ({num_frames}); use a longer video, a higher --fps or shorter "
            "--lengths"
        )
    return frames


def generated_needles(vision: VisionConfig) -> list[Needle]:
    """The 12 generated needles: each colour and each shape asked about at least once."""
    colours, needles = list(COLOURS), []
    for j in range(6):
        for kind in ("colour", "shape"):
            colour = colours[j % 4] if kind == "colour" else colours[(j + 2) % 4]
            shape = SHAPES[j % 3]
            picture = normalize(_to_tower(needle_picture(colour, shape), vision)[None], vision)
            answer = colour if kind == "colour" else shape
            needles.append(
                Needle(f"{kind}-{colour}-{shape}", picture, NEEDLE_QUESTIONS[kind], answer)
            )
    return needles


def folder_needles(folder: str | Path, vision: VisionConfig) -> list[Needle]:
    """The needles of a folder (`needles.json` + images); ValueError naming what is wrong."""
    folder = Path(folder)
    index = folder / NEEDLES_FILE
    if not index.is_file():
        raise DataError(
            f"--needles {folder} has no {NEEDLES_FILE}; write a list of "
            '{"image": FILE, "question": TEXT, "answer": TEXT} there (docs/needle_eval.md)'
        )
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{index} is not valid JSON: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{index} must hold a non-empty list of needles")
    needles = []
    for n, entry in enumerate(entries):
        keys = ("image", "question", "answer")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in keys):
            raise DataError(
                f"{index} entry {n} is {entry!r}; each needle needs string keys {list(keys)}"
            )
        if not entry["answer"].strip():
            raise DataError(f"{index} entry {n} has an empty answer")
        try:
            image = load_image(folder / entry["image"], vision)
        except MediaError as err:
            raise DataError(f"{index} entry {n}: {err}") from err
        needles.append(Needle(Path(entry["image"]).stem, image, entry["question"], entry["answer"]))
    return needles


def _to_tower(rgb: np.ndarray, vision: VisionConfig) -> np.ndarray:
    """A synthetic picture at the tower's size, resized as images are (media.resize_rgb)."""
    if rgb.shape[0] == vision.image_size:
        return rgb
    return resize_rgb(Image.fromarray(rgb), vision.image_size)
