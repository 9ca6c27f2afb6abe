"""One webdataset sample of each kind to token ids, labels and frames (FORMAT.md).

| kind           | files                         | sequence and targets                                |
|----------------|-------------------------------|-----------------------------------------------------|
| `caption`      | `jpg`/`png` + `json`          | image, caption, `<|im_end|>`; targets: caption + end |
| `interleaved`  | `0.jpg`, `1.png`, ... + `json`| segments in order + `<|im_end|>`; targets: all text  |
| `conversation` | `json` + media (`mp4`/`jpg`/`png` or `0.jpg`, `1.mp4`, ...) | chat template; targets: assistant replies + ends |
| `text`         | `npy` (int32 token ids)       | the ids; targets: all                               |

Building a sample lays its tokens out without decoding its videos (their containers give the
frame count, `media.probe_video`); images are checked to decode. Frames are prepared later, by the
sequence-parallel rank that encodes them (`packing.pack`). Building raises MediaError for
undecodable media and BadSample for anything else that makes it unusable; the pipeline counts
both and moves on.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from longvila_mcore.config import VisionConfig
from longvila_mcore.data.chat import ConversationError, conversation_messages, render_chat
from longvila_mcore.data.layout import MediaLayout, shift_labels
from longvila_mcore.data.media import (
    FrameSource,
    PreparedFrames,
    check_video_resize,
    probe_image,
    probe_video,
)
from longvila_mcore.data.tokenizer import IM_END, encode_text, token_id
from longvila_mcore.errors import ConfigError, DataError

KINDS = ("caption", "interleaved", "conversation", "text")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTENSIONS = ("mp4", "mkv", "webm", "avi", "mov")


class BadSample(DataError):
    """A sample that cannot be trained on; `reason` names the skip counter it goes to."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Sample:
    """One sample before packing: `[L]` ids, frame-local media indices, shifted labels."""

    key: str
    input_ids: torch.Tensor
    media_index: torch.Tensor
    labels: torch.Tensor
    frames: list[FrameSource] | torch.Tensor = field(default_factory=list)
    """Its media in order, each prepared only when loaded (an `[F, ...]` tensor given here is
    one medium of prepared frames); none for text."""

    def __post_init__(self) -> None:
        if isinstance(self.frames, torch.Tensor):
            self.frames = [PreparedFrames(self.frames)]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_frames(self) -> int:
        return sum(len(medium) for medium in self.frames)


