"""Answer a question about videos and images: `python -m longvila_mcore.generate --load DIR
--video PATH [--video PATH ...] [--image PATH ...] --prompt TEXT [--num-frames N]
[--max-new-tokens K] [--video-resize rgb|yuv] [--json] [--token-order raster|legacy]`.

DIR is a VILA-layout HF checkpoint or a checkpoint this project wrote. Each video is decoded with
PyAV, `--num-frames` frames are sampled uniformly and preprocessed for the tower as VILA does it
(`--video-resize yuv`: the faster resize before the conversion to RGB), images take the same
path. The prompt goes through the tokenizer's chat template with the media as VILA's
LLaVADataset places them in training: images then videos, each in the order given, their tokens
opening the user turn (`<image><vila/video>` + prompt). Decoding is greedy with a KV cache.
Under torchrun, the ranks split the model tensor-parallel. The projector's token
order is the one the checkpoint records (raster for a released VILA-layout directory) unless
`--token-order` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from longvila_mcore.checkpoint.hf import CheckpointError
from longvila_mcore.checkpoint.load import load_for_inference
from longvila_mcore.config import TOKEN_ORDERS, ParallelConfig
from longvila_mcore.data.batch import IGNORE_INDEX, Batch
from longvila_mcore.data.chat import render_prompt
from longvila_mcore.data.layout import MediaLayout
from longvila_mcore.data.media import VIDEO_RESIZES, MediaError, load_image, load_video
from longvila_mcore.data.tokenizer import IM_END, token_id
from longvila_mcore.models.longvila import LongVILAModel
from longvila_mcore.models.qwen2 import Qwen2Model
from longvila_mcore.parallel.core_attention import KVCache
from longvila_mcore.runtime import (
    default_device,
    default_dtype,
    init_distributed,
    init_model_parallel,
)

log = logging.getLogger("longvila_mcore.generate")


@contextlib.contextmanager
def kv_cache(llm: Qwen2Model) -> Iterator[None]:
    """Give every decoder layer's attention a fresh KV cache for the duration of the block."""
    attentions = [layer.self_attention.core_attention for layer in llm.decoder.layers]
    for attention in attentions:
        attention.kv_cache = KVCache()
    try:
        yield
    finally:
        for attention in attentions:
            attention.kv_cache = None


def _next_token(llm: Qwen2Model, hidden_last: torch.Tensor) -> int:
    logits = gather_from_tensor_model_parallel_region(llm.logits(hidden_last))
    return int(logits[-1, 0, : llm.true_vocab_size].argmax())


@torch.no_grad()
def greedy_generate(
    model: LongVILAModel,
    input_ids: torch.Tensor,
    media_index: torch.Tensor,
    frames: torch.Tensor,
    max_new_tokens: int,
    stop_id: int,
) -> list[int]:
    """Greedy continuation of one prompt `[S]` whose media positions read `frames`."""
    model.eval()
    length = input_ids.shape[0]
    device = frames.device
    prompt = Batch(
        input_ids=input_ids,
        media_index=media_index,
        labels=torch.full_like(input_ids, IGNORE_INDEX),
        position_ids=torch.arange(length),
        cu_seqlens=torch.tensor([0, length]),
        frames=frames,
    ).to(device)
    llm = model.llm
    tokens: list[int] = []
    with kv_cache(llm):
        hidden = llm.hidden_states(model.embed(prompt), prompt.position_ids[None])
        for position in range(length, length + max_new_tokens):
            tokens.append(_next_token(llm, hidden[-1:]))
            if tokens[-1] == stop_id:
                break
            ids = torch.tensor([[tokens[-1]]], device=device)
            hidden = llm.hidden_states(llm.embed(ids), torch.tensor([[position]], device=device))
    return tokens


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
    p.add_argument("--prompt", required=True, help="question about the media")
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames to sample (default: the checkpoint's num_video_frames, else 8)",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
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
        "--json", action="store_true", help='end stdout with {"text": ..., "token_ids": [...]}'
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = default_device()
    init_distributed(device)
    parallel = ParallelConfig(tp=dist.get_world_size())
    init_model_parallel(parallel)
    try:
        loaded = load_for_inference(
            args.load, parallel, device, default_dtype(device), args.token_order
        )
        vision = loaded.model.cfg.vision
        num_frames = args.num_frames or loaded.num_video_frames
        # VILA's order (LLaVADataset): the images, then the videos.
        media = [load_image(path, vision) for path in args.image] + [
            load_video(path, num_frames, vision, resize=args.video_resize) for path in args.video
        ]
    except (CheckpointError, MediaError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = loaded.tokenizer
    layout = MediaLayout.from_tokenizer(tokenizer, loaded.model.cfg.tokens_per_frame)
    kinds = ["image"] * len(args.image) + ["video"] * len(args.video)
    prompt = layout.expand(
        render_prompt(tokenizer, args.prompt, kinds), [len(frames) for frames in media]
    )
    size = vision.image_size
    tokens = greedy_generate(
        loaded.model,
        prompt.input_ids,
        prompt.media_index,
        torch.cat(media).to(device) if media else torch.empty(0, 3, size, size, device=device),
        args.max_new_tokens,
        token_id(tokenizer, IM_END),
    )
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if dist.get_rank() == 0:
        print(text)
        if args.json:
            print(json.dumps({"text": text, "token_ids": tokens}))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
