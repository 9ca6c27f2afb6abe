"""VILA's data to our shards (FORMAT.md): LLaVA-style JSON and LongVILA's stage-4 token files.

Entry i of the input goes to shard i // samples_per_shard, under the key `%09d` % i, so a shard's
content depends only on its own entries: shards are written one after another, each entry
checked in a worker process (`workers`) and written in input order, which makes the bytes the
same for any number of workers (tar headers carry no time or owner). An entry that fails a check
is not written but listed in `rejected.jsonl` beside the shards, with its index, id and reason; a
shard keeps fewer samples then.

Each shard is written under a temporary name and renamed when complete, then a marker
(`.<shard>.done`, holding its rejections and a fingerprint of the input and settings) is
written; a second run skips the shards that have one, so an interrupted conversion resumes at
the first incomplete shard and never mixes inputs.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from longvila_mcore.data.chat import ConversationError, conversation_messages
from longvila_mcore.data.media import MediaError, check_image, check_video
from longvila_mcore.data.samples import media_kind
from longvila_mcore.errors import ConfigError, DataError

REJECTED = "rejected.jsonl"
LLAVA_KINDS = ("conversation", "caption")
MEDIA_FIELDS = (("image", "image"), ("images", "image"), ("video", "video"))
"""LLaVA's media fields, in the order VILA's LLaVADataset puts their media into the sample."""
_FIELD = re.compile(r"%0?\d*d")
CHUNK_PER_WORKER = 4
"""Entries handed to each worker at a time: bounds what is held in memory."""


@dataclass(frozen=True)
class Rejection:
    """An input entry that was not written, and why (`reason` is a short counter name)."""

    index: int
    id: object
    reason: str
    message: str


class _Reject(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Summary:
    """What a conversion wrote: shard paths, samples written, rejections (all, in input order)."""

    out_pattern: str
    shards: list[str]
    written: int = 0
    resumed: int = 0
    """Shards found complete from an earlier run and left as they were."""
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def rejected(self) -> Counter:
        return Counter(r.reason for r in self.rejections)

    @property
    def pattern(self) -> str:
        """The shards as one brace pattern, for `data.<kind>`."""
        if len(self.shards) == 1:
            return self.shards[0]
        last = len(self.shards) - 1
        return _FIELD.sub(lambda m: f"{{{m[0] % 0}..{m[0] % last}}}", self.out_pattern)


def convert_llava(
    json_file: str | Path,
    media_dir: str | Path,
    out_pattern: str,
    *,
    kind: str = "conversation",
    samples_per_shard: int = 1000,
    workers: int = 1,
) -> Summary:
    """Write the LLaVA-style samples of `json_file` (a JSON list or JSON lines of `{"id",
    "image" | "images" | "video", "conversations"}`, media paths relative to `media_dir`) as
    `kind` shards named `out_pattern % shard` (e.g. `out/sft-%06d.tar`).

    Conversation samples keep all their media in VILA's order (`image`, `images`, `video`) as
    `0.jpg`, `1.mp4`, ...; caption samples (stage 1) take the one image and the one gpt reply.
    """
    if kind not in LLAVA_KINDS:
        raise ConfigError(f"kind={kind!r} must be one of {LLAVA_KINDS} for LLaVA-style data")
    media_dir = Path(media_dir)
    if not media_dir.is_dir():
        raise DataError(f"--media-dir {media_dir} is not a directory")
    entries = _load_llava(Path(json_file))
    settings = {"format": "llava", "kind": kind, "media_dir": str(media_dir.resolve())}
    return write_shards(
        entries,
        len(entries),
        partial(_llava_record, media_dir=media_dir, kind=kind),
        out_pattern,
        samples_per_shard=samples_per_shard,
        workers=workers,
        fingerprint=_fingerprint(Path(json_file), settings | {"per_shard": samples_per_shard}),
    )


def convert_tokens(
    jsonl_file: str | Path,
    out_pattern: str,
    vocab_size: int,
    *,
    media_ids: Sequence[int] = (),
    samples_per_shard: int = 1000,
    workers: int = 1,
) -> Summary:
    """Write LongVILA's stage-4 JSON lines (`{"text": [token ids], ...}`) as `text` shards named
    `out_pattern % shard`, streaming: memory holds a few lines at a time, whatever the file's
    size. A line with an id outside [0, vocab_size) (the tokenizer's size) or one of `media_ids`
    (VILA's media tokens, which text cannot hold) is rejected."""
    if vocab_size < 1:
        raise ConfigError(f"vocab_size={vocab_size} must be >= 1")
    path = Path(jsonl_file)
    if not path.is_file():
        raise DataError(f"--json {path} is not a file")
    with path.open("rb") as counted:
        total = _count_lines(counted)
    with path.open("rb") as lines:
        return write_shards(
            lines,
            total,
            partial(_token_record, vocab_size=vocab_size, media_ids=tuple(media_ids)),
            out_pattern,
            samples_per_shard=samples_per_shard,
            workers=workers,
            fingerprint=_fingerprint(
                path,
                {
                    "format": "tokens",
                    "vocab": vocab_size,
                    "media": sorted(media_ids),
                    "per_shard": samples_per_shard,
                },  # fmt: skip
            ),
        )


def write_shards(
    entries: Iterable,
    total: int,
    convert: Callable[[tuple[int, object]], dict | Rejection],
    out_pattern: str,
    *,
    samples_per_shard: int,
    workers: int,
    fingerprint: str,
) -> Summary:
    """Convert `total` entries with `convert((index, entry)) -> webdataset record | Rejection`
    into shards of `samples_per_shard` entries each, resuming after complete shards."""
    if samples_per_shard < 1:
        raise ConfigError(f"--samples-per-shard {samples_per_shard} must be >= 1")
    if workers < 1:
        raise ConfigError(f"--workers {workers} must be >= 1")
    shards = [Path(p) for p in shard_paths(out_pattern, math.ceil(total / samples_per_shard))]
    if not shards:
        raise DataError("the input holds no entries")
    shards[0].parent.mkdir(parents=True, exist_ok=True)
    summary = Summary(out_pattern, [str(s) for s in shards])
    numbered = enumerate(entries)
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        with tqdm(total=total, unit="sample", disable=None) as progress:
            for shard in shards:
                chunk = itertools.islice(numbered, samples_per_shard)
                done = _marker(shard, fingerprint)
                if done is None:
                    done = _write_shard(shard, chunk, convert, pool, workers, progress)
                    _write_marker(shard, fingerprint, done)
                else:
                    summary.resumed += 1
                    progress.update(sum(1 for _ in chunk))  # skip (read, not parse) its entries
                summary.written += done["samples"]
                summary.rejections += [Rejection(**r) for r in done["rejected"]]
    finally:
        if pool is not None:
            pool.terminate()
    lines = "".join(json.dumps(r.__dict__, ensure_ascii=False) + "\n" for r in summary.rejections)
    _atomic_write(shards[0].parent / REJECTED, lines.encode())
    return summary


def shard_paths(out_pattern: str, count: int) -> list[str]:
    """`out_pattern % i` for i < count; the pattern must hold one integer field such as %06d."""
    try:
        names = [out_pattern % i for i in range(max(count, 2))]
    except (TypeError, ValueError):
        names = []
    if len(_FIELD.findall(out_pattern)) != 1 or not names or not names[0].endswith(".tar"):
        raise DataError(
            f"--out {out_pattern!r} must name .tar shards with one integer field, "
            "e.g. /data/sft/sft-%06d.tar"
        )
    return names[:count]


def _write_shard(shard: Path, chunk, convert, pool, workers: int, progress) -> dict:
    tmp = shard.with_name(f".{shard.name}.tmp")
    rejected, samples = [], 0
    with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:
        for part in iter(lambda: list(itertools.islice(chunk, CHUNK_PER_WORKER * workers)), []):
            for result in pool.map(convert, part) if pool else map(convert, part):
                if isinstance(result, Rejection):
                    rejected.append(result.__dict__)
                else:
                    writer.write(result)
                    samples += 1
            progress.update(len(part))
    os.replace(tmp, shard)
    return {"samples": samples, "rejected": rejected}


def _marker_path(shard: Path) -> Path:
    return shard.with_name(f".{shard.name}.done")


def _marker(shard: Path, fingerprint: str) -> dict | None:
    """The record of a shard completed by an earlier run of the same conversion, or None."""
    path = _marker_path(shard)
    if not path.is_file() or not shard.is_file():
        return None
    done = json.loads(path.read_text())
    if done["fingerprint"] != fingerprint:
        raise DataError(
            f"{shard} was made by a conversion of other input or settings; remove the shards "
            f"(and their .done markers) in {shard.parent} or choose another --out"
        )
    return done


def _write_marker(shard: Path, fingerprint: str, done: dict) -> None:
    _atomic_write(_marker_path(shard), json.dumps({"fingerprint": fingerprint, **done}).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fingerprint(path: Path, settings: dict) -> str:
    """Input size, first and last MiB, and settings: a changed input is noticed without reading
    a file of many GB twice."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as file:
        digest.update(file.read(2**20))
        file.seek(max(size - 2**20, 0))
        digest.update(file.read())
    return digest.hexdigest()


def _count_lines(file) -> int:
    count, last = 0, b"\n"
    for block in iter(lambda: file.read(2**24), b""):
        count += block.count(b"\n")
        last = block[-1:]
    return count + (last != b"\n")


# --- LLaVA-style JSON ---------------------------------------------------------------------


def _load_llava(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"--json {path} is not a file")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            entries = json.loads(text)
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}); LLaVA data is a JSON list") from err
    if not isinstance(entries, list):
        raise DataError(f"{path} holds a JSON {type(entries).__name__}, not a list of samples")
    return entries


def _llava_record(item: tuple[int, object], media_dir: Path, kind: str) -> dict | Rejection:
    index, entry = item
    ident = entry.get("id") if isinstance(entry, dict) else None
    try:
        if not isinstance(entry, dict):
            raise _Reject("malformed", f"entry is a {type(entry).__name__}, not an object")
        media = _llava_media(entry, media_dir)
        conversations = entry.get("conversations")
        try:
            messages = conversation_messages(conversations, [k for k, _, _ in media])
        except ConversationError as err:
            raise _Reject("bad_conversation", str(err)) from err
        record = {"__key__": f"{index:09d}"}
        if kind == "caption":
            replies = [m["content"] for m in messages if m["role"] == "assistant"]
            if [k for k, _, _ in media] != ["image"] or len(replies) != 1:
                raise _Reject(
                    "bad_conversation",
                    f"a caption sample has one image and one gpt reply, not {len(media)} media "
                    f"and {len(replies)} replies",
                )
            _, ext, data = media[0]
            return record | {ext: data, "json": _json({"id": ident, "caption": replies[0]})}
        for n, (_, ext, data) in enumerate(media):
            record[f"{n}.{ext}"] = data
        return record | {"json": _json({"id": ident, "conversations": conversations})}
    except _Reject as err:
        return Rejection(index, ident, err.reason, str(err))


def _llava_media(entry: dict, media_dir: Path) -> list[tuple[str, str, bytes]]:
    """(kind, extension, bytes) of each medium of an entry, checked, in VILA's order."""
    media = []
    for name, kind in MEDIA_FIELDS:
        paths = entry.get(name, [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise _Reject("malformed", f"'{name}' is {paths!r}, not a path or a list of paths")
        for relative in paths:
            path = media_dir / relative
            ext = path.suffix.lower().lstrip(".")
            if media_kind(ext) != kind:
                raise _Reject(
                    "unsupported_media",
                    f"{name} '{relative}' is not a {kind} file this pipeline reads "
                    "(images: jpg, jpeg, png, webp; videos: mp4, mkv, webm, avi, mov)",
                )
            if not path.is_file():
                raise _Reject("missing_media", f"{name} '{relative}' is not a file in {media_dir}")
            data = path.read_bytes()
            try:
                (check_video if kind == "video" else check_image)(data)
            except MediaError as err:
                raise _Reject("corrupt_media", f"{name} '{relative}': {err}") from err
            media.append((kind, ext, data))
    return media


def _json(value: dict) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True).encode()


# --- stage-4 token files ------------------------------------------------------------------


def _token_record(
    item: tuple[int, bytes], vocab_size: int, media_ids: tuple[int, ...]
) -> dict | Rejection:
    index, line = item
    where = f"line {index + 1}"
    try:
        value = json.loads(line)
    except ValueError as err:
        return Rejection(index, None, "malformed", f"{where} is not JSON: {err}")
    text = value.get("text") if isinstance(value, dict) else None
    ident = value.get("id") if isinstance(value, dict) else None
    ids = np.asarray(text if isinstance(text, list) else [])
    if not len(ids) or not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 1:
        return Rejection(index, ident, "malformed", f"{where} has no 'text' list of token ids")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if len(bad):
        return Rejection(
            index,
            ident,
            "bad_token_ids",
            f"{where}: token id {ids[bad[0]]} at position {bad[0]} (and {len(bad) - 1} more) is "
            f"outside the tokenizer's {vocab_size} ids; were they made with another tokenizer?",
        )
    media = np.flatnonzero(np.isin(ids, media_ids))
    if len(media):
        return Rejection(
            index,
            ident,
            "media_token_ids",
            f"{where}: token id {ids[media[0]]} at position {media[0]} is one of VILA's media "
            "tokens, which a text sample cannot hold",
        )
    buffer = io.BytesIO()
    np.save(buffer, ids.astype(np.int32), allow_pickle=False)
    return {"__key__": f"{index:09d}", "npy": buffer.getvalue()}