class SampleBuilder:
    """Turns the files of one sample into a `Sample`, for one stage's frame sampling."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        layout: MediaLayout,
        vision: VisionConfig,
        *,
        num_frames: int,
        fps: float | None = None,
        video_resize: str = "rgb",
    ):
        if num_frames < 1:
            raise ConfigError(f"num_frames={num_frames} must be >= 1")
        if fps is not None and fps <= 0:
            raise ConfigError(f"fps={fps} must be > 0, or None to sample frames uniformly")
        check_video_resize(video_resize)
        self.tokenizer = tokenizer
        self.layout = layout
        self.vision = vision
        self.num_frames = num_frames
        self.fps = fps
        self.video_resize = video_resize
        self.end_id = token_id(tokenizer, IM_END)
        self.vocab_size = len(tokenizer)

    def build(self, kind: str, key: str, files: dict[str, bytes]) -> Sample:
        """The sample of `kind` made of `files` (extension -> bytes)."""
        if kind == "caption":
            ids, targets, frames = self._caption(files)
        elif kind == "interleaved":
            ids, targets, frames = self._interleaved(files)
        elif kind == "conversation":
            ids, targets, frames = self._conversation(files)
        elif kind == "text":
            ids, targets, frames = self._text(files)
        else:
            raise ConfigError(f"unknown sample kind {kind!r}; use one of {KINDS}")
        try:
            expanded = self.layout.expand(ids, [len(f) for f in frames], targets)
        except ValueError as err:  # media token strings inside the text itself
            reason = "bad_conversation" if kind == "conversation" else "malformed"
            raise BadSample(reason, str(err)) from err
        return Sample(
            key=key,
            input_ids=expanded.input_ids,
            media_index=expanded.media_index,
            labels=shift_labels(expanded.input_ids, expanded.is_target),
            frames=frames,
        )

    def _caption(self, files):
        caption = _json(files, "malformed").get("caption")
        if not isinstance(caption, str) or not caption:
            raise BadSample("malformed", "json has no 'caption' string")
        text = encode_text(self.tokenizer, caption) + [self.end_id]
        ids = [self.layout.image_id, *text]
        targets = [False] + [True] * len(text)
        return ids, targets, [probe_image(_one_of(files, IMAGE_EXTENSIONS), self.vision)]

    def _interleaved(self, files):
        segments = _json(files, "malformed").get("segments")
        if not isinstance(segments, list) or not segments:
            raise BadSample("malformed", "json has no 'segments' list")
        ids, targets, frames = [], [], []
        for segment in segments:
            if isinstance(segment, dict) and isinstance(segment.get("text"), str):
                text = encode_text(self.tokenizer, segment["text"])
                ids += text
                targets += [True] * len(text)
            elif isinstance(segment, dict) and isinstance(segment.get("image"), int):
                names = [f"{segment['image']}.{ext}" for ext in IMAGE_EXTENSIONS]
                ids.append(self.layout.image_id)
                targets.append(False)
                frames.append(probe_image(_one_of(files, names), self.vision))
            else:
                raise BadSample(
                    "malformed", f"segment {segment!r} is not {{text: str}} or {{image: int}}"
                )
        ids.append(self.end_id)
        targets.append(True)
        return ids, targets, frames

    def _conversation(self, files):
        conversations = _json(files, "bad_conversation").get("conversations")
        media = conversation_media(files)
        try:
            messages = conversation_messages(conversations, [kind for kind, _ in media])
        except ConversationError as err:
            raise BadSample("bad_conversation", str(err)) from err
        ids, targets = render_chat(self.tokenizer, messages)
        frames = [
            probe_video(data, self.num_frames, self.vision, fps=self.fps, resize=self.video_resize)
            if kind == "video"
            else probe_image(data, self.vision)
            for kind, data in media
        ]
        return ids, targets, frames

    def _text(self, files):
        if "npy" not in files:
            raise BadSample("malformed", f"no npy file (has {sorted(files)})")
        try:
            ids = np.load(io.BytesIO(files["npy"]), allow_pickle=False)
        except ValueError as err:
            raise BadSample("malformed", f"unreadable npy: {err}") from err
        if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer):
            raise BadSample("malformed", f"npy holds {ids.dtype} {ids.shape}, not 1-D token ids")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise BadSample(
                "malformed",
                f"token ids span [{ids.min()}, {ids.max()}], outside the tokenizer's "
                f"{self.vocab_size} ids; was it encoded with another tokenizer?",
            )
        return ids.astype(np.int64), np.ones(len(ids), bool), []


def media_kind(extension: str) -> str | None:
    """ "image" or "video" for a media file extension (`jpg`, `mp4`, ...), else None."""
    if extension in IMAGE_EXTENSIONS:
        return "image"
    return "video" if extension in VIDEO_EXTENSIONS else None


def conversation_media(files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """The media of a conversation sample in order, as (kind, bytes): one unnumbered file
    (`mp4`, `jpg`, ...) or numbered ones (`0.jpg`, `1.mp4`, ...), counted from 0."""
    single = [(media_kind(ext), data) for ext, data in files.items() if media_kind(ext)]
    numbered = {}
    for name, data in files.items():
        index, _, ext = name.partition(".")
        if index.isdigit() and media_kind(ext):
            numbered[int(index)] = (media_kind(ext), data)
    if single and numbered or len(single) > 1 or sorted(numbered) != list(range(len(numbered))):
        raise BadSample(
            "malformed",
            f"media files {sorted(files)} are neither one medium (mp4, jpg, ...) nor media "
            "numbered from 0 (0.jpg, 1.mp4, ...), one file each",
        )
    return single or [numbered[i] for i in range(len(numbered))]


def _json(files: dict[str, bytes], reason: str) -> dict:
    try:
        value = json.loads(files["json"])
    except KeyError:
        raise BadSample(reason, f"no json file (has {sorted(files)})") from None
    except ValueError as err:
        raise BadSample(reason, f"invalid json: {err}") from err
    if not isinstance(value, dict):
        raise BadSample(reason, "json is not an object")
    return value


def _one_of(files: dict[str, bytes], names) -> bytes:
    data = next((files[n] for n in names if n in files), None)
    if data is None:
        raise BadSample("malformed", f"none of the files {list(names)} (has {sorted(files)})")
    return data
