"""Long-video inference with sequence parallelism: prefill time and per-rank peak memory against
frames for SP = 1, 2 and 4 gloo ranks (1 x 1, Ulysses 2, Ulysses 2 x ring 2), the longest
haystack each answers about under a per-rank memory cap, and decoding tokens/s with the sharded
KV cache against one process.

The model is the tiny recipe's (`longvila_tiny`: 4 projector tokens + a newline per frame) with
random weights. A haystack of F frames is the prompt of `generate`: system and user text, the
F frames, a question (5 F + 33 tokens). Each rank makes the pixels of its own block of frames
only (the sharder's `encode` hook, as per-rank video decoding does), so nothing of size F x
pixels is replicated. Every layout runs in fresh processes, one after the other.

- prefill s: the Session's prefill (tower on the rank's frames, projector, decoder over the
  rank's shard, KV cache kept), the slowest rank.
- peak MiB per rank: parameters + the largest total size of live tensor storage during the
  prefill and the decoding (activations, KV cache, frame features, the replicated integer
  layout), counted at every aten op (bench/sp_attention.py's PeakMemory), the largest rank.
- frames are doubled from `--frames` until the peak passes `--cap-mib`: the last that fits is
  the longest haystack the layout answers about under the cap.
- decode tok/s: `--decode` greedy tokens after the prefill of the longest haystack SP=1 fits,
  timed without the memory counting; each token attends to every rank's shard of the cache.

Ranks share this machine's 2 cores, so SP times show communication and redundancy, not speed-up.

    python bench/inference.py [--frames 64] [--cap-mib 16] [--decode 16] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sp_attention import PeakMemory  # noqa: E402

LAYOUTS = {1: (1, 1), 2: (2, 1), 4: (2, 2)}  # SP size -> (ulysses, ring)
MIB = 2**20
TEXT_BEFORE, TEXT_AFTER = 20, 13  # tokens around the frames, as a rendered prompt has


def haystack_prompt(frames: int, tokens_per_frame: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and media_index of a prompt with `frames` frames (each tokens and a newline)."""
    g = torch.Generator().manual_seed(frames)
    media = [-1] * TEXT_BEFORE
    for f in range(frames):
        media += [f * tokens_per_frame + t for t in range(tokens_per_frame)] + [-1]
    media = torch.tensor(media + [-1] * TEXT_AFTER)
    ids = torch.randint(0, 500, (len(media),), generator=g)
    return ids, media


def run_layout(sp: int, args, model, frames: int, count_memory: bool, decode: int) -> dict:
    """One prefill (and `decode` tokens) of a haystack of `frames` on this layout."""
    from longvila_mcore.inference.session import Session

    cfg = model.cfg
    ids, media = haystack_prompt(frames, cfg.tokens_per_frame)
    size = cfg.vision.image_size

    def encode(block_ids: torch.Tensor) -> torch.Tensor:
        # This rank's frames only, made from their ids (a video decoder would read them).
        g = torch.Generator().manual_seed(int(block_ids[0]) if len(block_ids) else 0)
        return model.encode_frames(torch.randn(len(block_ids), 3, size, size, generator=g))

    memory = PeakMemory() if count_memory else None
    dist.barrier()
    start = time.perf_counter()
    with (
        memory if memory is not None else contextlib.nullcontext(),
        Session(model, ids, media, torch.arange(frames), 0, encode) as session,
    ):
        prefill = time.perf_counter() - start
        dist.barrier()
        start = time.perf_counter()
        tokens = session.answer([], decode, stop_id=-1) if decode else []
        decoding = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    numbers = torch.tensor(
        [prefill, decoding, memory.peak if memory is not None else 0, session.cache.length],
        dtype=torch.float64,
    )
    dist.all_reduce(numbers, op=dist.ReduceOp.MAX)
    return {
        "sp": sp,
        "frames": frames,
        "tokens": len(ids),
        "prefill_s": float(numbers[0]),
        "peak_mib": (float(numbers[2]) + weights) / MIB,
        "cache_entries_max_rank": int(numbers[3]),
        "decode_tok_s": len(tokens) / float(numbers[1]) if decode else None,
        "answer": tokens,
    }


