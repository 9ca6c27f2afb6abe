"""Video needle-in-a-haystack (V-NIAH): `[torchrun --nproc-per-node N] python -m
longvila_mcore.eval.needle --load CKPT --out DIR [--haystack synthetic|VIDEO] [--needles DIR]
[--lengths 16,32,...] [--depths 0,25,...] [--fps F] [--seed S] [--ulysses U] [--ring R]`.

For every haystack length (frames) and needle depth (percent), each needle picture is inserted
into the haystack at that depth, its question asked, and the answer scored as LongVILA does it
(scoring.py). Writes DIR/results.json and DIR/heatmap.png (results.py); cells already in
results.json are skipped. Under torchrun the ranks are the sequence-parallel group (`--ulysses`
x `--ring`; tensor parallel over what is left), so a haystack longer than one rank's memory
fits. Format of a needle folder and the synthetic haystack: docs/needle_eval.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from longvila_mcore.checkpoint.load import load_for_inference
from longvila_mcore.config import TOKEN_ORDERS, ParallelConfig
from longvila_mcore.data.layout import MediaLayout
from longvila_mcore.data.media import VIDEO_RESIZES
from longvila_mcore.data.tokenizer import encode_text
from longvila_mcore.errors import ConfigError, UserError
from longvila_mcore.eval import results as out_files
from longvila_mcore.eval.haystack import (
    SYNTHETIC,
    folder_needles,
    generated_needles,
    load_haystack,
)
from longvila_mcore.eval.scoring import FrameCache, score_answer, teacher_forced_batch
from longvila_mcore.runtime import (
    default_device,
    default_dtype,
    init_distributed,
    init_model_parallel,
)

log = logging.getLogger("longvila_mcore.eval.needle")

DEFAULT_LENGTHS = (8, 16, 32, 48, 64, 96, 128)
DEFAULT_DEPTHS = (0, 25, 50, 75, 100)


def _numbers(kind: type, what: str):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"{what} {text!r}: give comma-separated numbers"
            ) from err
        if not values:
            raise argparse.ArgumentTypeError(f"{what} {text!r} is empty")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m longvila_mcore.eval.needle", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--load", required=True, help="checkpoint of ours or VILA-layout HF directory")
    p.add_argument("--out", required=True, type=Path, help="directory for results.json, heatmap")
    p.add_argument(
        "--haystack",
        default=SYNTHETIC,
        help="a video file (sampled at --fps from its start) or 'synthetic' (default)",
    )
    p.add_argument("--needles", default=None, help="needle folder (default: the generated 12)")
    p.add_argument(
        "--lengths",
        type=_numbers(int, "--lengths"),
        default=list(DEFAULT_LENGTHS),
        help="haystack lengths in frames, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--depths",
        type=_numbers(float, "--depths"),
        default=list(DEFAULT_DEPTHS),
        help="needle depths in percent, comma-separated (default: %(default)s)",
    )
    p.add_argument("--fps", type=float, default=1.0, help="sampling rate of a video haystack")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic haystack")
    p.add_argument("--ulysses", type=int, default=1)
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--token-order", choices=TOKEN_ORDERS, default=None)
    p.add_argument("--video-resize", choices=VIDEO_RESIZES, default="rgb")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The errors a user can make in the options, as one message each."""
    if min(args.lengths) < 1:
        raise ConfigError(f"--lengths {args.lengths}: every length must be >= 1 frame")
    if not all(0 <= d <= 100 for d in args.depths):
        raise ConfigError(f"--depths {args.depths}: depths are percentages from 0 to 100")
    if args.fps <= 0:
        raise ConfigError(f"--fps {args.fps} must be > 0")


