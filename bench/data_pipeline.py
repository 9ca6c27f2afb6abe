"""Data pipeline throughput against what a training step consumes, and the two frame resizes.

1. Video frames, `data.video_resize` `rgb` (VILA's preprocessing, the default) against `yuv`
   (swscale resizes in YUV 4:2:0): H.264 clips of a filmed-like scene (smooth gradients, sharp
   coloured shapes, noise; tests/vila_reference.py) at common sizes, 16 frames sampled uniformly
   from 64 and brought to the releases' 384 px by `load_video`: sampled frames/s of each mode
   (whole calls: every frame up to the last sampled one is decoded) and CPU ms per sampled frame
   (steadier on shared cores), of VILA's own recipe (OpenCV seeking each frame + transformers'
   PIL SigLIP processor) for scale, and each mode's difference
   from VILA's frames: max, mean and 99th percentile of |ours - VILA| in the releases' normalised
   units (mean = std = 0.5, so [-1, 1]; one level is 0.0078).
2. For each model shape: the stage-5 pipeline on the synthetic needle videos (PyAV decoding,
   uniform sampling, resize to the tower size, chat template, packing) in decoded frames/s and
   samples/s, with 0 and 2 decode threads, in both resize modes (the videos are 56 px, so the
   modes differ little here: section 1 is where the native size matters); then one training step
   (forward + backward of LongVILAModel, fp32, this CPU) on the same batches, in frames/s
   consumed. For the 1.5B shape the GPU consumption is also estimated from FLOPs (6 x parameters
   x tokens at 40% of an A100's 312 bf16 TFLOP/s), since that is where the model would train.
3. Frames per sequence-parallel rank: a 60 s clip (320x240 at 30 frames/s, a keyframe every 2 s,
   as streaming encoders place them), 128 frames sampled uniformly and brought to 384 px, over
   N = 1, 2 and 4 ranks. Each rank probes the container and decodes only its block of the frames
   (`probe_video`, `VideoFrames.load`); per N the slowest rank's time (wall and CPU, best of
   `--repeats`) and the most frame bytes a rank holds, as ratios to N = 1 (target: <= 1.2 / N).
   With --json the last line also carries `"decode_per_rank_ratio": {"2": r2, "4": r4}`, of CPU
   time (all threads of the process): the wall time of a shared machine is mostly waiting.

Prints tables and writes bench/results/data_pipeline.json; with --json the last line of stdout is
the same results as one JSON object. Needs the dev extra (OpenCV for VILA's recipe).

    python bench/data_pipeline.py [--steps 4] [--skip-1.5b-step] [--decode-only] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import av
import torch
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # VILA's recipe and the test clips come from the tests' references

from longvila_mcore.config import (  # noqa: E402
    DataConfig,
    ModelConfig,
    ParallelConfig,
    VisionConfig,
    model_preset,
)
from longvila_mcore.data.batch import frame_block  # noqa: E402
from longvila_mcore.data.media import VIDEO_RESIZES, load_video, probe_video  # noqa: E402
from longvila_mcore.data.pipeline import build_pipeline  # noqa: E402
from longvila_mcore.data.synthetic import synthetic_paths  # noqa: E402
from longvila_mcore.data.tokenizer import ensure_media_tokens  # noqa: E402
from longvila_mcore.models.longvila import LongVILAModel  # noqa: E402
from longvila_mcore.runtime import init_distributed, init_model_parallel  # noqa: E402
from tests.vila_reference import (  # noqa: E402
    h264_clip,
    pil_siglip_processor,
    scene_frames,
    vila_video_frames,
)

A100_BF16_FLOPS = 312e12
MFU = 0.4

TINY = model_preset("longvila_tiny")
QWEN2_1_5B = model_preset("longvila_1.5b")

CLIP_SIZES = ((320, 240), (640, 360), (360, 640), (1280, 720))
"""(width, height) of the frame-resize clips: the issue's 320x240, 360p both ways, 720p."""
CLIP_FRAMES, SAMPLED = 64, 16
TOWER = VisionConfig(image_size=384)  # the releases' size, mean and std
SP_SIZES = (1, 2, 4)
LONG_CLIP = dict(seconds=60, rate=30, keyframe_every=60, width=320, height=240, sampled=128)


