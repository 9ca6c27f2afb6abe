"""Answer questions about videos and images: `[torchrun --nproc-per-node N] python -m
longvila_mcore.generate --load DIR --video PATH [--video PATH ...] [--image PATH ...] --prompt TEXT
[--prompt TEXT ...] [--num-frames N] [--max-new-tokens K] [--temperature T --top-p P --seed S]
[--stop TEXT ...] [--ulysses U] [--ring R] [--tp T] [--video-resize rgb|yuv] [--json]
[--token-order raster|legacy]`.

DIR is a VILA-layout HF checkpoint or a checkpoint this project wrote. Each video is decoded with
PyAV, `--num-frames` frames are sampled uniformly and preprocessed for the tower as VILA does it
(`--video-resize yuv`: the faster resize before the conversion to RGB), images take the same
path. The prompt goes through the tokenizer's chat template with the media as VILA's
LLaVADataset places them in training: images then videos, each in the order given, their tokens
opening the user turn (`<image><vila/video>` + prompt). The projector's token order is the one
the checkpoint records (raster for a released VILA-layout directory) unless `--token-order` says
otherwise.

Under torchrun the N = tp x ulysses x ring ranks split the model tensor-parallel and the sequence
over ulysses x ring: each rank decodes only the frames it encodes; the media and the text before
the questions are prefilled through the image-first sharder and the 2D attention, and their KV
cache stays sharded where it was computed (inference/session.py). Several `--prompt`s are answered one after the other about the same
prefilled media (encoded once). Decoding is greedy unless `--temperature` > 0. Rank 0 streams
each answer to stdout, one line per prompt; with `--json` each answer's line is followed by
`{"text": ..., "token_ids": [...]}` (the last line of stdout is the last answer's).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch
import torch.distributed as dist

from longvila_mcore.checkpoint.load import load_for_inference
from longvila_mcore.config import TOKEN_ORDERS, ParallelConfig
from longvila_mcore.data.batch import frame_block
from longvila_mcore.data.chat import render_prompt
from longvila_mcore.data.layout import Expanded, MediaLayout
from longvila_mcore.data.media import VIDEO_RESIZES, probe_image, probe_video
from longvila_mcore.data.packing import load_frames
from longvila_mcore.data.tokenizer import IM_END, token_id
from longvila_mcore.errors import ConfigError, UserError
from longvila_mcore.inference.sampling import Sampler, TextStream
from longvila_mcore.inference.session import Session
from longvila_mcore.models.longvila import LongVILAModel
from longvila_mcore.runtime import (
    default_device,
    default_dtype,
    init_distributed,
    init_model_parallel,
)

log = logging.getLogger("longvila_mcore.generate")


@torch.no_grad()
def greedy_generate(
    model: LongVILAModel,
    input_ids: torch.Tensor,
    media_index: torch.Tensor,
    frames: torch.Tensor,
    max_new_tokens: int,
    stop_id: int,
) -> list[int]:
    """Greedy continuation of one prompt `[S]` whose media positions read `frames`, on the
    model's sequence-parallel layout (every rank calls it alike)."""
    with Session(model, input_ids, media_index, frames, pad_id=0) as session:
        return session.answer([], max_new_tokens, stop_id)


def split_prompts(prompts: list[Expanded]) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """The prefix every prompt starts with (`input_ids`, `media_index`: the media and the text
    around them, prefilled once) and each prompt's remaining tokens. With several prompts each
    keeps at least one token of its own (its last token's logits start its answer)."""
    ids = [p.input_ids.tolist() for p in prompts]
    common = min(len(x) for x in ids) - (len(ids) > 1)
    for other in ids[1:]:
        common = next((i for i in range(common) if other[i] != ids[0][i]), common)
    if any(bool((p.media_index[common:] >= 0).any()) for p in prompts):
        raise ConfigError("the prompts must differ only after the media (it is prefilled once)")
    first = prompts[0]
    return first.input_ids[:common], first.media_index[:common], [x[common:] for x in ids]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m longvila_mcore.generate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--load", required=True, help="VILA-layout HF directory or a checkpoint of ours")
    p.add_argument(
        "--video",
        action="append",
        default=[],
        help="video file (anything PyAV decodes); repeat for several",
    )
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="question about the media; repeat for several (answered in turn, media encoded once)",
    )
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames to sample (default: the checkpoint's num_video_frames, else 8)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample among the most likely tokens whose probabilities reach this (default 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        help="end the answer before this text; repeat for several",
    )
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses sequence-parallel size")
    p.add_argument("--ring", type=int, default=1, help="ring sequence-parallel size")
    p.add_argument(
        "--tp",
        type=int,
        default=None,
        help="tensor-parallel size (default: the ranks left by ulysses x ring)",
    )
    p.add_argument(
        "--video-resize",
        choices=VIDEO_RESIZES,
        default="rgb",
        help="rgb: frames decoded to RGB at their own size, then Pillow bicubic, as VILA prepares "
        "them (default); yuv: resized by swscale before the conversion to RGB, faster",
    )
    p.add_argument(
        "--token-order",
        choices=TOKEN_ORDERS,
        default=None,
        help="projector token order: raster (Qwen2 LongVILA releases) or legacy (VILA1.5-era "
        "checkpoints); default: the one the checkpoint records, else raster",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='follow each answer with a line {"text": ..., "token_ids": [...]}',
    )
    return p.parse_args(argv)


