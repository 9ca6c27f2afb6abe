"""The training data pipeline: per optimizer step, this data-parallel rank's micro-batches.

Semantics (one deterministic stream for any layout):

- `global_batch_size` counts samples per optimizer step. The stream (stream.py) is one global
  sequence per seed; sample number g of it belongs to data-parallel rank g mod dp, so a step's
  samples are the same for every dp when no sample is bad, and so is the loss.
- A rank reads and decodes only its own samples. One that is unusable (undecodable media, a bad
  conversation, malformed files, longer than `max_length`) is counted in `skipped` by reason and
  replaced by the rank's next own sample: a step always has global_batch_size / dp samples per
  rank. Skips only shift the rank's own sub-stream; no communication is needed.
  MAX_SKIPS_IN_A_ROW unusable samples in a row stop the run (the data or max_length is wrong).
- The step's samples are padded to a multiple of `pad_multiple` and packed greedily, in stream
  order, into micro-batches, each padded to a multiple of `pack_multiple` (packing.py). Ranks
  may get different numbers of micro-batches.
- Every rank of a sequence-parallel group (and each of its tensor-parallel ranks) reads the same
  samples and lays out the same micro-batches, but decodes and holds only the frames it encodes
  (`sp_rank` of `sp_size`; Batch contract): a video's container gives the frame count, so the
  layout needs no decoding, and a rank's frames are decoded after a seek to their time range.
- With `num_workers`, samples are built that many ahead in threads, and the next step's frames
  are decoded in a worker while the current step trains.
- `state_dict()` is the position in the stream; a pipeline loaded with it continues exactly as
  the uninterrupted one would, without decoding the samples before it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from longvila_mcore.config import DataConfig, ModelConfig
from longvila_mcore.data.batch import Batch
from longvila_mcore.data.layout import MediaLayout
from longvila_mcore.data.media import MediaError
from longvila_mcore.data.packing import collate, padded_length
from longvila_mcore.data.samples import KINDS, BadSample, Sample, SampleBuilder
from longvila_mcore.data.stream import SampleRef, epoch_stream, expand_shards
from longvila_mcore.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SKIP_REASONS = ("corrupt_media", "bad_conversation", "malformed", "too_long")
MAX_SKIPS_IN_A_ROW = 1000
"""More unusable samples in a row than this means the data or max_length is wrong: stop."""


class StreamPosition(NamedTuple):
    """Where a rank is in the global stream: the next index within `epoch`, and how many
    samples of the whole stream (all ranks, all epochs) come before it."""

    epoch: int
    index: int
    consumed: int


_Step = tuple["list[Batch] | Future[list[Batch]]", StreamPosition, dict[str, int]]
"""A step's micro-batches (or their future), the stream position after it, its skips."""


