"""tools/make_shards.py throughput: samples/s converting LLaVA-style data, 1 and 2 workers.

Two inputs made here: JPEG images (640 x 480) and H.264 videos of 64 frames (640 x 360), both a
filmed-like scene (tests/vila_reference.py), one medium per conversation. Each is converted
with 1 and 2 checking processes, interleaved, best of `--repeats`; every medium is fully
decoded (that is the check), so videos cost their whole decode. The outputs of both worker
counts are checked to be byte-identical.

Prints a table and writes bench/results/make_shards.json; with --json the last line of stdout
is the same results as one JSON object.

    python bench/make_shards.py [--images 64] [--videos 8] [--repeats 2] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the filmed-like scene comes from the tests' references

from PIL import Image  # noqa: E402

from longvila_mcore.data.shards import convert_llava  # noqa: E402
from tests.vila_reference import h264_clip, scene_frames  # noqa: E402

IMAGE_SIZE = (480, 640)
VIDEO_SIZE, VIDEO_FRAMES = (360, 640), 64
WORKERS = (1, 2)


def make_inputs(root: Path, images: int, videos: int) -> dict[str, tuple[Path, int]]:
    """The JSON file of each input kind and its media bytes."""
    media = root / "media"
    media.mkdir()
    entries: dict[str, list] = {"images": [], "videos": []}
    frames = scene_frames(images, *IMAGE_SIZE)
    for i, frame in enumerate(frames):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
        (media / f"{i}.jpg").write_bytes(buffer.getvalue())
        entries["images"].append({"id": f"i{i}", "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is there?"},
            {"from": "gpt", "value": "shapes"}]})  # fmt: skip
    for i in range(videos):
        clip = h264_clip(scene_frames(VIDEO_FRAMES, *VIDEO_SIZE, seed=i), rate=30)
        (media / f"{i}.mp4").write_bytes(clip)
        entries["videos"].append({"id": f"v{i}", "video": f"{i}.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat moves?"},
            {"from": "gpt", "value": "shapes"}]})  # fmt: skip
    out = {}
    for kind, items in entries.items():
        path = root / f"{kind}.json"
        path.write_text(json.dumps(items))
        size = sum((media / (e.get("image") or e["video"])).stat().st_size for e in items)
        out[kind] = (path, size)
    return out


def convert_time(source: Path, media: Path, out: Path, workers: int) -> tuple[float, bytes]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = convert_llava(source, media, str(out / "s-%04d.tar"), samples_per_shard=16,
                            workers=workers)  # fmt: skip
    seconds = time.perf_counter() - start
    return seconds, b"".join(Path(p).read_bytes() for p in summary.shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timings of each case (best kept)")
    parser.add_argument("--json", action="store_true", help="end stdout with the results as JSON")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = make_inputs(root, args.images, args.videos)
        for kind, (source, size) in inputs.items():
            count = args.images if kind == "images" else args.videos
            best = dict.fromkeys(WORKERS, float("inf"))
            shards = {}
            for _ in range(args.repeats):  # worker counts interleaved: a busy moment hits both
                for workers in WORKERS:
                    seconds, shards[workers] = convert_time(
                        source, root / "media", root / "out", workers
                    )
                    best[workers] = min(best[workers], seconds)
            row = {"input": kind, "samples": count, "media_mib": size / 2**20,
                   "identical_shards": len(set(shards.values())) == 1}  # fmt: skip
            for workers in WORKERS:
                row[f"samples_s_{workers}w"] = count / best[workers]
                row[f"mib_s_{workers}w"] = size / 2**20 / best[workers]
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(
        f"\nLLaVA JSON to shards, every medium decoded: images {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]} "
        f"JPEG, videos {VIDEO_FRAMES} frames {VIDEO_SIZE[1]}x{VIDEO_SIZE[0]} H.264"
    )
    print(
        f"{'input':<8} {'samples':>8} {'MiB':>6} {'1 worker/s':>11} {'2 workers/s':>12}"
        f" {'speed-up':>9} {'MiB/s (2w)':>11} {'identical':>10}"
    )
    for r in rows:
        print(
            f"{r['input']:<8} {r['samples']:>8} {r['media_mib']:>6.1f} {r['samples_s_1w']:>11.1f}"
            f" {r['samples_s_2w']:>12.1f} {r['samples_s_2w'] / r['samples_s_1w']:>9.2f}"
            f" {r['mib_s_2w']:>11.1f} {str(r['identical_shards']):>10}"
        )
    results = {"make_shards": rows}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "make_shards.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