def parallel_layout(args: argparse.Namespace, world: int) -> ParallelConfig:
    """tp x ulysses x ring filling the world (every rank works on the one generation)."""
    sp = args.ulysses * args.ring
    tp = args.tp if args.tp is not None else max(world // max(sp, 1), 1)
    # Decoding runs one token at a time: nothing to split further over tensor-parallel ranks.
    parallel = ParallelConfig(tp=tp, ulysses=args.ulysses, ring=args.ring, sequence_parallel=False)
    if parallel.data_parallel_size(world) != 1:
        raise ConfigError(
            f"tp x ulysses x ring = {tp} x {args.ulysses} x {args.ring} must equal the {world} "
            "ranks; change --tp / --ulysses / --ring or --nproc-per-node"
        )
    return parallel


def generate(args: argparse.Namespace, parallel: ParallelConfig) -> list[dict]:
    """Every prompt's answer `{"text", "token_ids"}` (the same on every rank); rank 0 streams
    them to stdout. Raises user errors (CheckpointError, MediaError, ValueError)."""
    device = default_device()
    sampler = Sampler(args.temperature, args.top_p, args.seed)
    loaded = load_for_inference(
        args.load, parallel, device, default_dtype(device), args.token_order
    )
    vision = loaded.model.cfg.vision
    num_frames = args.num_frames or loaded.num_video_frames
    # VILA's order (LLaVADataset): the images, then the videos. Probed from their containers;
    # this rank decodes only the frames it encodes.
    media = [probe_image(path, vision) for path in args.image] + [
        probe_video(path, num_frames, vision, resize=args.video_resize) for path in args.video
    ]
    total = sum(len(medium) for medium in media)
    sp = loaded.model.sp
    block = frame_block(total, sp.rank, sp.size)
    frames = load_frames(media, block.start, block.stop)
    if not media:
        size = vision.image_size
        frames = torch.empty(0, 3, size, size)
    tokenizer = loaded.tokenizer
    layout = MediaLayout.from_tokenizer(tokenizer, loaded.model.cfg.tokens_per_frame)
    kinds = ["image"] * len(args.image) + ["video"] * len(args.video)
    prompts = [
        layout.expand(render_prompt(tokenizer, prompt, kinds), [len(medium) for medium in media])
        for prompt in args.prompt
    ]
    input_ids, media_index, questions = split_prompts(prompts)
    printing = dist.get_rank() == 0
    answers = []
    pad_id = tokenizer.pad_token_id or 0
    with Session(
        loaded.model, input_ids, media_index, frames.to(device), pad_id, None, total, block.start
    ) as session:
        for question in questions:
            stream = TextStream(tokenizer, args.stop, _write if printing else None)
            tokens = session.answer(
                question, args.max_new_tokens, token_id(tokenizer, IM_END), sampler, stream
            )
            answers.append({"text": stream.finish(), "token_ids": tokens})
            if printing:
                print(flush=True)
                if args.json:
                    print(json.dumps(answers[-1]), flush=True)
    return answers


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = default_device()
    init_distributed(device)
    try:
        parallel = parallel_layout(args, dist.get_world_size())
        init_model_parallel(parallel)
        generate(args, parallel)
    except UserError as err:  # CheckpointError and MediaError are ones
        if dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
