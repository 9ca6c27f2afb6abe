"""Plot a training run's metrics.jsonl: loss, learning rate, gradient norm and throughput per step.

python tools/plot_metrics.py outputs/5_sft_1024f                # writes outputs/5_sft_1024f/metrics.png
python tools/plot_metrics.py RUN_DIR --out loss.png --smooth 20

A step logged more than once (run again after a crash) keeps its last record, as the run that
continued from the checkpoint is the one that counts. Steps whose update was skipped (non-finite
loss or gradient norm) are marked on the loss panel.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("loss", "loss"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("tokens_per_s", "tokens / s"),
)


def read_metrics(run_dir: Path) -> list[dict]:
    """Records of metrics.jsonl by step, the last one of each step."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: pass the run's run.output_dir")
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    if not by_step:
        raise SystemExit(f"error: {path} holds no step yet")
    return [by_step[s] for s in sorted(by_step)]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` steps, skipping non-finite values."""
    out = []
    for i in range(len(values)):
        finite = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def plot(records: list[dict], out: Path, window: int = 1) -> Path:
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.4 * len(PANELS)), sharex=True)
    for ax, (key, label) in zip(axes, PANELS):
        values = [float(r.get(key, math.nan)) for r in records]
        ax.plot(steps, values, lw=0.8, alpha=0.4 if window > 1 else 1.0)
        if window > 1:
            ax.plot(steps, smooth(values, window), lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    skipped = [
        r["step"]
        for prev, r in zip([{}, *records], records)
        if r.get("skipped_steps", 0) > prev.get("skipped_steps", 0)
    ]
    for step in skipped:
        axes[0].axvline(step, color="red", lw=0.6, alpha=0.5)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="the run's output directory (run.output_dir)")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN_DIR/metrics.png)")
    parser.add_argument(
        "--smooth", type=int, default=1, help="also draw a trailing mean over this many steps"
    )
    args = parser.parse_args()
    out = plot(read_metrics(args.run_dir), args.out or args.run_dir / "metrics.png", args.smooth)
    print(out)


if __name__ == "__main__":
    main()
