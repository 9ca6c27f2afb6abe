"""Draw docs/figures/mmsp_layout.svg: a packed sequence sharded over U x R ranks by MM-SP.

The positions come from the project's own sharding code (`zigzag_order`, the sharder's frame
blocks), so the figure shows what the code does. Pure Python: it writes SVG text itself.

    python docs/figures/mmsp_layout.py          # rewrite the SVG (tests/test_docs.py checks it)
"""

from __future__ import annotations

from pathlib import Path

from longvila_mcore.parallel.attention_2d import zigzag_order

OUT = Path(__file__).with_suffix(".svg")

ULYSSES, RING = 2, 2
N = ULYSSES * RING
TOKENS_PER_FRAME = 2  # media positions per frame; a "\n" text token follows each frame
COLOURS = ("#4477AA", "#EE6677", "#228833", "#CCBB44")  # one per SP rank (colour-blind safe)
CELL, GAP, LEFT = 22, 4, 185


def sequence() -> tuple[list[str], list[int | None], tuple[int, ...]]:
    """Labels of every position, the frame each media position shows, and sample boundaries.

    Sample 0: 2 text tokens, frames 0-3, 6 text tokens (20 positions); sample 1: frames 4-5,
    6 text tokens (12). Each sample is a multiple of 2 x R, the pack a multiple of N.
    """
    labels: list[str] = []
    frames: list[int | None] = []

    def text(n: int) -> None:
        labels.extend(["t"] * n)
        frames.extend([None] * n)

    def video(first: int, count: int) -> None:
        for f in range(first, first + count):
            labels.extend([f"f{f}"] * TOKENS_PER_FRAME + ["\u21b5"])
            frames.extend([f] * TOKENS_PER_FRAME + [None])

    text(2)
    video(0, 4)
    text(6)
    boundary = len(labels)
    video(4, 2)
    text(6)
    return labels, frames, (0, boundary, len(labels))


def render() -> str:
    labels, frames, bounds = sequence()
    total, num_frames = len(labels), 1 + max(f for f in frames if f is not None)
    order = zigzag_order(bounds, RING).tolist()
    local = total // N
    holder = [0] * total
    for rank in range(N):
        for pos in order[rank * local : (rank + 1) * local]:
            holder[pos] = rank
    per_rank = -(-num_frames // N)  # the sharder's contiguous frame blocks of ceil(F / N)

    def encoder(frame: int) -> int:
        return frame // per_rank

    width = LEFT + total * CELL + 20
    parts: list[str] = []
    y = 30

    def label(x: float, y: float, text: str, size: int = 12, anchor: str = "start", bold=False):
        weight = ' font-weight="bold"' if bold else ""
        parts.append(
            f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}"{weight}>{text}</text>'
        )

    def cell(x: float, y: float, pos: int, text: str) -> None:
        parts.append(
            f'<rect x="{x}" y="{y}" width="{CELL - 2}" height="{CELL}" '
            f'fill="{COLOURS[holder[pos]]}" fill-opacity="0.55" stroke="#333" stroke-width="0.5"/>'
        )
        if frames[pos] is not None:  # top stripe: the rank that encoded this frame
            parts.append(
                f'<rect x="{x}" y="{y}" width="{CELL - 2}" height="5" '
                f'fill="{COLOURS[encoder(frames[pos])]}" stroke="#333" stroke-width="0.5"/>'
            )
        label(x + (CELL - 2) / 2, y + CELL - 5, text, size=9, anchor="middle")

    label(
        10, y, f"MM-SP over U = {ULYSSES} (Ulysses) x R = {RING} (ring) = {N} ranks", 15, bold=True
    )
    y += 25

    # Stage 1: frames over ranks.
    label(10, y + 15, "stage 1: frames", bold=True)
    for f in range(num_frames):
        x = LEFT + f * (2 * CELL)
        parts.append(
            f'<rect x="{x}" y="{y}" width="{2 * CELL - 4}" height="{CELL}" '
            f'fill="{COLOURS[encoder(f)]}" stroke="#333" stroke-width="0.5"/>'
        )
        label(x + CELL - 2, y + 15, f"frame {f}", 9, "middle")
    note = (
        f"each rank encodes a block of ceil(F/N) = {per_rank} frames with the tower and "
        "projector (a rank with none encodes padding)"
    )
    label(LEFT + num_frames * 2 * CELL + 10, y + 15, note, 10)
    y += CELL + 35

    # The packed sequence, coloured by the rank holding each position after stage 2.
    label(10, y - 8, "stage 2: the packed sequence", bold=True)
    label(10, y + 15, "global positions", 11)
    for pos in range(total):
        cell(LEFT + pos * CELL, y, pos, labels[pos])
    for start, end in zip(bounds[:-1], bounds[1:]):  # sample brackets and zigzag chunks
        x0, x1 = LEFT + start * CELL, LEFT + end * CELL - 2
        parts.append(f'<path d="M{x0} {y + CELL + 4} v5 H{x1} v-5" fill="none" stroke="#000"/>')
        label((x0 + x1) / 2, y + CELL + 22, f"sample ({end - start} tokens)", 10, "middle")
        chunk = (end - start) // (2 * RING)
        for c in range(1, 2 * RING):
            xc = LEFT + (start + c * chunk) * CELL - 1
            parts.append(
                f'<line x1="{xc}" y1="{y - 4}" x2="{xc}" y2="{y + CELL + 2}" '
                'stroke="#000" stroke-dasharray="2,2"/>'
            )
    y += CELL + 50

    # Each rank's shard, in shard order.
    label(10, y - 8, "each rank's shard (S/N tokens, in the order it holds them)", bold=True)
    for rank in range(N):
        ring_rank, ulysses_rank = divmod(rank, ULYSSES)
        label(10, y + 15, f"rank {rank} (ring {ring_rank}, ulysses {ulysses_rank})", 11)
        mine = order[rank * local : (rank + 1) * local]
        for i, pos in enumerate(mine):
            x = LEFT + i * (CELL + GAP)
            cell(x, y, pos, labels[pos])
            label(x + (CELL - 2) / 2, y + CELL + 10, str(pos), 8, "middle")
        y += CELL + 20
    lines = [
        "Stripe on top of a frame token: the rank that encoded the frame; the variable-size "
        "all-to-all of stage 2 sends it to the rank that holds the position.",
        f"Dashed lines: a sample's 2R = {2 * RING} zigzag chunks; ring rank r holds chunks r and "
        "2R-1-r of every sample, split contiguously over its Ulysses ranks.",
        "In each attention layer, an all-to-all inside each Ulysses group gives every rank H/U "
        "heads of its ring rank's tokens; the ring then passes K/V blocks between ring ranks.",
    ]
    for text in lines:
        label(10, y + 8, text, 11)
        y += 18
    height = y + 10
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 260}" height="{height}" '
        f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
    )
    return head + "\n".join(parts) + "\n</svg>\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