def evaluation_config(args: argparse.Namespace) -> dict:
    """What results.json records of the run (the grid, and what must match to resume)."""
    return {
        "load": str(Path(args.load).resolve()),
        "haystack": args.haystack
        if args.haystack == SYNTHETIC
        else str(Path(args.haystack).resolve()),
        "needles": str(Path(args.needles).resolve()) if args.needles else "generated",
        "fps": args.fps if args.haystack != SYNTHETIC else None,
        "seed": args.seed if args.haystack == SYNTHETIC else None,
        "token_order": args.token_order,
        "video_resize": args.video_resize,
        "lengths": sorted(set(args.lengths)),
        "depths": sorted(set(args.depths)),
    }


def evaluate(args: argparse.Namespace, parallel: ParallelConfig) -> dict | None:
    """Run the grid's missing cells; returns the results (on rank 0; None elsewhere)."""
    start = time.perf_counter()
    rank0 = dist.get_rank() == 0
    device = default_device()
    config = evaluation_config(args)
    out: Path = args.out
    cells, time_before = out_files.load_previous(out, config)
    done = {out_files.cell_key(c["frames"], c["depth"]) for c in cells}
    todo = [
        (n, d)
        for n in config["lengths"]
        for d in config["depths"]
        if out_files.cell_key(n, d) not in done
    ]
    loaded = load_for_inference(
        args.load, parallel, device, default_dtype(device), args.token_order
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    vision = model.cfg.vision
    needles = folder_needles(args.needles, vision) if args.needles else generated_needles(vision)
    layout = MediaLayout.from_tokenizer(tokenizer, model.cfg.tokens_per_frame)
    longest = max(config["lengths"])
    haystack = load_haystack(
        args.haystack, longest, vision, fps=args.fps, seed=args.seed, resize=args.video_resize
    )
    needle_pixels = torch.cat([n.image for n in needles])
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=len(todo) * len(needles), disable=not rank0, unit="needle", desc="V-NIAH")
    results = None
    for length in sorted({n for n, _ in todo}):
        cache = FrameCache(model, haystack[:length], needle_pixels)
        for depth in [d for n, d in todo if n == length]:
            scores = []
            for k, needle in enumerate(needles):
                frames = cache.frame_ids(depth / 100, k)
                answer = encode_text(tokenizer, needle.answer)
                batch = teacher_forced_batch(
                    tokenizer, layout, needle.question, answer, frames, 2 * parallel.token_split
                ).to(device)
                scores.append(score_answer(model, batch, cache.encode))
                progress.update()
            correct = sum(s.found for s in scores)
            cells.append(
                {
                    "frames": length,
                    "depth": depth,
                    "correct": correct,
                    "needles": len(needles),
                    "accuracy": correct / len(needles),
                    "logprob": sum(s.logprob for s in scores) / len(scores),
                    "missed": [n.name for n, s in zip(needles, scores) if not s.found],
                }
            )
            if rank0:
                elapsed = time_before + time.perf_counter() - start
                results = out_files.write_results(
                    out, config, cells, loaded.trained_frames, elapsed
                )
    progress.close()
    if rank0:
        results = out_files.write_results(
            out, config, cells, loaded.trained_frames, time_before + time.perf_counter() - start
        )
        out_files.write_heatmap(out, results)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_args(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = default_device()
    init_distributed(device)
    try:
        sp = args.ulysses * args.ring
        world = dist.get_world_size()
        if args.ulysses < 1 or args.ring < 1 or world % sp:
            raise ConfigError(
                f"--ulysses {args.ulysses} x --ring {args.ring} must be >= 1 and divide the "
                f"{world} ranks (torchrun --nproc-per-node); the rest is tensor parallel"
            )
        parallel = ParallelConfig(tp=world // sp, ulysses=args.ulysses, ring=args.ring)
        init_model_parallel(parallel)
        results = evaluate(args, parallel)
    except UserError as err:  # CheckpointError is one
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if results is not None:
        print(
            f"average {results['average']:.3f}, within training "
            f"({results['trained_frames']} frames): {results['average_within_training']}; "
            f"{args.out / out_files.RESULTS_FILE}, {args.out / out_files.HEATMAP_FILE}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
