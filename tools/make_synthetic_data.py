"""Generate the synthetic dataset (every sample kind + its tokenizer); see data/synthetic.py.

python tools/make_synthetic_data.py                 # into the cache, as training would
python tools/make_synthetic_data.py --out DIR --frames 128 --samples 512
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

from longvila_mcore.data.synthetic import (
    DEFAULT_FRAMES,
    VERSION,
    SyntheticPaths,
    dataset_paths,
    generate_synthetic,
    synthetic_root,
)
from longvila_mcore.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="target directory (default: the cache's, "
        f"$LONGVILA_CACHE or ~/.cache/longvila_mcore, then synthetic/{VERSION})",
    )
    parser.add_argument(
        "--frames", type=int, default=DEFAULT_FRAMES, help="frames of a needle video"
    )
    parser.add_argument("--samples", type=int, default=1024, help="samples of each kind")
    parser.add_argument("--shards", type=int, default=2, help="shards of each kind")
    parser.add_argument("--text-length", type=int, default=512, help="tokens of a text sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing dataset")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    out = args.out or synthetic_root(num_frames=args.frames)
    if out.exists():
        if not args.force:
            print(f"{out} exists (use --force to regenerate)")
            _report(dataset_paths(out))
            return
        shutil.rmtree(out)
    start = time.perf_counter()
    try:
        paths = generate_synthetic(
            out,
            num_frames=args.frames,
            samples=args.samples,
            shards=args.shards,
            text_length=args.text_length,
            seed=args.seed,
        )
    except UserError as err:
        parser.error(str(err))
    print(f"generated in {time.perf_counter() - start:.1f} s")
    _report(paths)


def _report(paths: SyntheticPaths) -> None:
    size = sum(f.stat().st_size for f in paths.root.rglob("*") if f.is_file())
    print(f"{paths.root}: {size / 2**20:.1f} MiB")
    for kind, pattern in paths.shards.items():
        print(f"  {kind:<13} {pattern}")
    print(f"  {'tokenizer':<13} {paths.tokenizer_dir}")


if __name__ == "__main__":
    main()
