"""The embedded default dataset: small, learnable samples of every kind, made on first use.

Real webdataset shards with real encoded media (H.264 mp4 videos, JPEG and PNG images), a
pre-tokenised text set and the byte-level BPE tokenizer they were written with, generated
deterministically from a seed into the cache (`$LONGVILA_CACHE` or `~/.cache/longvila_mcore`,
then `synthetic/v3`). Everything is written into a temporary directory that is renamed when
complete, so an interrupted generation leaves no cache behind.

What is in it (images and videos are 56 x 56, videos at 2 frames a second):

- caption (stage 1): a coloured shape on a plain background, "a red square on a black
  background, on the left".
- interleaved (stage 2): documents of two or three such pictures, each followed by a sentence
  about it, and a final count of the pictures.
- conversation (stages 3 and 5): an eighth questions about a shape picture (colour, shape,
  side), a quarter about a needle picture alone (colour and shape), an eighth about a short clip
  of a moving shape (colour, shape, direction), half about a needle video: a grey haystack
  (`haystack`) of 8 to `num_frames` frames with one needle picture (`needle_picture`: one of 4
  colours x 3 shapes, centred on black) at a random depth.
  A needle video asks both needle questions (`NEEDLE_QUESTIONS`: its colour and its shape, in a
  random order, each answered with one word) and sometimes when it appears (near the start, in
  the middle, near the end). The needle evaluation (`longvila_mcore.eval`) asks the same
  questions about the same pictures in haystacks made the same way.
- text (stage 4): token ids of sentences about shapes and counting, in fixed-length chunks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import webdataset as wds
from PIL import Image
from transformers import AutoTokenizer

from longvila_mcore.data.samples import KINDS
from longvila_mcore.data.tokenizer import PAD_TOKEN, train_tokenizer
from longvila_mcore.errors import ConfigError

logger = logging.getLogger(__name__)

VERSION = "v3"
DEFAULT_FRAMES = 64
SIZE = 56
FRAME_RATE = 2
SHORT_CLIP_FRAMES = 16
VOCAB_SIZE = 512
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 200, 40),
}
SHAPES = ("square", "circle", "triangle")
BACKGROUNDS = {"black": 20, "grey": 128, "white": 235}
NEEDLE_QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape appears in the video?",
}
"""The needle questions of the training videos and of the evaluation; the answer is one word."""
MIN_NEEDLE_FRAMES = 8


@dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated dataset is: shard pattern per kind and the tokenizer directory."""

    root: Path
    tokenizer_dir: Path
    shards: dict[str, str]


def synthetic_root(cache_dir: str | Path | None = None, num_frames: int = DEFAULT_FRAMES) -> Path:
    """The dataset's directory: `<cache>/synthetic/v3` (`v3-<n>f` for non-default lengths)."""
    base = cache_dir or os.environ.get("LONGVILA_CACHE") or Path.home() / ".cache/longvila_mcore"
    name = VERSION if num_frames == DEFAULT_FRAMES else f"{VERSION}-{num_frames}f"
    return Path(base) / "synthetic" / name


def synthetic_paths(
    cache_dir: str | Path | None = None, num_frames: int = DEFAULT_FRAMES
) -> SyntheticPaths:
    """The synthetic dataset's paths, generating it into the cache on first use."""
    root = synthetic_root(cache_dir, num_frames)
    if not root.is_dir():
        logger.info("generating the synthetic dataset into %s (first use)", root)
        generate_synthetic(root, num_frames=num_frames)
    return dataset_paths(root)


def dataset_paths(root: Path, shards: int | None = None) -> SyntheticPaths:
    """The paths of the dataset in `root` (number of shards read from its params.json)."""
    if shards is None:
        shards = json.loads((root / "params.json").read_text())["shards"]
    last = f"{shards - 1:06d}"
    return SyntheticPaths(
        root=root,
        tokenizer_dir=root / "tokenizer",
        shards={k: str(root / f"{k}-{{000000..{last}}}.tar") for k in KINDS},
    )


