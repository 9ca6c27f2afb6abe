"""Convert checkpoints between the released HF layout (VILA) and this project's format.

python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR [--tp N] [--pp M]
python tools/convert_checkpoint.py mcore-to-hf --mcore DIR --out DIR

hf-to-mcore starts tp x pp local processes, which write the checkpoint's shards; the result is
what training writes (`checkpoint.load=DIR`) and what `generate --load DIR` runs, under any
layout (it reshards on load). mcore-to-hf writes config.json + llm/ + vision_tower/ +
mm_projector/ as the releases have them. See longvila_mcore/checkpoint/convert.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_mcore = commands.add_parser("hf-to-mcore", help="VILA-layout HF directory -> checkpoint")
    to_mcore.add_argument("--hf", required=True, help="VILA-layout HF checkpoint directory")
    to_mcore.add_argument("--out", required=True, help="new checkpoint directory")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks writing it")
    to_mcore.add_argument("--pp", type=int, default=1, help="pipeline stages writing it")
    to_hf = commands.add_parser("mcore-to-hf", help="checkpoint -> VILA-layout HF directory")
    to_hf.add_argument("--mcore", required=True, help="checkpoint directory (longvila.json)")
    to_hf.add_argument("--out", required=True, help="new VILA-layout HF directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported here, not at the top: the processes multiprocessing starts import this module
    # again (dist_checkpointing's save starts one per rank) and need none of it.
    from longvila_mcore.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from longvila_mcore.checkpoint.tensors import CheckpointError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("longvila_mcore.checkpoint").setLevel(logging.INFO)
    progress = sys.stderr.isatty()
    start = time.perf_counter()
    try:
        if args.command == "hf-to-mcore":
            out = hf_to_mcore(args.hf, args.out, args.tp, args.pp, progress)
        else:
            out = mcore_to_hf(args.mcore, args.out, progress)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} was not written", file=sys.stderr)
        return 130
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
