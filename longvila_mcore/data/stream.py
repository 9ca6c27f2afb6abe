"""The global sample stream: seeded shard order and a seeded shuffle buffer, per epoch.

Shards are uncompressed webdataset tars on a file system. The stream is built from references
(shard, member offsets) read from the tar headers alone, so replaying it up to a saved position
touches no sample bytes, and a rank reads only the samples it decodes. Epoch `e` of seed `s`
is the same sequence on every rank and every run.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from longvila_mcore.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRef:
    """Where the files of one sample are: `members` are (extension, byte offset, size)."""

    shard: str
    key: str
    members: tuple[tuple[str, int, int], ...]

    @property
    def name(self) -> str:
        """`shard-name/key`, for messages."""
        return f"{Path(self.shard).name}/{self.key}"

    def read(self) -> dict[str, bytes]:
        """The sample's files, extension -> bytes."""
        files = {}
        with open(self.shard, "rb") as f:
            for ext, offset, size in self.members:
                f.seek(offset)
                files[ext] = f.read(size)
        return files


def expand_shards(pattern: str) -> list[str]:
    """The shard paths of `pattern`: brace ranges (`data-{000000..000009}.tar`), globs, and
    several patterns joined by `::`. Raises when a pattern matches no file."""
    paths = []
    for part in expand_urls(pattern):
        matches = sorted(glob.glob(part)) if glob.has_magic(part) else [part]
        missing = [m for m in matches if not Path(m).is_file()]
        if not matches or missing:
            raise DataError(
                f"shard pattern {pattern!r}: {missing[0] if missing else part!r} matches no file; "
                "fix the data.* shard pattern (brace ranges and globs are expanded)"
            )
        paths += matches
    if not paths:
        raise DataError(f"shard pattern {pattern!r} is empty; set the data.* shard pattern")
    return paths


def split_key(member_name: str) -> tuple[str, str]:
    """webdataset's naming: the key runs to the first dot of the file name, the rest is the
    extension (lower-cased): `dir/doc7.0.jpg` -> (`dir/doc7`, `0.jpg`)."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def index_shard(path: str) -> Iterator[SampleRef]:
    """The samples of one shard in file order, from the tar headers (no data is read).

    A shard damaged part way (a bad header, cut short) yields the samples before the damage.
    """
    with open(path, "rb") as f:
        try:
            archive = tarfile.TarFile(fileobj=f)
        except tarfile.TarError as err:
            raise DataError(f"shard {path} is not an uncompressed tar file: {err}") from err
        key, members, error = None, [], None
        try:
            for member in archive:
                if not member.isfile():
                    continue
                member_key, ext = split_key(member.name)
                if member_key != key and members:
                    yield SampleRef(path, key, tuple(members))
                    members = []
                key = member_key
                members.append((ext, member.offset_data, member.size))
        except tarfile.TarError as err:
            error = err
        # tarfile stops quietly at a bad header (more than the end-of-archive padding is left
        # unread) and at a file cut short (no end-of-archive marker of two zero blocks).
        unread = os.fstat(f.fileno()).st_size - archive.offset
        if error is None and unread < 2 * tarfile.BLOCKSIZE:
            error = "cut short"
        elif error is None and unread > tarfile.RECORDSIZE + 2 * tarfile.BLOCKSIZE:
            error = "bad header"
        if error:  # the last sample may be incomplete: it goes too
            logger.warning(
                "shard %s is damaged at sample %s (%s); skipping from there", path, key, error
            )
        elif members:
            yield SampleRef(path, key, tuple(members))


def epoch_stream(shards: list[str], seed: int, epoch: int, buffer_size: int) -> Iterator[SampleRef]:
    """Epoch `epoch` of the stream: shards in a seeded order, samples through a seeded buffer.

    The buffer holds `buffer_size` references; each incoming sample replaces a random one, which
    is emitted. A buffer of 0 or 1 keeps the file order.
    """
    rng = random.Random(f"longvila-mcore/{seed}/{epoch}")  # str seeds hash the same everywhere
    order = list(shards)
    rng.shuffle(order)
    buffer: list[SampleRef] = []
    for shard in order:
        for ref in index_shard(shard):
            if len(buffer) < max(buffer_size, 1):
                buffer.append(ref)
                continue
            j = rng.randrange(len(buffer))
            yield buffer[j]
            buffer[j] = ref
    rng.shuffle(buffer)
    yield from buffer