def generate_synthetic(
    out_dir: str | Path,
    *,
    num_frames: int = DEFAULT_FRAMES,
    samples: int = 1024,
    shards: int = 2,
    text_length: int = 512,
    seed: int = 0,
) -> SyntheticPaths:
    """Write the dataset into `out_dir` (which must not exist), atomically.

    `samples` per kind over `shards` shards each; needle videos have `num_frames` frames; text
    samples are `text_length` tokens. The same arguments always give the same bytes.
    """
    out_dir = Path(out_dir)
    if num_frames < 3 or samples < shards or shards < 1 or text_length < 2:
        raise ConfigError(
            f"num_frames={num_frames} (>= 3), samples={samples} (>= shards), shards={shards} "
            f"(>= 1) and text_length={text_length} (>= 2) are out of range"
        )
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it to generate the dataset again")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    start = time.perf_counter()
    try:
        _write_dataset(tmp, num_frames, samples, shards, text_length, seed)
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not out_dir.is_dir():
            raise
        logger.info("%s was generated meanwhile by another process; using it", out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    else:
        logger.info("synthetic dataset written in %.1f s: %s", time.perf_counter() - start, out_dir)
    return dataset_paths(out_dir, shards)


def _write_dataset(root: Path, num_frames, samples, shards, text_length, seed) -> None:
    makers: dict[str, Callable[[np.random.Generator, int], tuple[dict, str]]] = {
        "caption": _caption,
        "interleaved": _interleaved,
        "conversation": lambda rng, i: _conversation(rng, i, num_frames),
    }
    records, corpus = {}, ["system\nYou are a helpful assistant.\nuser\nassistant\n"] * 100
    # One-word replies follow the template's newline, without the space they have in sentences:
    # enough of them that each is one token.
    corpus += ["\n".join([*COLOURS, *SHAPES]) + "\n"] * 1000
    for k, (kind, make) in enumerate(makers.items()):
        made = [make(np.random.default_rng([seed, k, i]), i) for i in range(samples)]
        records[kind] = [record for record, _ in made]
        corpus += [words for _, words in made]
    # Some 4.7 characters a token: 6 per token is text enough for every chunk, none repeated.
    documents = _documents(random.Random(f"{seed}/text"), 6 * samples * text_length)
    train_tokenizer(corpus + documents, VOCAB_SIZE, root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    records["text"] = list(_text_chunks(tokenizer, documents, samples, text_length))
    for kind, kind_records in records.items():
        for shard in range(shards):
            part = kind_records[shard * samples // shards : (shard + 1) * samples // shards]
            with wds.TarWriter(str(root / f"{kind}-{shard:06d}.tar"), mtime=0, encoder=False) as w:
                for record in part:
                    w.write(record)
    params = dict(version=VERSION, num_frames=num_frames, samples=samples, shards=shards,
                  text_length=text_length, seed=seed)  # fmt: skip
    (root / "params.json").write_text(json.dumps(params, indent=1) + "\n")


# --- media --------------------------------------------------------------------------------


def draw_shape(image: np.ndarray, shape: str, colour: tuple[int, int, int], cy, cx, r) -> None:
    """Draw a filled `shape` of half-size `r` centred at (cy, cx) into `image` `[H, W, 3]`."""
    y, x = np.ogrid[: image.shape[0], : image.shape[1]]
    if shape == "square":
        mask = (abs(y - cy) <= r) & (abs(x - cx) <= r)
    elif shape == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    else:  # triangle pointing up
        mask = (y >= cy - r) & (y <= cy + r) & (2 * abs(x - cx) <= y - (cy - r))
    image[mask] = colour


def encode_video(frames: np.ndarray, frame_rate: int = FRAME_RATE) -> bytes:
    """uint8 `[F, H, W, 3]` (even H and W) -> H.264 mp4 bytes."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264", rate=frame_rate, options={"preset": "ultrafast", "crf": "18"}
        )
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def encode_image(image: np.ndarray, ext: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG" if ext == "jpg" else "PNG", quality=95)
    return buffer.getvalue()


def _shape_picture(rng: np.random.Generator):
    """A random shape on a plain background, and the words that describe it."""
    colour, shape, background = (
        str(rng.choice(list(COLOURS))),
        str(rng.choice(SHAPES)),
        str(rng.choice(list(BACKGROUNDS))),
    )
    image = np.full((SIZE, SIZE, 3), BACKGROUNDS[background], np.uint8)
    r = int(rng.integers(8, 13))
    cx = int(rng.integers(r, SIZE - r))
    draw_shape(image, shape, COLOURS[colour], int(rng.integers(r, SIZE - r)), cx, r)
    side = "left" if cx < SIZE // 2 else "right"
    return image, dict(colour=colour, shape=shape, background=background, side=side)


def haystack(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """uint8 `[num_frames, 56, 56, 3]` grey frames of slowly drifting 8 x 8 blocks: nothing
    coloured, cheap to encode. Block levels are uniform in [40, 200), each frame's the mean of
    four consecutive draws, so neighbouring frames share three."""
    levels = rng.integers(40, 200, (num_frames + 3, SIZE // 8, SIZE // 8)).astype(float)
    levels = (levels[:-3] + levels[1:-2] + levels[2:-1] + levels[3:]) / 4
    grey = np.kron(levels, np.ones((8, 8))).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


NEEDLE_SIZES = {"square": 24, "circle": 13, "triangle": 24}
"""Half-sizes of the needle shapes. The tiny tower sees a frame as 2 x 2 tokens of 28 x 28
pixels, so the shapes differ there: a large square fills about three quarters of every token, a
small circle a sixth of each, a large triangle (pointing up) a sixth of the top two and more than
half of the bottom two. Shapes of one size differed too little for it to learn (shape answers
at chance while colours were right)."""


def needle_picture(colour: str, shape: str) -> np.ndarray:
    """uint8 `[56, 56, 3]`: a `colour` `shape` (`NEEDLE_SIZES`) centred on black."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ConfigError(
            f"needle {colour} {shape}: colour one of {list(COLOURS)}, shape of {SHAPES}"
        )
    image = np.full((SIZE, SIZE, 3), BACKGROUNDS["black"], np.uint8)
    draw_shape(image, shape, COLOURS[colour], SIZE // 2, SIZE // 2, NEEDLE_SIZES[shape])
    return image


# --- samples ------------------------------------------------------------------------------


def _caption(rng: np.random.Generator, i: int) -> tuple[dict, str]:
    image, w = _shape_picture(rng)
    caption = f"a {w['colour']} {w['shape']} on a {w['background']} background, on the {w['side']}"
    ext = "jpg" if i % 2 else "png"
    return {"__key__": f"caption-{i:06d}", ext: encode_image(image, ext),
            "json": json.dumps({"caption": caption}).encode()}, caption  # fmt: skip


def _interleaved(rng: np.random.Generator, i: int) -> tuple[dict, str]:
    count = int(rng.integers(2, 4))
    intro = str(rng.choice(["Here are some shapes.", "A page of pictures.", "Look at these."]))
    record = {"__key__": f"interleaved-{i:06d}"}
    segments: list[dict] = [{"text": intro + " "}]
    for n in range(count):
        image, w = _shape_picture(rng)
        ext = "jpg" if n % 2 else "png"
        record[f"{n}.{ext}"] = encode_image(image, ext)
        segments += [
            {"image": n},
            {"text": f"Picture {n + 1} shows a {w['colour']} {w['shape']}. "},
        ]
    segments.append({"text": f"There are {count} pictures."})
    record["json"] = json.dumps({"segments": segments}).encode()
    return record, "".join(s.get("text", "") for s in segments)


def _conversation(rng: np.random.Generator, i: int, num_frames: int) -> tuple[dict, str]:
    variant = i % 8
    if variant in (1, 2):  # a needle picture alone: its shape learnt on one frame
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        media = {"jpg": encode_image(needle_picture(colour, shape), "jpg")}
        questions = [
            ("What colour is the shape?", colour),
            ("What shape is in the picture?", shape),
        ]
        return _record(i, media, "<image>", [questions[q] for q in rng.permutation(2)])
    if variant == 0:
        image, w = _shape_picture(rng)
        media, placeholder = {"jpg": encode_image(image, "jpg")}, "<image>"
        questions = [
            ("What colour is the shape?", w["colour"]),
            ("What shape is in the picture?", w["shape"]),
            ("Where is the shape?", f"on the {w['side']}"),
        ]
    elif variant == 3:
        frames, w = _moving_shape(rng)
        media, placeholder = {"mp4": encode_video(frames)}, "<video>"
        questions = [
            ("What colour is the moving shape?", w["colour"]),
            ("What shape moves in the video?", w["shape"]),
            ("Which way does the shape move?", f"to the {w['direction']}"),
        ]
    else:
        frames, w = _needle_video(rng, num_frames)
        media, placeholder = {"mp4": encode_video(frames)}, "<video>"
        needle = [(NEEDLE_QUESTIONS[k], w[k]) for k in rng.permutation(["colour", "shape"])]
        when = [("When does the shape appear?", w["when"])] if rng.random() < 0.25 else []
        return _record(i, media, placeholder, needle + when)
    order = rng.permutation(len(questions))[: int(rng.integers(1, len(questions) + 1))]
    return _record(i, media, placeholder, [questions[q] for q in order])


def _record(i: int, media: dict, placeholder: str, questions: list[tuple[str, str]]):
    """A conversation record asking `questions` in turn about `media`, and its words."""
    turns = []
    for n, (question, answer) in enumerate(questions):
        turns += [
            {"from": "human", "value": f"{placeholder}\n{question}" if n == 0 else question},
            {"from": "gpt", "value": answer},
        ]
    text = " ".join(t["value"].replace(placeholder, "") for t in turns)
    return {"__key__": f"conversation-{i:06d}", **media,
            "json": json.dumps({"conversations": turns}).encode()}, text  # fmt: skip


def _moving_shape(rng: np.random.Generator):
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    direction = str(rng.choice(["left", "right"]))
    r, cy = 8, int(rng.integers(8, SIZE - 8))
    xs = np.linspace(r, SIZE - 1 - r, SHORT_CLIP_FRAMES).round().astype(int)
    frames = np.full((SHORT_CLIP_FRAMES, SIZE, SIZE, 3), int(rng.integers(60, 190)), np.uint8)
    for frame, cx in zip(frames, xs if direction == "right" else xs[::-1], strict=True):
        draw_shape(frame, shape, COLOURS[colour], cy, int(cx), r)
    return frames, dict(colour=colour, shape=shape, direction=direction)


def _needle_video(rng: np.random.Generator, num_frames: int):
    """A haystack of 8 to `num_frames` frames, one of them a needle picture."""
    length = int(rng.integers(min(MIN_NEEDLE_FRAMES, num_frames), num_frames + 1))
    frames = haystack(rng, length)
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    depth = int(rng.integers(length))
    frames[depth] = needle_picture(colour, shape)
    when = ("near the start", "in the middle", "near the end")[3 * depth // length]
    return frames, dict(colour=colour, shape=shape, when=when)


# --- text ---------------------------------------------------------------------------------

RELATIONS = ("left of", "right of", "above", "below", "next to", "bigger than", "smaller than")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _documents(rng: random.Random, approx_chars: int) -> list[str]:
    """Short documents about shapes and counting: regular enough for a tiny model to learn."""
    objects = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    documents, total = [], 0
    while total < approx_chars:
        sentences = []
        for _ in range(rng.randint(3, 8)):
            if rng.random() < 0.2:
                start = rng.randint(0, 4)
                sentences.append(" ".join(NUMBERS[start : start + 6]) + ".")
            else:
                a, relation, b = rng.choice(objects), rng.choice(RELATIONS), rng.choice(objects)
                sentences.append(f"The {a} is {relation} the {b}.")
        documents.append(" ".join(sentences))
        total += len(documents[-1])
    return documents


def _text_chunks(tokenizer, documents: list[str], samples: int, length: int) -> Iterator[dict]:
    """`samples` chunks of `length` token ids from the documents joined by end-of-text."""
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += [*encoded, pad]
    if len(ids) < samples * length:
        ids *= -(-samples * length // len(ids))
    for i in range(samples):
        chunk = np.asarray(ids[i * length : (i + 1) * length], np.int32)
        buffer = io.BytesIO()
        np.save(buffer, chunk, allow_pickle=False)
        yield {"__key__": f"text-{i:06d}", "npy": buffer.getvalue()}
