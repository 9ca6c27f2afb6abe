"""Data pipeline throughput against what a training step consumes, tiny and 1.5B shapes.

For each model shape: the stage-5 pipeline on the synthetic needle videos (PyAV decoding,
uniform sampling, resize to the tower size, chat template, packing) in decoded frames/s and
samples/s, with 0 and 2 decode threads; then one training step (forward + backward of
LongVILAModel, fp32, this CPU) on the same batches, in frames/s consumed. For the 1.5B shape the
GPU consumption is also estimated from FLOPs (6 x parameters x tokens at 40% of an A100's
312 bf16 TFLOP/s), since that is where the model would train. Prints a table and writes
bench/results/data_pipeline.json.

    python bench/data_pipeline.py [--steps 4] [--skip-1.5b-step]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from longvila_mcore.config import DataConfig, ModelConfig, ParallelConfig, model_preset
from longvila_mcore.data.pipeline import build_pipeline
from longvila_mcore.data.synthetic import synthetic_paths
from longvila_mcore.data.tokenizer import ensure_media_tokens
from longvila_mcore.models.longvila import LongVILAModel
from longvila_mcore.runtime import init_distributed, init_model_parallel

ROOT = Path(__file__).resolve().parents[1]
A100_BF16_FLOPS = 312e12
MFU = 0.4

TINY = model_preset("longvila_tiny")
QWEN2_1_5B = model_preset("longvila_1.5b")


def pipeline_rate(
    model: ModelConfig, tokenizer, steps: int, workers: int, num_frames: int, batch: int = 8
):
    """(frames/s, samples/s, the micro-batches) of `steps` optimizer steps of `batch` samples."""
    data = DataConfig(num_workers=workers)
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
    frames = sum(b.frames.shape[0] for b in batches)
    return frames / seconds, 8 * steps / seconds, batches


def step_rate(model: LongVILAModel, batches) -> float:
    """Frames/s one forward + backward per micro-batch consumes on this machine."""
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss_sum, count = model.loss(batch)
        (loss_sum / count).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return sum(b.frames.shape[0] for b in batches) / seconds


def gpu_estimate(model: LongVILAModel, batches) -> float:
    """Frames/s of an A100 at 40% utilisation: 6 x parameters x tokens FLOPs a step."""
    params = sum(p.numel() for p in model.parameters())
    tokens = sum(b.input_ids.numel() for b in batches)
    seconds = 6 * params * tokens / (A100_BF16_FLOPS * MFU)
    return sum(b.frames.shape[0] for b in batches) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument(
        "--skip-1.5b-step",
        dest="skip_big",
        action="store_true",
        help="do not run the (slow, ~12 GB) 1.5B training step on the CPU",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    init_distributed(torch.device("cpu"))
    init_model_parallel(ParallelConfig())
    tokenizer = AutoTokenizer.from_pretrained(synthetic_paths().tokenizer_dir)
    ensure_media_tokens(tokenizer)

    rows = []
    for shape in (TINY, QWEN2_1_5B):
        rates = {w: pipeline_rate(shape, tokenizer, args.steps, w, args.frames) for w in (0, 2)}
        batches = rates[2][2]
        torch.manual_seed(0)
        row = {
            "shape": shape.name,
            "tokens_per_frame": shape.tokens_per_frame + 1,
            "pipeline_frames_s_0w": rates[0][0],
            "pipeline_samples_s_0w": rates[0][1],
            "pipeline_frames_s_2w": rates[2][0],
            "pipeline_samples_s_2w": rates[2][1],
        }
        if shape is TINY or not args.skip_big:
            if shape is QWEN2_1_5B:  # one short sample: activations of 28 layers fit in RAM
                batches = pipeline_rate(shape, tokenizer, 1, 0, 4, batch=1)[2]
            model = LongVILAModel(shape, ParallelConfig(), torch.device("cpu"))
            row["step_frames_s_cpu"] = step_rate(model, batches)
            row["step_frames_s_a100_est"] = gpu_estimate(model, batches)
            del model
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nstage-5 synthetic videos ({args.frames} frames sampled a video), 2 CPU cores")
    print(
        f"{'shape':<15} {'pipeline frames/s':>18} {'(2 threads)':>12} {'samples/s':>10}"
        f" {'step frames/s CPU':>18} {'A100 est.':>10}"
    )
    for r in rows:
        print(
            f"{r['shape']:<15} {r['pipeline_frames_s_0w']:>18.0f} {r['pipeline_frames_s_2w']:>12.0f}"
            f" {r['pipeline_samples_s_2w']:>10.1f} {r.get('step_frames_s_cpu', float('nan')):>18.1f}"
            f" {r.get('step_frames_s_a100_est', float('nan')):>10.0f}"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_pipeline.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
