"""Peak memory of one training step against sequence length, per activation recomputation mode.

For each sequence length S and each of train.recompute = none / selective / full, one forward +
backward of the composed LongVILA model (tower, projector, decoder, loss) on one packed sample of
S tokens, half of them video tokens (the tower sees 4 patches per video token, as LongVILA's 729
patches give 196 tokens). Every setting runs in a fresh process (one rank), after one warm-up step.
Two measures, both reported as ratios to `none` at the same S:

- tensor peak: the largest total size of live tensor storage during the step (parameters,
  gradients, saved activations, temporaries), counted at every aten op by the dispatch mode of
  bench/sp_attention.py; what a GPU's caching allocator would have to hold (before
  fragmentation). Exact for tensors, blind to non-tensor memory.
- RSS peak: the process's resident-set high-water mark during the step (VmHWM, reset just before
  it through /proc/self/clear_refs), minus the resident size before the step, so interpreter,
  libraries and weights drop out. glibc's mmap threshold is fixed at 128 KiB so a freed tensor
  goes back to the kernel at once and the resident size follows the live tensors (the runtime's
  keep-freed-memory setting, right for speed, would hide the difference).

The step's CPU time (one thread, without the counting mode) shows what recomputation costs.

Then, per S, the distributed optimizer off / on: two data-parallel ranks (gloo) run whole
training steps (training/step.py: forward, backward, gradient reduction, Megatron's AdamW), the
third one counted as above. Each rank holds the weights and the gradient buffer; with the
distributed optimizer it holds Adam's moments (and, in fp32, nothing else: the master weights are
the parameters) for half of the parameters only. The tensor peak per rank (the larger of the
two; the resident-set measure would count only what the step adds), as ratios to the optimizer
off.

    python bench/memory.py [--seq 2048 4096 8192] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODES = ("none", "selective", "full")
MIB = 2**20


def bench_model():
    """Small enough for CPU, shaped like LongVILA: decoder FFN ~5x hidden, GQA, a tower with
    biases and a quarter of the decoder's width."""
    from longvila_mcore.config import LLMConfig, ModelConfig, VisionConfig

    return ModelConfig(
        llm=LLMConfig(
            vocab_size=1024,
            hidden_size=256,
            num_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            ffn_hidden_size=1344,
        ),
        vision=VisionConfig(
            image_size=56,
            patch_size=14,
            hidden_size=128,
            num_layers=4,
            num_attention_heads=4,
            ffn_hidden_size=512,
        ),
    )


def video_sample(cfg, seq: int):
    """One sample of `seq` tokens: a prompt, frames (projector tokens + newline each) filling half
    of it, then text with targets."""
    import torch

    from longvila_mcore.data.batch import IGNORE_INDEX, Batch

    per_frame = cfg.tokens_per_frame + 1
    frames = seq // 2 // per_frame
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.llm.vocab_size - 1, (seq,), generator=g)
    media = torch.full((seq,), -1)
    for f in range(frames):
        start = 2 + f * per_frame
        media[start : start + cfg.tokens_per_frame] = torch.arange(cfg.tokens_per_frame) + (
            f * cfg.tokens_per_frame
        )
    ids[media >= 0] = cfg.llm.vocab_size - 1
    text = 2 + frames * per_frame
    labels = torch.full((seq,), IGNORE_INDEX)
    labels[text:-1] = ids[text + 1 :]
    size = cfg.vision.image_size
    return Batch(
        input_ids=ids,
        media_index=media,
        labels=labels,
        position_ids=torch.arange(seq),
        cu_seqlens=torch.tensor([0, seq]),
        frames=torch.randn(frames, 3, size, size, generator=g),
    )


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(seq: int, recompute: str) -> dict:
    """One setting, in this (fresh) process."""
    import torch
    from sp_attention import PeakMemory

    from longvila_mcore.config import ParallelConfig
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_distributed, init_model_parallel

    init_distributed(torch.device("cpu"))
    m_mmap_threshold = -3
    ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024)  # after the runtime's setting
    init_model_parallel(ParallelConfig())
    cfg = bench_model()
    torch.manual_seed(0)
    model = LongVILAModel(cfg, ParallelConfig(), torch.device("cpu"), recompute=recompute)
    model.train()
    batch = video_sample(cfg, seq)

    def step():
        loss_sum, count = model.loss(batch)
        (loss_sum / count).backward()

    step()  # warm-up: gradients exist, libraries are initialised
    start = time.process_time()
    step()  # timed without the counting mode, which slows every op
    seconds = time.process_time() - start
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_before = _rss_kib("VmRSS")
    tensors = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None)]
    with PeakMemory(*tensors) as memory:
        step()
    return {
        "seq": seq,
        "recompute": recompute,
        "frames": int(batch.frames.shape[0]),
        "tensor_peak_bytes": memory.peak,
        "resting_bytes": sum(t.untyped_storage().nbytes() for t in tensors),
        "rss_step_peak_bytes": (_rss_kib("VmHWM") - rss_before) * 1024,
        "step_cpu_s": seconds,
    }


