"""The synthetic dataset: every kind and a tokenizer, deterministic, atomic, cached."""

import json
import runpy
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from longvila_mcore.config import DataConfig, ModelConfig
from longvila_mcore.data import synthetic
from longvila_mcore.data.pipeline import build_pipeline, shard_pattern
from longvila_mcore.data.stream import expand_shards, index_shard
from longvila_mcore.data.tokenizer import MEDIA_TOKENS, QWEN2_SPECIAL_TOKENS

SMALL = dict(num_frames=8, samples=12, shards=2, text_length=32)


def test_generates_every_kind_and_a_tokenizer(tmp_path):
    paths = synthetic.generate_synthetic(tmp_path / "a", **SMALL)
    for kind in ("caption", "interleaved", "conversation", "text"):
        shards = expand_shards(paths.shards[kind])
        assert len(shards) == 2
        refs = [ref for shard in shards for ref in index_shard(shard)]
        assert len(refs) == 12 and len({r.key for r in refs}) == 12
    extensions = {
        ext
        for ref in index_shard(expand_shards(paths.shards["conversation"])[0])
        for ext, *_ in ref.members
    }
    assert {"json", "mp4", "jpg"} <= extensions
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer_dir)
    specials = tokenizer.convert_tokens_to_ids([*QWEN2_SPECIAL_TOKENS, *MEDIA_TOKENS])
    assert specials == list(range(len(tokenizer) - 6, len(tokenizer))) and len(tokenizer) <= 512
    assert tokenizer.chat_template and len(tokenizer.encode("\n")) == 1
    # Deterministic: the same arguments give the same bytes.
    again = synthetic.generate_synthetic(tmp_path / "b", **SMALL)
    for name in sorted(p.name for p in paths.root.glob("*.tar")):
        assert (paths.root / name).read_bytes() == (again.root / name).read_bytes(), name


def test_generation_is_atomic(tmp_path, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_text_chunks", crash)  # after media and tokenizer are written
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_synthetic(tmp_path / "v2", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor a temporary directory
    with pytest.raises(FileExistsError):
        synthetic.generate_synthetic(tmp_path, **SMALL)


def test_cache_made_on_first_use_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGVILA_CACHE", str(tmp_path))
    data = DataConfig()  # name=synthetic, no patterns
    pattern = shard_pattern(data, "conversation")  # generates the default dataset
    root = tmp_path / "synthetic" / synthetic.VERSION
    assert pattern == str(root / "conversation-{000000..000001}.tar")
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def no_second_generation(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(synthetic, "generate_synthetic", no_second_generation)
    paths = synthetic.synthetic_paths()
    assert paths.root == root and {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamp
    tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer_dir)
    pipeline = build_pipeline(data, "conversation", tokenizer, ModelConfig(), num_frames=64, fps=2.0,
                              max_length=1024, global_batch_size=4, micro_batch_size=4,
                              pad_multiple=4, dp_rank=0, dp_size=1, seed=0)  # fmt: skip
    (batch,) = next(pipeline)
    assert batch.num_targets > 0 and sum(pipeline.skipped.values()) == 0


def test_cli(tmp_path, monkeypatch, capsys):
    tool = Path(__file__).parents[1] / "tools" / "make_synthetic_data.py"
    out = tmp_path / "cli"
    argv = [str(tool), "--out", str(out), "--frames", "8", "--samples", "6", "--text-length", "16"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(tool), run_name="__main__")
    assert "generated in" in capsys.readouterr().out
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    runpy.run_path(str(tool), run_name="__main__")
    assert "exists" in capsys.readouterr().out


def test_needle_videos_show_one_needle_and_ask_its_colour_and_shape(tmp_path):
    """Half the conversations are needle videos: a grey haystack, one needle picture (found in
    the decoded frames by its colour), and both needle questions answered with one word."""
    import io

    import av
    import numpy as np

    paths = synthetic.generate_synthetic(tmp_path / "d", **{**SMALL, "num_frames": 12})
    refs = [r for s in expand_shards(paths.shards["conversation"]) for r in index_shard(s)]
    needles = 0
    for ref in refs:
        files = ref.read()
        turns = json.loads(files["json"])["conversations"]
        asked = {
            t["value"].replace("<video>\n", ""): a["value"] for t, a in zip(turns[::2], turns[1::2])
        }
        if synthetic.NEEDLE_QUESTIONS["colour"] not in asked or "mp4" not in files:
            continue
        needles += 1
        assert asked[synthetic.NEEDLE_QUESTIONS["shape"]] in synthetic.SHAPES
        with av.open(io.BytesIO(files["mp4"])) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        assert 8 <= len(frames) <= 12
        centre = frames[:, 28, 28].astype(int)
        coloured = np.abs(centre - centre.mean(1, keepdims=True)).max(1) > 30  # grey is not
        assert coloured.sum() == 1
        expected = np.array(synthetic.COLOURS[asked[synthetic.NEEDLE_QUESTIONS["colour"]]])
        assert np.abs(centre[coloured][0] - expected).max() < 40
    assert needles == 4  # of 12 samples: half of every 8 (samples 4 to 7)
