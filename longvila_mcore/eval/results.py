"""The needle evaluation's output: `results.json` (rewritten after every cell, so a run that stops
resumes where it was) and the heatmap.

results.json: `config` (what was evaluated), `cells` (`frames`: haystack length, `depth`: needle
depth in percent, `correct`: needles found, `needles`: needles asked, `accuracy`, `logprob`: the answers' mean
log-likelihood, `missed`: names of the needles not found), `average`
(mean cell accuracy), `trained_frames` (the most frames of one sample the checkpoint was trained
on, as it records it; null if it does not), `average_within_training` (over the cells with
`frames <= trained_frames`; null without any), `time_s` (evaluation time, summed over resumed runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from longvila_mcore.errors import ConfigError

RESULTS_FILE = "results.json"
HEATMAP_FILE = "heatmap.png"
GRID_KEYS = ("lengths", "depths")
"""Config keys a resumed run may change: the grid can grow, the rest must stay the same."""


def load_previous(out: Path, config: dict[str, Any]) -> tuple[list[dict], float]:
    """(cells, time_s) of an earlier run into `out` with the same config but the grid, or
    ([], 0) when there is none; ValueError when `out` holds another evaluation."""
    path = out / RESULTS_FILE
    if not path.is_file():
        return [], 0.0
    previous = json.loads(path.read_text())
    old = {k: v for k, v in previous.get("config", {}).items() if k not in GRID_KEYS}
    new = {k: v for k, v in config.items() if k not in GRID_KEYS}
    if old != new:
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ConfigError(
            f"{path} holds an evaluation with other settings ({', '.join(changed)}); use another "
            "--out, or delete it to start again"
        )
    return previous["cells"], float(previous.get("time_s", 0.0))


def cell_key(frames: int, depth: float) -> tuple[int, float]:
    return int(frames), round(float(depth), 6)


def summarise(cells: list[dict], trained_frames: int | None) -> dict[str, float | None]:
    """`average` over every cell, `average_within_training` over the trained lengths."""

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    within = [c["accuracy"] for c in cells if trained_frames and c["frames"] <= trained_frames]
    return {
        "average": mean([c["accuracy"] for c in cells]),
        "average_within_training": mean(within),
    }


def write_results(
    out: Path,
    config: dict[str, Any],
    cells: list[dict],
    trained_frames: int | None,
    time_s: float,
) -> dict[str, Any]:
    """Write results.json atomically (a temporary file renamed); returns what it wrote."""
    cells = sorted(cells, key=lambda c: cell_key(c["frames"], c["depth"]))
    results = {
        "config": config,
        "cells": cells,
        **summarise(cells, trained_frames),
        "trained_frames": trained_frames,
        "time_s": round(time_s, 3),
    }
    tmp = out / f".{RESULTS_FILE}.tmp"
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, out / RESULTS_FILE)
    return results


def write_heatmap(out: Path, results: dict[str, Any]) -> Path:
    """Accuracy per cell, haystack length on x and depth on y (0% at the top), as in LongVILA's
    figure; a dashed line after the longest trained length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = results["cells"]
    lengths = sorted({c["frames"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for c in cells:
        grid[depths.index(c["depth"]), lengths.index(c["frames"])] = c["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(lengths), 1.0 + 0.45 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("haystack frames")
    ax.set_ylabel("needle depth")
    trained = results.get("trained_frames")
    if trained:
        inside = sum(n <= trained for n in lengths)
        if 0 < inside < len(lengths):
            ax.axvline(inside - 0.5, color="black", linestyle="--", linewidth=1)
    average = results["average"]
    within = results["average_within_training"]
    title = f"average {average:.3f}" if average is not None else "no cells"
    if within is not None:
        title += f", within {trained} trained frames {within:.3f}"
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    path = out / HEATMAP_FILE
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
