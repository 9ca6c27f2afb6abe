"""Training-step throughput (forward + backward) of our LongVILA model against the HF assembly.

Both models get identical weights (our model is loaded from a VILA-layout checkpoint that HF's
own classes wrote) and identical inputs: one packed sequence of video frames and text at each
length. Same thread count and the same process, so process-wide settings (the runtime's CPU
allocator setting) apply to both; the steps are interleaved. Each side computes its loss the way it
trains: HF takes logits at every position, ours only at target positions. Prints a table of
tokens/s and the ratio ours / HF, and writes bench/results/model_throughput.json.

    python bench/model_throughput.py [--lengths 1024 2048 4096] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the HF assembly lives with the tests' references

from longvila_mcore.checkpoint.hf import load_vila  # noqa: E402
from longvila_mcore.config import LLMConfig, ParallelConfig, VisionConfig  # noqa: E402
from longvila_mcore.data.batch import Batch  # noqa: E402
from longvila_mcore.data.tokenizer import train_tokenizer  # noqa: E402
from longvila_mcore.runtime import init_distributed, init_model_parallel  # noqa: E402
from tests.hf_reference import HFLongVILA, make_vila_checkpoint  # noqa: E402

LLM = LLMConfig(
    vocab_size=4096,
    hidden_size=512,
    num_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    ffn_hidden_size=1408,
    rope_theta=1e6,
    tie_word_embeddings=True,
    max_position_embeddings=65536,
)
VISION = VisionConfig(
    image_size=56,
    patch_size=14,
    hidden_size=128,
    num_layers=3,
    num_attention_heads=4,
    ffn_hidden_size=256,
)
TOKENS_PER_FRAME = 4  # 4 x 4 patches -> 2 x 2 projector tokens


def make_batch(length: int, vocab: int, media_id: int, seed: int = 0) -> Batch:
    """One sample: a 32-token prompt, frames (4 tokens + newline each) filling ~80%, then text."""
    g = torch.Generator().manual_seed(seed)
    frames = (length * 4 // 5) // (TOKENS_PER_FRAME + 1)
    ids = torch.randint(0, vocab - 8, (length,), generator=g)
    media_index = torch.full((length,), -1)
    for f in range(frames):
        start = 32 + f * (TOKENS_PER_FRAME + 1)
        media_index[start : start + TOKENS_PER_FRAME] = (
            torch.arange(TOKENS_PER_FRAME) + f * TOKENS_PER_FRAME
        )
        ids[start : start + TOKENS_PER_FRAME] = media_id
    labels = torch.roll(ids, -1).masked_fill(media_index.roll(-1) >= 0, -100)
    labels[-1] = -100
    return Batch(
        input_ids=ids,
        media_index=media_index,
        labels=labels,
        position_ids=torch.arange(length),
        cu_seqlens=torch.tensor([0, length]),
        frames=torch.randn(frames, 3, VISION.image_size, VISION.image_size, generator=g),
    )


def time_steps(ours, hf, repeats: int) -> tuple[float, float]:
    """Median seconds of each step, the two interleaved (ours, HF, HF, ours, ...) so that
    neither always runs on a cache or allocator the other warmed."""
    ours(), hf()  # warm-up
    times = {ours: [], hf: []}
    for i in range(repeats):
        for step in (ours, hf) if i % 2 == 0 else (hf, ours):
            start = time.perf_counter()
            step()
            times[step].append(time.perf_counter() - start)
    return statistics.median(times[ours]), statistics.median(times[hf])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--json", action="store_true", help="end stdout with the results as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_distributed(torch.device("cpu"))
    init_model_parallel(ParallelConfig())

    with tempfile.TemporaryDirectory() as tmp:
        texts = [f"sample {i} of a benchmark corpus with some words" for i in range(200)]
        tokenizer_dir = train_tokenizer(texts, 400, Path(tmp) / "tokenizer")
        root = make_vila_checkpoint(Path(tmp) / "ckpt", tokenizer_dir, LLM, VISION)
        ours, tokenizer = load_vila(root, ParallelConfig(), torch.device("cpu"), torch.float32)
        hf = HFLongVILA(root)
        hf.llm.set_attn_implementation("sdpa")  # HF fastest CPU attention
        hf.tower.set_attn_implementation("sdpa")
    hf.llm.train()
    hf.tower.train()
    ours.train()
    media_id = tokenizer.convert_tokens_to_ids("<vila/video>")

    rows = []
    for length in args.lengths:
        batch = make_batch(length, LLM.vocab_size, media_id)

        def our_step(batch=batch):
            loss_sum, count = ours.loss(batch)
            (loss_sum / count).backward()
            ours.zero_grad(set_to_none=True)

        def hf_step(batch=batch):
            embeds = hf.embeddings(batch.input_ids, batch.media_index, batch.frames)
            logits = hf.llm(inputs_embeds=embeds, position_ids=batch.position_ids[None]).logits
            F.cross_entropy(logits[0].float(), batch.labels, ignore_index=-100).backward()
            hf.llm.zero_grad(set_to_none=True)
            hf.tower.zero_grad(set_to_none=True)

        ours_s, hf_s = time_steps(our_step, hf_step, args.repeats)
        rows.append(
            {
                "tokens": length,
                "frames": batch.frames.shape[0],
                "ours_tok_s": length / ours_s,
                "hf_tok_s": length / hf_s,
                "ratio": hf_s / ours_s,
            }
        )
        r = rows[-1]
        print(
            f"  {length:>6} tokens: ours {r['ours_tok_s']:8.0f} tok/s, HF {r['hf_tok_s']:8.0f} tok/s",
            flush=True,
        )

    print(
        f"\nforward + backward, fp32, {args.threads} threads, LLM {LLM.hidden_size}x{LLM.num_layers}"
    )
    print(f"{'tokens':>7} {'frames':>7} {'ours tok/s':>11} {'HF tok/s':>10} {'ours / HF':>10}")
    for r in rows:
        print(
            f"{r['tokens']:>7} {r['frames']:>7} {r['ours_tok_s']:>11.0f} {r['hf_tok_s']:>10.0f} {r['ratio']:>9.2f}x"
        )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    result = {"threads": args.threads, "rows": rows}
    (out / "model_throughput.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
