"""Convert checkpoints between the released HF layout (VILA) and this project's format.

python tools/convert_checkpoint.py hf-to-mcore --hf DIR --out DIR [--tp N] [--pp M]
    [--token-order raster|legacy]
python tools/convert_checkpoint.py mcore-to-hf --mcore DIR --out DIR [--token-order raster|legacy]

hf-to-mcore starts tp x pp local processes, which write the checkpoint's shards; the result is
what training writes (`checkpoint.load=DIR`) and what `generate --load DIR` runs, under any
layout (it reshards on load). mcore-to-hf writes config.json + llm/ + vision_tower/ +
mm_projector/ as the releases have them, loadable by VILA's code (transformers 4.46) and by
transformers 5. See longvila_mcore/checkpoint/convert.py.

--token-order: the projector's token order. The checkpoint of ours records it; a VILA-layout
directory does not (unless we exported it): raster for the Qwen2 LongVILA releases, legacy for
`mlp_downsample` checkpoints of VILA before December 2024 (VILA1.5, Llama-3 LongVILA-8B).
Given, it wins over what the source records.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

# longvila_mcore.config.TOKEN_ORDERS (tested equal), not imported here: see main()
TOKEN_ORDERS = ("raster", "legacy")


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
    for command, default in ((to_mcore, "raster"), (to_hf, "the checkpoint's")):
        command.add_argument(
            "--token-order",
            choices=TOKEN_ORDERS,
            default=None,
            help=f"projector token order (default: the one the source records, else {default})",
        )
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
            out = hf_to_mcore(
                args.hf, args.out, args.tp, args.pp, progress, token_order=args.token_order
            )
        else:
            out = mcore_to_hf(args.mcore, args.out, progress, token_order=args.token_order)
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