def _worker(rank: int, sp: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(sp), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=sp)
    from longvila_mcore.config import ParallelConfig, model_preset
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_model_parallel

    ulysses, ring = LAYOUTS[sp]
    parallel = ParallelConfig(ulysses=ulysses, ring=ring)
    init_model_parallel(parallel)
    torch.manual_seed(0)
    model = LongVILAModel(model_preset("longvila_tiny"), parallel, torch.device("cpu")).eval()
    rows, frames = [], args.frames
    while True:
        row = run_layout(sp, args, model, frames, count_memory=True, decode=2)
        rows.append(row)
        if row["peak_mib"] > args.cap_mib or frames >= args.max_frames:
            break
        frames *= 2
    # SP=1 times decoding at the longest haystack it fits; the others at the same length.
    fits = longest_fitting(rows, args.cap_mib)
    decode_at = args.decode_frames or (fits["frames"] if fits else args.frames)
    timed = run_layout(sp, args, model, decode_at, count_memory=False, decode=args.decode)
    if rank == 0:
        queue.put({"rows": rows, "decode": timed})
    dist.barrier()
    dist.destroy_process_group()


def measure(sp: int, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    context = mp.start_processes(
        _worker, args=(sp, port, args, queue), nprocs=sp, join=False, start_method="spawn"
    )
    result = queue.get()
    context.join()
    return result


def longest_fitting(rows: list[dict], cap: float) -> dict | None:
    fitting = [r for r in rows if r["peak_mib"] <= cap]
    return fitting[-1] if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=64, help="first haystack length (doubled)")
    parser.add_argument("--max-frames", type=int, default=8192, help="stop doubling here")
    parser.add_argument("--cap-mib", type=float, default=16.0, help="per-rank memory cap")
    parser.add_argument("--decode", type=int, default=16, help="tokens timed for decode tok/s")
    parser.add_argument("--json", action="store_true", help="print the results as JSON last")
    args = parser.parse_args()

    args.decode_frames = 0
    results = {1: measure(1, args)}
    args.decode_frames = results[1]["decode"]["frames"]
    for sp in (2, 4):
        results[sp] = measure(sp, args)
    report(args, results)


def report(args, results: dict) -> None:
    cap = args.cap_mib
    print(f"per-rank peak memory (MiB) and prefill time (s) against frames; cap {cap:g} MiB")
    lengths = sorted({r["frames"] for res in results.values() for r in res["rows"]})
    header = f"{'frames':>7}{'tokens':>8}" + "".join(
        f"{'SP' + str(sp) + ' MiB':>11}{'s':>7}" for sp in results
    )
    print(header)
    for frames in lengths:
        line, tokens = "", ""
        for res in results.values():
            row = next((r for r in res["rows"] if r["frames"] == frames), None)
            if row is None:
                line += f"{'-':>11}{'-':>7}"
                continue
            tokens = row["tokens"]
            mark = "*" if row["peak_mib"] > cap else " "
            line += f"{row['peak_mib']:>10.2f}{mark}{row['prefill_s']:>7.2f}"
        print(f"{frames:>7}{tokens:>8}{line}")
    print("* over the cap")

    single = longest_fitting(results[1]["rows"], cap)
    summary = {}
    print(f"\n{'SP':>3}{'layout':>8}{'longest frames':>16}{'tokens':>8}{'decode tok/s':>14}"
          f"{'peak vs SP1':>13}")  # fmt: skip
    for sp, res in results.items():
        best = longest_fitting(res["rows"], cap)
        at_single = next(
            (r for r in res["rows"] if single and r["frames"] == single["frames"]), None
        )
        ratio = at_single["peak_mib"] / single["peak_mib"] if at_single and single else None
        decode = res["decode"]
        summary[sp] = {
            "layout": "x".join(map(str, LAYOUTS[sp])),
            "longest_frames": best["frames"] if best else 0,
            "longest_tokens": best["tokens"] if best else 0,
            "decode_frames": decode["frames"],
            "decode_tok_s": decode["decode_tok_s"],
            "peak_ratio_at_sp1_longest": ratio,
        }
        print(f"{sp:>3}{summary[sp]['layout']:>8}{summary[sp]['longest_frames']:>16}"
              f"{summary[sp]['longest_tokens']:>8}{decode['decode_tok_s']:>14.1f}"
              f"{ratio if ratio is not None else float('nan'):>13.3f}")  # fmt: skip
    answers = {sp: res["decode"]["answer"] for sp, res in results.items()}
    same = all(a == answers[1] for a in answers.values())
    print(f"\ndecoded tokens at {results[1]['decode']['frames']} frames equal across SP: {same}")
    target = summary[4]["peak_ratio_at_sp1_longest"]
    print(f"SP=4 / SP=1 per-rank peak at SP=1's longest haystack: {target:.3f} (target <= 0.35)")
    if args.json:
        rows = {sp: [{k: v for k, v in r.items() if k != "answer"} for r in res["rows"]]
                for sp, res in results.items()}  # fmt: skip
        print(json.dumps({"cap_mib": cap, "rows": rows, "summary": summary, "same_tokens": same}))


if __name__ == "__main__":
    main()