class Pipeline:
    """An endless iterator of steps; each step is this rank's `list[Batch]`."""

    def __init__(
        self,
        shards: list[str],
        builder: SampleBuilder,
        kind: str,
        *,
        max_length: int,
        global_batch_size: int,
        micro_batch_size: int,
        pad_multiple: int,
        pad_id: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        pack_multiple: int | None = None,
        sp_rank: int = 0,
        sp_size: int = 1,
    ):
        pack_multiple = pack_multiple or pad_multiple
        _check_layout(
            max_length,
            global_batch_size,
            micro_batch_size,
            (pad_multiple, pack_multiple),
            dp_rank,
            dp_size,
        )
        _check_sp_rank(sp_rank, sp_size)
        if num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers} must be >= 0 (0: decode inline)")
        self.shards = shards
        self.builder = builder
        self.kind = kind
        self.max_length = max_length
        self.micro_batch_size = micro_batch_size
        self.pad_multiple, self.pack_multiple = pad_multiple, pack_multiple
        self.pad_id = pad_id
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.sp_rank, self.sp_size = sp_rank, sp_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_rank = global_batch_size // dp_size
        self.skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)
        """Samples skipped so far by this rank, by reason (for the training metrics)."""
        self._position = StreamPosition(0, 0, 0)
        self._executor = ThreadPoolExecutor(num_workers) if num_workers else None
        self._lookahead = num_workers
        self._results: Iterator[tuple[StreamPosition, SampleRef, Sample | Exception]] | None = None
        self._ahead: _Step | Exception | None = None
        """The next step, started early (with workers)."""

    def __iter__(self) -> Pipeline:
        return self

    def __next__(self) -> list[Batch]:
        if self._results is None:
            self._results = self._decoded(self._position)
        step = self._ahead or self._start_step()
        # With workers, the next step's frames are decoded while this one trains.
        self._ahead = self._start_step() if self._executor is not None else None
        if isinstance(step, Exception):
            raise step
        batches, self._position, skipped = step
        for reason, count in skipped.items():
            self.skipped[reason] += count
        return batches if isinstance(batches, list) else batches.result()

    def _start_step(self) -> _Step | Exception:
        """The next step's samples laid out; their frames prepared now, or by a worker."""
        try:
            samples, position, skipped = self._next_samples()
        except DataError as err:  # too many unusable samples: raised when the step is due
            return err
        if self._executor is None:
            return self._collate(samples), position, skipped
        return self._executor.submit(self._collate, samples), position, skipped

    def _next_samples(self) -> tuple[list[Sample], StreamPosition, dict[str, int]]:
        """A step's samples, the position after them and the samples skipped on the way."""
        samples: list[Sample] = []
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        in_a_row = 0
        while len(samples) < self.samples_per_rank:
            position, ref, result = next(self._results)
            problem = self._problem(ref, result)
            if problem is None:
                samples.append(result)
                in_a_row = 0
                continue
            reason, message = problem
            skipped[reason] += 1
            logger.warning("skipped (%s) %s", reason, message)
            in_a_row += 1
            if in_a_row == MAX_SKIPS_IN_A_ROW:
                so_far = {k: self.skipped[k] + skipped[k] for k in SKIP_REASONS}
                raise DataError(
                    f"{in_a_row} samples in a row were unusable (skipped so far: {so_far}), "
                    f"the last: {message}; check the data.{self.kind} shards and max_length"
                )
        return samples, position, skipped

    def _collate(self, samples: list[Sample]) -> list[Batch]:
        return collate(
            samples,
            micro_batch_size=self.micro_batch_size,
            max_length=self.max_length,
            pad_id=self.pad_id,
            pad_multiple=self.pad_multiple,
            pack_multiple=self.pack_multiple,
            sp_rank=self.sp_rank,
            sp_size=self.sp_size,
        )

    def state_dict(self) -> dict:
        """This rank's position in the stream and its skip counters."""
        return {
            **self._position._asdict(),
            "skipped": dict(self.skipped),
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "kind": self.kind,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (saved by the same rank of the same layout and seed)."""
        self._check_saved_with(state, ("seed", "dp_size", "dp_rank", "kind"))
        self.close()
        self._position = StreamPosition(state["epoch"], state["index"], state["consumed"])
        self.skipped = dict.fromkeys(SKIP_REASONS, 0) | state["skipped"]

    def _check_saved_with(self, state: dict, names: tuple[str, ...]) -> None:
        for name in names:
            if state[name] != getattr(self, name):
                raise DataError(
                    f"the data position was saved with {name}={state[name]!r} but this run has "
                    f"{getattr(self, name)!r}; resume with the same {', '.join(names)}, or start "
                    "the data stream afresh"
                )

    def resharded_state(self, saved: list[dict]) -> dict:
        """This rank's state from the states every data-parallel rank of another layout saved
        (`saved[r]` from rank r of `len(saved)`): every rank continues the global stream after
        the furthest sample any saved rank read, so no sample is trained twice. The ranks read
        alike except where they skipped samples (too long, corrupt): samples a rank that
        skipped fewer had not reached yet are left out. The skip counters go to rank 0."""
        for state in saved:
            self._check_saved_with(state, ("seed", "kind"))
        furthest = max(saved, key=lambda state: state["consumed"])
        skipped = dict.fromkeys(SKIP_REASONS, 0)
        if self.dp_rank == 0:
            for state in saved:
                for reason, count in state["skipped"].items():
                    skipped[reason] = skipped.get(reason, 0) + count
        return {
            **{k: furthest[k] for k in StreamPosition._fields},
            "skipped": skipped,
            "seed": self.seed,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "kind": self.kind,
        }

    def close(self) -> None:
        """Drop the samples and the step decoded ahead (they are decoded again if needed)."""
        if isinstance(self._ahead, tuple) and isinstance(self._ahead[0], Future):
            self._ahead[0].cancel()
        self._ahead = None
        if self._results is not None:
            self._results.close()
            self._results = None

    def _problem(self, ref: SampleRef, result: Sample | Exception) -> tuple[str, str] | None:
        """Why the built sample cannot be used (skip reason, message), or None."""
        if isinstance(result, BadSample):
            return result.reason, f"{ref.name}: {result}"
        if isinstance(result, MediaError):
            return "corrupt_media", f"{ref.name}: {result}"
        if padded_length(len(result), self.pad_multiple) > self.max_length:
            return "too_long", (
                f"sample {ref.name} has {len(result)} positions, more than max_length="
                f"{self.max_length}; raise the stage's max_length or lower num_frames to train on it"
            )
        return None

    def _own_refs(self, start: StreamPosition) -> Iterator[tuple[StreamPosition, SampleRef]]:
        """This rank's samples from `start` on, each with the position just after it."""
        epoch, index, consumed = start
        while True:
            empty = True
            for i, ref in enumerate(
                epoch_stream(self.shards, self.seed, epoch, self.shuffle_buffer)
            ):
                empty = False
                if i < index:  # replaying up to a saved position: headers only, no bytes
                    continue
                consumed += 1
                if (consumed - 1) % self.dp_size == self.dp_rank:
                    yield StreamPosition(epoch, i + 1, consumed), ref
            if empty:
                raise DataError(f"the shards {self.shards[:3]}... hold no samples")
            epoch, index = epoch + 1, 0

    def _decoded(
        self, start: StreamPosition
    ) -> Iterator[tuple[StreamPosition, SampleRef, Sample | Exception]]:
        """This rank's samples built in order; with workers, `num_workers` ahead in threads."""
        refs = self._own_refs(start)
        if self._executor is None:
            for position, ref in refs:
                yield position, ref, self._build(ref)
            return
        pending = deque()
        try:
            for position, ref in refs:
                pending.append((position, ref, self._executor.submit(self._build, ref)))
                if len(pending) > self._lookahead:
                    position, ref, future = pending.popleft()
                    yield position, ref, future.result()
        finally:
            for _, _, future in pending:
                future.cancel()

    def _build(self, ref: SampleRef) -> Sample | Exception:
        try:
            return self.builder.build(self.kind, ref.name, ref.read())
        except (MediaError, BadSample) as err:
            return err


def build_pipeline(
    data: DataConfig,
    kind: str,
    tokenizer: PreTrainedTokenizerBase,
    model: ModelConfig,
    *,
    num_frames: int,
    fps: float | None,
    max_length: int,
    global_batch_size: int,
    micro_batch_size: int,
    pad_multiple: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    pack_multiple: int | None = None,
    sp_rank: int = 0,
    sp_size: int = 1,
) -> Pipeline:
    """The pipeline of one stage on one data-parallel rank (the entry point of the training loop).

    `kind` is the stage's sample kind (`caption`, `interleaved`, `conversation`, `text`) and picks
    the shard pattern `data.<kind>`; a sample is padded to `pad_multiple` and a micro-batch to
    `pack_multiple` (default `pad_multiple`; `packing.padding_multiples` gives both for a
    sequence-parallel layout). The tokenizer must hold
    the media tokens (tokenizer.ensure_media_tokens). The batches hold the frames that
    sequence-parallel rank `sp_rank` of `sp_size` encodes (all of them by default).
    """
    pack_multiple = pack_multiple or pad_multiple
    _check_layout(
        max_length,
        global_batch_size,
        micro_batch_size,
        (pad_multiple, pack_multiple),
        dp_rank,
        dp_size,
    )
    if tokenizer.pad_token_id is None:
        raise DataError("the tokenizer has no pad token; set one (Qwen2 uses <|endoftext|>)")
    builder = SampleBuilder(
        tokenizer,
        MediaLayout.from_tokenizer(tokenizer, model.tokens_per_frame),
        model.vision,
        num_frames=num_frames,
        fps=fps,
        video_resize=data.video_resize,
    )
    return Pipeline(
        expand_shards(shard_pattern(data, kind)),
        builder,
        kind,
        max_length=max_length,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        pad_multiple=pad_multiple,
        pad_id=tokenizer.pad_token_id,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        shuffle_buffer=data.shuffle_buffer,
        num_workers=data.num_workers,
        pack_multiple=pack_multiple,
        sp_rank=sp_rank,
        sp_size=sp_size,
    )


def shard_pattern(data: DataConfig, kind: str) -> str:
    """The shard pattern of `kind`: `data.<kind>`, or the synthetic cache's for data=synthetic."""
    if kind not in KINDS:
        raise ConfigError(f"unknown sample kind {kind!r}; use one of {KINDS}")
    pattern = getattr(data, kind)
    if not pattern and data.name == "synthetic":
        from longvila_mcore.data.synthetic import synthetic_paths

        pattern = synthetic_paths(data.cache_dir).shards[kind]
    if not pattern:
        raise ConfigError(
            f"data.{kind} is empty: set it to the shards of the {kind} samples "
            "(e.g. /data/x-{000000..000099}.tar; format in longvila_mcore/data/FORMAT.md)"
        )
    return pattern


def _check_layout(
    max_length: int,
    global_batch_size: int,
    micro_batch_size: int,
    multiples: tuple[int, int],
    dp_rank: int,
    dp_size: int,
) -> None:
    pad_multiple, pack_multiple = multiples
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} of {dp_size} is not a valid rank")
    if global_batch_size < 1 or global_batch_size % dp_size:
        raise ConfigError(
            f"train.global_batch_size={global_batch_size} must be a positive multiple of the "
            f"data-parallel size {dp_size}; change the batch size or the parallel layout"
        )
    if micro_batch_size < 1:
        raise ConfigError(f"train.micro_batch_size={micro_batch_size} must be >= 1")
    if pad_multiple < 1 or pack_multiple % pad_multiple:
        raise ValueError(
            f"pack_multiple={pack_multiple} must be a multiple of pad_multiple={pad_multiple} "
            "(packing.padding_multiples gives both for a sequence-parallel layout)"
        )
    if max_length < pack_multiple or max_length % pack_multiple:
        raise ConfigError(
            f"max_length={max_length} must be a positive multiple of {pack_multiple} (a pack is "
            "a multiple of ulysses x ring, and of 2 x ring with a ring); change the stage's "
            "max_length or the sequence-parallel layout"
        )


def _check_sp_rank(sp_rank: int, sp_size: int) -> None:
    if sp_size < 1 or not 0 <= sp_rank < sp_size:
        raise ValueError(f"sequence-parallel rank {sp_rank} of {sp_size} is not a valid rank")