def measure_optimizer(seq: int, distributed: bool) -> dict:
    """Training steps with Megatron's optimizer on this data-parallel rank (under torchrun)."""
    import torch
    import torch.distributed as dist
    from sp_attention import PeakMemory

    from longvila_mcore.config import ParallelConfig, StageConfig, TrainConfig
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_distributed, init_model_parallel
    from longvila_mcore.training.step import build_optimizer, train_step, wrap_model

    init_distributed(torch.device("cpu"))
    m_mmap_threshold = -3
    ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024)  # after the runtime's setting
    dp = init_model_parallel(ParallelConfig())
    cfg = bench_model()
    torch.manual_seed(0)
    model = LongVILAModel(cfg, ParallelConfig(), torch.device("cpu"))
    model.set_trainable(True, True, True)
    train = TrainConfig(distributed_optimizer=distributed, overlap_communication=False)
    ddp = wrap_model(model, train)
    optimizer, scheduler = build_optimizer(ddp, StageConfig(lr=1e-4), train, torch.float32)
    model.train()
    batches = [video_sample(cfg, seq)]
    for _ in range(2):  # the first step creates Adam's state
        train_step(ddp, optimizer, scheduler, batches)
    state = [
        t
        for inner in optimizer.chained_optimizers
        for per_param in inner.optimizer.state.values()
        for t in per_param.values()
        if torch.is_tensor(t) and t.dim() > 0
    ]
    buffers = [b for buffer in ddp.buffers for b in (buffer.param_data, buffer.grad_data)]
    resting = [*model.parameters(), *(b for b in buffers if b is not None), *state]
    with PeakMemory(*resting) as memory:
        train_step(ddp, optimizer, scheduler, batches)
    state_bytes = sum(t.untyped_storage().nbytes() for t in state)
    measured = torch.tensor([float(memory.peak), float(state_bytes)], dtype=torch.float64)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)
    peak, state_bytes = measured.tolist()
    return {
        "seq": seq,
        "dp": dp,
        "distributed_optimizer": distributed,
        "tensor_peak_bytes": peak,
        "optimizer_state_bytes": state_bytes,
    }


def run_optimizer_fresh(seq: int, distributed: bool) -> dict:
    """Two data-parallel ranks under torchrun, in fresh processes."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*launcher, "--master-port", str(_free_port()), __file__, "--optimizer-worker", str(seq)]
        + [str(int(distributed))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fresh(seq: int, recompute: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(seq), recompute],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--json", action="store_true", help="last line: the results as JSON")
    parser.add_argument("--worker", nargs=2, metavar=("SEQ", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--optimizer-worker", nargs=2, metavar=("SEQ", "ON"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(int(args.worker[0]), args.worker[1])))
        return
    if args.optimizer_worker:
        seq, on = (int(a) for a in args.optimizer_worker)
        result = measure_optimizer(seq, bool(on))
        if int(os.environ["RANK"]) == 0:
            print(json.dumps(result))
        return

    rows = [run_fresh(seq, mode) for seq in args.seq for mode in MODES]
    base = {r["seq"]: r for r in rows if r["recompute"] == "none"}
    print("one rank, one training step of the bench model (bench/memory.py docstring)")
    print(
        f"{'S':>6}{'frames':>7}{'recompute':>11}{'tensor MiB':>12}{'ratio':>7}"
        f"{'act MiB':>9}{'ratio':>7}{'RSS MiB':>9}{'ratio':>7}{'CPU s':>7}"
    )
    for r in rows:
        b = base[r["seq"]]
        act, b_act = (x["tensor_peak_bytes"] - x["resting_bytes"] for x in (r, b))
        r["tensor_ratio"] = r["tensor_peak_bytes"] / b["tensor_peak_bytes"]
        r["activation_ratio"] = act / b_act
        r["rss_ratio"] = r["rss_step_peak_bytes"] / b["rss_step_peak_bytes"]
        print(
            f"{r['seq']:>6}{r['frames']:>7}{r['recompute']:>11}"
            f"{r['tensor_peak_bytes'] / MIB:>12.1f}{r['tensor_ratio']:>7.2f}"
            f"{act / MIB:>9.1f}{r['activation_ratio']:>7.2f}"
            f"{r['rss_step_peak_bytes'] / MIB:>9.1f}{r['rss_ratio']:>7.2f}"
            f"{r['step_cpu_s']:>7.1f}"
        )
    print("tensor: peak live tensor storage (weights and gradients included); act: the same")
    print("minus weights and gradients; RSS: resident high-water mark of the step above the")
    print("resident size before it. Ratios are to recompute=none at the same S. CPU s: the")
    print("step's CPU time (one thread), which shared cores disturb less than wall time.")

    optim = [run_optimizer_fresh(seq, on) for seq in args.seq for on in (False, True)]
    off = {r["seq"]: r for r in optim if not r["distributed_optimizer"]}
    print()
    print("dp 2, one whole training step per rank (larger rank): distributed optimizer off / on")
    print(f"{'S':>6}{'dist. opt':>10}{'tensor MiB':>12}{'ratio':>7}{'Adam MiB':>10}{'ratio':>7}")
    for r in optim:
        b = off[r["seq"]]
        for key in ("tensor_peak_bytes", "optimizer_state_bytes"):
            r[key.replace("_bytes", "_ratio")] = r[key] / b[key]
        print(
            f"{r['seq']:>6}{'on' if r['distributed_optimizer'] else 'off':>10}"
            f"{r['tensor_peak_bytes'] / MIB:>12.1f}{r['tensor_peak_ratio']:>7.2f}"
            f"{r['optimizer_state_bytes'] / MIB:>10.1f}{r['optimizer_state_ratio']:>7.2f}"
        )
    print("tensor: peak live tensor storage of a step with the optimizer's (weights, gradient")
    print("buffer, Adam moments included); Adam: the moments this rank holds. Ratios to off.")
    if args.json:
        print(json.dumps({"args": vars(args), "rows": rows, "optimizer_rows": optim}))


if __name__ == "__main__":
    main()