def elapsed(function, *args, **kwargs) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process) one call takes; the CPU time varies
    less than the wall time when other jobs share the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def frame_resizes(repeats: int) -> list[dict]:
    """Per clip size: sampled frames/s of each resize mode and of VILA's recipe, and each mode's
    difference from VILA's frames."""
    processor = pil_siglip_processor(TOWER.image_size, TOWER.image_mean, TOWER.image_std)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in CLIP_SIZES:
            path = Path(tmp) / f"{width}x{height}.mp4"
            path.write_bytes(h264_clip(scene_frames(CLIP_FRAMES, height, width), rate=30))
            data = path.read_bytes()
            vila = vila_video_frames(path, SAMPLED, processor)
            row = {"clip": f"{width}x{height}", "frames": CLIP_FRAMES, "sampled": SAMPLED}
            best = {mode: (float("inf"), float("inf")) for mode in VIDEO_RESIZES}
            for _ in range(repeats):  # modes interleaved, so a busy moment hits both
                for mode in VIDEO_RESIZES:
                    took = elapsed(load_video, data, SAMPLED, TOWER, resize=mode)
                    best[mode] = tuple(map(min, best[mode], took))
            for mode in VIDEO_RESIZES:
                d = (load_video(data, SAMPLED, TOWER, resize=mode) - vila).abs().flatten()
                row[f"frames_s_{mode}"] = SAMPLED / best[mode][0]
                row[f"cpu_ms_frame_{mode}"] = 1000 * best[mode][1] / SAMPLED
                row[f"max_diff_{mode}"] = d.max().item()
                row[f"mean_diff_{mode}"] = d.mean().item()
                row[f"p99_diff_{mode}"] = d.quantile(0.99).item()
            wall, cpu = elapsed(vila_video_frames, path, SAMPLED, processor)
            row["frames_s_vila_recipe"] = SAMPLED / wall
            row["cpu_ms_frame_vila_recipe"] = 1000 * cpu / SAMPLED
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def long_clip(seconds: int, rate: int, keyframe_every: int, width: int, height: int) -> bytes:
    """H.264 mp4 of the filmed-like scene, a new scene every 10 s (so no frame array of the
    whole clip is held), a keyframe every `keyframe_every` frames."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264",
            rate=rate,
            options={
                "preset": "ultrafast",
                "crf": "20",
                "x264-params": f"keyint={keyframe_every}:min-keyint={keyframe_every}",
            },
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for scene in range(seconds // 10):
            for frame in scene_frames(10 * rate, height, width, seed=scene):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def decode_per_rank(repeats: int) -> tuple[list[dict], dict[str, float]]:
    """Per N: the slowest rank's probe + decode of its frames (wall, CPU) and the most frame
    bytes a rank holds, with their ratios to N = 1."""
    clip = {k: v for k, v in LONG_CLIP.items() if k != "sampled"}
    data = long_clip(**clip)
    sampled = LONG_CLIP["sampled"]

    def rank_frames(rank: int, size: int) -> torch.Tensor:
        video = probe_video(data, sampled, TOWER)  # every rank lays the sample out
        block = frame_block(len(video), rank, size)
        return video.load(block.start, block.stop)

    best: dict[tuple[int, int], tuple[float, float]] = {}
    held: dict[tuple[int, int], int] = {}
    for _ in range(repeats):  # the layouts interleaved, so a busy moment hits each
        for size in SP_SIZES:
            for rank in range(size):
                wall, cpu = time.perf_counter(), time.process_time()
                held[size, rank] = rank_frames(rank, size).nbytes
                took = (time.perf_counter() - wall, time.process_time() - cpu)
                best[size, rank] = tuple(map(min, best.get((size, rank), took), took))
    rows = []
    for size in SP_SIZES:
        wall = max(best[size, r][0] for r in range(size))
        cpu = max(best[size, r][1] for r in range(size))
        most = max(held[size, r] for r in range(size))
        rows.append({"N": size, "wall_s": wall, "cpu_s": cpu, "bytes_held": most})
    for row in rows:
        row["wall_ratio"] = row["wall_s"] / rows[0]["wall_s"]
        row["cpu_ratio"] = row["cpu_s"] / rows[0]["cpu_s"]
        row["bytes_ratio"] = row["bytes_held"] / rows[0]["bytes_held"]
        row["target"] = 1.2 / row["N"]
        print(json.dumps(row), flush=True)
    return rows, {str(r["N"]): r["cpu_ratio"] for r in rows[1:]}


def print_decode_per_rank(rows: list[dict]) -> None:
    c = LONG_CLIP
    print(
        f"\nframes per sequence-parallel rank: {c['seconds']} s clip {c['width']}x{c['height']} "
        f"at {c['rate']} f/s, keyframe every {c['keyframe_every']} frames, {c['sampled']} frames "
        f"sampled to {TOWER.image_size} px; the slowest rank of N"
    )
    print(
        f"{'N':>3} {'wall s':>8} {'/ N=1':>6} {'CPU s':>8} {'/ N=1':>6} {'MB held':>8}"
        f" {'/ N=1':>6} {'target':>7}"
    )
    for r in rows:
        print(
            f"{r['N']:>3} {r['wall_s']:>8.2f} {r['wall_ratio']:>6.2f} {r['cpu_s']:>8.2f}"
            f" {r['cpu_ratio']:>6.2f} {r['bytes_held'] / 2**20:>8.1f} {r['bytes_ratio']:>6.2f}"
            f" {r['target']:>7.2f}"
        )


def pipeline_rate(
    model: ModelConfig,
    tokenizer,
    steps: int,
    workers: int,
    num_frames: int,
    batch: int = 8,
    video_resize: str = "rgb",
):
    """(frames/s, samples/s, the micro-batches) of `steps` optimizer steps of `batch` samples."""
    data = DataConfig(num_workers=workers, video_resize=video_resize)
    pipeline = build_pipeline(
        data,
        "conversation",
        tokenizer,
        model,
        num_frames=num_frames,
        fps=None,
        max_length=262144,
        global_batch_size=batch,
        micro_batch_size=min(4, batch),
        pad_multiple=2,
        dp_rank=0,
        dp_size=1,
        seed=0,
    )
    next(pipeline)  # open shards, start threads
    start = time.perf_counter()
    batches = [b for _ in range(steps) for b in next(pipeline)]
    seconds = time.perf_counter() - start
    pipeline.close()
    frames = sum(b.num_frames for b in batches)
    return frames / seconds, batch * steps / seconds, batches


def step_rate(model: LongVILAModel, batches) -> float:
    """Frames/s one forward + backward per micro-batch consumes on this machine."""
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss_sum, count = model.loss(batch)
        (loss_sum / count).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return sum(b.num_frames for b in batches) / seconds


def gpu_estimate(model: LongVILAModel, batches) -> float:
    """Frames/s of an A100 at 40% utilisation: 6 x parameters x tokens FLOPs a step."""
    params = sum(p.numel() for p in model.parameters())
    tokens = sum(b.input_ids.numel() for b in batches)
    seconds = 6 * params * tokens / (A100_BF16_FLOPS * MFU)
    return sum(b.num_frames for b in batches) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timings of each case (best kept)")
    parser.add_argument(
        "--skip-1.5b-step",
        dest="skip_big",
        action="store_true",
        help="do not run the (slow, ~12 GB) 1.5B training step on the CPU",
    )
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="run only section 3, the frames each sequence-parallel rank decodes and holds",
    )
    parser.add_argument("--json", action="store_true", help="end stdout with the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    per_rank, ratios = decode_per_rank(args.repeats)
    if args.decode_only:
        print_decode_per_rank(per_rank)
        if args.json:
            print(json.dumps({"decode_per_rank": per_rank, "decode_per_rank_ratio": ratios}))
        return
    init_distributed(torch.device("cpu"))
    init_model_parallel(ParallelConfig())
    tokenizer = AutoTokenizer.from_pretrained(synthetic_paths().tokenizer_dir)
    ensure_media_tokens(tokenizer)

    clips = frame_resizes(args.repeats)
    rows = []
    for shape in (TINY, QWEN2_1_5B):
        row = {"shape": shape.name, "tokens_per_frame": shape.tokens_per_frame + 1}
        for _ in range(args.repeats):  # the best of each, modes interleaved
            for workers in (0, 2):
                for mode in VIDEO_RESIZES:
                    frames_s, samples_s, batches = pipeline_rate(
                        shape, tokenizer, args.steps, workers, args.frames, video_resize=mode
                    )
                    key = f"{workers}w_{mode}"
                    if frames_s > row.get(f"pipeline_frames_s_{key}", 0):
                        row[f"pipeline_frames_s_{key}"] = frames_s
                        row[f"pipeline_samples_s_{key}"] = samples_s
        torch.manual_seed(0)
        if shape is TINY or not args.skip_big:
            if shape is QWEN2_1_5B:  # one short sample: activations of 28 layers fit in RAM
                batches = pipeline_rate(shape, tokenizer, 1, 0, 4, batch=1)[2]
            model = LongVILAModel(shape, ParallelConfig(), torch.device("cpu"))
            row["step_frames_s_cpu"] = step_rate(model, batches)
            row["step_frames_s_a100_est"] = gpu_estimate(model, batches)
            del model
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(
        f"\nvideo frames to {TOWER.image_size} px, {SAMPLED} of {CLIP_FRAMES} sampled; frames/s "
        "and |ours - VILA| in [-1, 1] units (max / mean / p99), 2 CPU cores"
    )
    print(
        f"{'clip':<10} {'rgb f/s':>8} {'yuv f/s':>8} {'yuv/rgb':>8} {'VILA f/s':>9}"
        f" {'CPU ms/frame rgb, yuv, VILA':>28} {'rgb max/mean/p99':>17} {'yuv max/mean/p99':>22}"
    )
    for r in clips:
        diffs = {
            m: f"{r[f'max_diff_{m}']:.3g} / {r[f'mean_diff_{m}']:.3g} / {r[f'p99_diff_{m}']:.3g}"
            for m in VIDEO_RESIZES
        }
        print(
            f"{r['clip']:<10} {r['frames_s_rgb']:>8.0f} {r['frames_s_yuv']:>8.0f}"
            f" {r['frames_s_yuv'] / r['frames_s_rgb']:>8.2f} {r['frames_s_vila_recipe']:>9.0f}"
            f" {r['cpu_ms_frame_rgb']:>14.1f} {r['cpu_ms_frame_yuv']:>6.1f}"
            f" {r['cpu_ms_frame_vila_recipe']:>6.1f} {diffs['rgb']:>17} {diffs['yuv']:>22}"
        )

    print(f"\nstage-5 synthetic videos ({args.frames} frames sampled a video), 2 CPU cores")
    print(
        f"{'shape':<15} {'pipeline frames/s':>18} {'rgb 2 thr':>10} {'yuv':>8} {'yuv 2 thr':>10}"
        f" {'samples/s':>10} {'step frames/s CPU':>18} {'A100 est.':>10}"
    )
    for r in rows:
        print(
            f"{r['shape']:<15} {r['pipeline_frames_s_0w_rgb']:>18.0f}"
            f" {r['pipeline_frames_s_2w_rgb']:>10.0f} {r['pipeline_frames_s_0w_yuv']:>8.0f}"
            f" {r['pipeline_frames_s_2w_yuv']:>10.0f} {r['pipeline_samples_s_2w_rgb']:>10.1f}"
            f" {r.get('step_frames_s_cpu', float('nan')):>18.1f}"
            f" {r.get('step_frames_s_a100_est', float('nan')):>10.0f}"
        )
    print("(pipeline frames/s: rgb with 0 and 2 decode threads, then yuv; samples/s: rgb, 2 thr)")
    print_decode_per_rank(per_rank)
    results = {
        "frame_resizes": clips,
        "pipeline": rows,
        "decode_per_rank": per_rank,
        "decode_per_rank_ratio": ratios,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_pipeline.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
