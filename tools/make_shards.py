"""VILA's training data to shards of our format (longvila_mcore/data/FORMAT.md, data/shards.py).

python tools/make_shards.py llava --json sft.json --media-dir /data/media --out /data/sft/sft-%06d.tar
python tools/make_shards.py llava --kind caption --json blip_558k.json --media-dir /data/images \\
    --out /data/align/align-%06d.tar --workers 8
python tools/make_shards.py tokens --json slimpajama_64k.jsonl --tokenizer /ckpt/llm \\
    --out /data/text/text-%06d.tar

Rejected entries are listed, with their reason, in rejected.jsonl beside the shards; running the
same command again resumes an interrupted conversion.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from longvila_mcore.data.shards import (
    LLAVA_KINDS,
    REJECTED,
    Summary,
    convert_llava,
    convert_tokens,
)
from longvila_mcore.errors import ConfigError, UserError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    llava = commands.add_parser("llava", help="LLaVA-style JSON (stages 1, 3, 5)")
    llava.add_argument("--json", required=True, type=Path, help="JSON list (or .jsonl) of samples")
    llava.add_argument("--media-dir", required=True, type=Path, help="folder the paths start in")
    llava.add_argument("--kind", choices=LLAVA_KINDS, default="conversation")
    tokens = commands.add_parser("tokens", help="LongVILA's stage-4 JSON lines of token ids")
    tokens.add_argument("--json", required=True, type=Path, help='JSON lines {"text": [ids]}')
    tokens.add_argument("--tokenizer", required=True, help="HF tokenizer the ids were made with")
    for command in (llava, tokens):
        command.add_argument("--out", required=True, help="shard names, e.g. /data/sft-%%06d.tar")
        command.add_argument("--samples-per-shard", type=int, default=1000)
        command.add_argument("--workers", type=int, default=1, help="checking processes")
    args = parser.parse_args(argv)

    common = dict(samples_per_shard=args.samples_per_shard, workers=args.workers)
    try:
        if args.command == "llava":
            summary = convert_llava(args.json, args.media_dir, args.out, kind=args.kind, **common)
        else:
            vocab_size, media_ids = _tokenizer_ids(args.tokenizer)
            summary = convert_tokens(args.json, args.out, vocab_size, media_ids=media_ids, **common)
    except UserError as err:
        parser.error(str(err))
    _report(summary)


def _tokenizer_ids(path: str) -> tuple[int, list[int]]:
    """The tokenizer's size and the ids of VILA's media tokens in it."""
    from transformers import AutoTokenizer

    from longvila_mcore.data.tokenizer import MEDIA_TOKENS

    if not Path(path).is_dir():  # a name would be looked up on the Hub
        raise ConfigError(f"--tokenizer {path} is not a directory; give the HF tokenizer's folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"--tokenizer {path} is not an HF tokenizer directory: {first}") from err
    vocab = tokenizer.get_vocab()
    return len(tokenizer), [vocab[t] for t in MEDIA_TOKENS if t in vocab]


def _report(summary: Summary) -> None:
    resumed = f" ({summary.resumed} complete from an earlier run)" if summary.resumed else ""
    print(f"{summary.written} samples in {len(summary.shards)} shards{resumed}: {summary.pattern}")
    rejected = Path(summary.shards[0]).parent / REJECTED
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(summary.rejected.items()))
    print(f"{len(summary.rejections)} rejected{f' ({reasons})' if reasons else ''}: {rejected}")


if __name__ == "__main__":
    main()
