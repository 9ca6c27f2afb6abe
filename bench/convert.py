"""Time and peak memory of checkpoint conversion at the shape of the 1.5B release.

A randomly initialised VILA-layout checkpoint of the 1.5B shape (REFERENCE 1, 2: Qwen2-1.5B with
tied embeddings and 151,936 vocabulary rows, SigLIP so400m at 384 px with its head, projector
4608 -> 1536), bf16 like the releases, is written once by HF's own classes into the cache. Then,
each through the real CLI (tools/convert_checkpoint.py) in its own process: hf-to-mcore with TP 1
and with TP 2, and mcore-to-hf of the TP 2 result, whose tensors are then compared with the
original, bit for bit.

Memory, sampled every 50 ms: the peak of the summed PSS of the CLI process and all its
descendants (ranks, dist_checkpointing's forked writers and queue manager), which counts each
shared page once (the forked writers share their rank's memory), and the peak RSS of the largest
single process. Prints a table and writes bench/results/convert.json.

    python bench/convert.py [--cache DIR] [--keep] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the HF-written checkpoint comes from the tests' references

from longvila_mcore.checkpoint.hf import COMPONENTS, SafetensorsReader  # noqa: E402
from longvila_mcore.config import model_preset  # noqa: E402
from longvila_mcore.data.tokenizer import train_tokenizer  # noqa: E402
from tests.hf_reference import cast_vila_checkpoint, make_vila_checkpoint  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "convert.json"
CLI = ROOT / "tools" / "convert_checkpoint.py"
GiB = 2**30

# The 1.5B release's shape (configs/model/longvila_1.5b.yaml).
SHAPE = model_preset("longvila_1.5b")


def checkpoint_1_5b(cache: Path) -> Path:
    """The random 1.5B-shape checkpoint, written on first use (about a minute, 10 GB of RAM)."""
    root = cache / "vila_1.5b_random_bf16"
    if (root / "config.json").is_file():
        return root
    work = Path(tempfile.mkdtemp(dir=cache))
    print(f"writing a random 1.5B-shape VILA checkpoint into {root} (once)")
    tokenizer = train_tokenizer(["a random checkpoint of the 1.5B shape"] * 8, 300, work / "tok")
    built = make_vila_checkpoint(work / "ckpt", tokenizer, SHAPE.llm, SHAPE.vision)
    cast_vila_checkpoint(built, torch.bfloat16)
    built.rename(root)
    shutil.rmtree(work)
    return root


def measure(*args: str) -> dict:
    """Run the CLI; its wall time and the peak memory of its process tree."""
    proc = subprocess.Popen([sys.executable, str(CLI), *args], stderr=subprocess.PIPE, text=True)
    peak = {"total": 0, "largest": 0}
    root = psutil.Process(proc.pid)

    def sample():
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):  # a process that ended mid-sample
                tree = [p.memory_full_info() for p in [root, *root.children(recursive=True)]]
                peak["total"] = max(peak["total"], sum(m.pss for m in tree))
                peak["largest"] = max(peak["largest"], max(m.rss for m in tree))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    start = time.perf_counter()
    sampler.start()
    _, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{stderr}")
    return {
        "seconds": round(seconds, 1),
        "peak_pss_all_gib": round(peak["total"] / GiB, 2),
        "peak_rss_largest_gib": round(peak["largest"] / GiB, 2),
    }


def identical(original: Path, exported: Path) -> bool:
    """The same tensors, bit for bit (read one at a time)."""
    before, after = SafetensorsReader(original), SafetensorsReader(exported)
    for component in COMPONENTS:
        if before.names(component) != after.names(component):
            return False
        for name in before.names(component):
            want, got = before.read(component, name), after.read(component, name)
            if got.dtype != want.dtype or not torch.equal(
                got.view(torch.uint8), want.view(torch.uint8)
            ):
                return False
    return True


def disk_gib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / GiB, 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_cache = Path(os.environ.get("LONGVILA_CACHE", Path.home() / ".cache/longvila_mcore"))
    parser.add_argument("--cache", type=Path, default=default_cache / "bench")
    parser.add_argument("--keep", action="store_true", help="keep the converted checkpoints")
    parser.add_argument("--json", action="store_true", help="end stdout with the results as JSON")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    hf = checkpoint_1_5b(args.cache)
    work = Path(tempfile.mkdtemp(dir=args.cache))
    rows = {}
    try:
        for tp in (1, 2):
            out = work / f"mcore_tp{tp}"
            rows[f"hf-to-mcore --tp {tp}"] = measure(
                "hf-to-mcore", "--hf", str(hf), "--out", str(out), "--tp", str(tp)
            )
        rows["mcore-to-hf (from tp 2)"] = measure(
            "mcore-to-hf", "--mcore", str(work / "mcore_tp2"), "--out", str(work / "hf")
        )
        same = identical(hf, work / "hf")
        sizes = {"hf_gib": disk_gib(hf), "mcore_gib": disk_gib(work / "mcore_tp2")}
    finally:
        if not args.keep:
            shutil.rmtree(work)

    print(
        f"\n1.5B shape, bf16: HF {sizes['hf_gib']} GiB, Megatron {sizes['mcore_gib']} GiB on disk"
    )
    print(f"{'step':<26} {'wall s':>8} {'peak PSS all GiB':>17} {'largest RSS GiB':>16}")
    for step, r in rows.items():
        print(
            f"{step:<26} {r['seconds']:>8} {r['peak_pss_all_gib']:>17} "
            f"{r['peak_rss_largest_gib']:>16}"
        )
    print(f"round trip bit-identical: {same}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "shape": "1.5B (Qwen2-1.5B tied + SigLIP so400m 384 + mlp_downsample), bf16",
        "machine": {
            "cpus": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
            "load_average_after": [round(x, 1) for x in os.getloadavg()],
        },
        **sizes,
        "steps": rows,
        "round_trip_bit_identical": same,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
