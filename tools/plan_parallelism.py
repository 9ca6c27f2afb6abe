"""Rank the parallel layouts of a LongVILA training run by predicted step time.

python tools/plan_parallelism.py --model longvila_7b --frames 1024 --nodes 4 --gpus-per-node 8 \
    --gpu h100-80gb [--json]

--model: longvila_7b, longvila_1.5b, longvila_tiny or a model YAML (configs/model/ format).
--frames F: a stage-5 video sample (F x (tokens per frame + 1) + 512 text tokens, 256 targets,
everything learns); --tokens S: a stage-4 text sample of S tokens (all targets, the LLM learns).
One sample a micro-batch, --global-batch-size samples a step.

Every layout ParallelConfig.check_model accepts (tp x ulysses inside a node) with each
recomputation (none, selective, full) and the distributed optimizer off and on; those that fit
90% of the GPU's memory are printed fastest first. The memory and time models, their terms and
assumptions (MFU, bandwidths) are in longvila_mcore/parallel/plan.py. With --json the last line
is the ranked list of {tp, pp, ulysses, ring, dp, recompute, distributed_optimizer, memory_gib,
step_time_s}.
"""

from __future__ import annotations

import argparse
import json
import sys

from longvila_mcore.errors import ConfigError, UserError
from longvila_mcore.parallel.plan import GPUS, MFU, USABLE, Workload, load_model, plan


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="preset name or model YAML")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--frames", type=int, help="frames of a video sample (stage 5)")
    length.add_argument("--tokens", type=int, help="tokens of a text sample (stage 4)")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu", required=True, help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--global-batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--mfu", type=float, default=MFU, help="assumed model FLOPs utilisation")
    parser.add_argument("--top", type=int, default=15, help="rows of the table")
    parser.add_argument("--json", action="store_true", help="last line: the ranked list as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = load_model(args.model)
        if args.global_batch_size < 1:
            raise ConfigError(f"--global-batch-size {args.global_batch_size}: must be >= 1")
        if args.frames is not None:
            work = Workload.video(model, args.frames, args.global_batch_size)
        else:
            work = Workload.text(args.tokens, args.global_batch_size)
        plans = plan(model, work, args.nodes, args.gpus_per_node, args.gpu, args.mfu)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gpu = GPUS[args.gpu]
    print(
        f"{model.name}: {work.tokens:,} tokens a sample ({work.frames} frames), global batch "
        f"{work.global_batch_size}, {args.nodes} x {args.gpus_per_node} {gpu.name} "
        f"({gpu.memory_gib:g} GiB, {USABLE:.0%} usable); {gpu.tflops:g} TFLOPS bf16 at MFU "
        f"{args.mfu:g}, NVLink {gpu.intra_gbps:g} GB/s, inter-node {gpu.inter_gbps:g} GB/s per GPU"
    )
    header = (
        f"{'#':>3} {'tp':>3} {'pp':>3} {'uly':>4} {'ring':>5} {'dp':>3} {'recompute':>10} "
        f"{'dist-opt':>8} {'GiB':>6} {'weights':>8} {'grads':>6} {'optim':>6} {'activ':>6} "
        f"{'step s':>7} {'comm s':>7}"
    )
    print(header)
    for i, p in enumerate(plans[: args.top], 1):
        m, t, lay = p.memory, p.time, p.layout
        activations = m.decoder + m.tower + m.sharder + m.logits
        comm = t.ulysses + t.ring + t.tp + t.pp + t.grad_reduce
        gib = 1024**3
        print(
            f"{i:>3} {lay.tp:>3} {lay.pp:>3} {lay.ulysses:>4} {lay.ring:>5} {lay.dp:>3} "
            f"{lay.recompute:>10} {'on' if lay.distributed_optimizer else 'off':>8} "
            f"{m.gib:>6.1f} {m.weights / gib:>8.1f} {m.grads / gib:>6.1f} "
            f"{m.optimizer / gib:>6.1f} {activations / gib:>6.1f} {t.total:>7.1f} {comm:>7.2f}"
        )
    print(f"{len(plans)} layouts fit; memory in GiB per rank, step time in seconds")
    if args.json:
        print(json.dumps([p.row() for p in plans]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
