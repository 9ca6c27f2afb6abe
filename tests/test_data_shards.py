"""tools/make_shards.py: VILA's LLaVA JSON and stage-4 token files to our shards, and training on
them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from longvila_mcore.data import shards as shards_module
from longvila_mcore.data.shards import (
    REJECTED,
    convert_llava,
    convert_tokens,
    shard_paths,
    write_shards,
)
from longvila_mcore.data.stream import expand_shards, index_shard
from longvila_mcore.data.synthetic import encode_image, encode_video
from longvila_mcore.data.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["What colour is the shape? red. Describe both pictures. a blue circle.\n"] * 20


def picture(colour, size=32) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[8:24, 8:24] = colour
    return image


def turns(*values: str) -> list[dict]:
    return [{"from": "gpt" if k % 2 else "human", "value": v} for k, v in enumerate(values)]


def llava_entries() -> list[dict]:
    """Good samples of every shape, and broken ones (the `reject` field: the reason expected)."""
    return [
        {"id": "one-image", "image": "a.jpg", "conversations": turns("<image>\nColour?", "red")},
        {"id": "two-images", "images": ["a.jpg", "sub/b.png"],
         "conversations": turns("<image>\n<image>\nDescribe both pictures.", "red, then blue")},
        {"id": "video", "video": "clip.mp4", "conversations": turns("<video>\nWhat?", "a square",
                                                                   "And then?", "it moves")},
        {"id": "missing", "image": "nowhere.jpg", "conversations": turns("<image>\nHi", "x"),
         "reject": "missing_media"},
        {"id": "image-and-video", "image": "sub/b.png", "video": "clip.mp4",
         "conversations": turns("<image> and <video>: same colour?", "no")},
        {"id": "undecodable", "video": "broken.mp4", "conversations": turns("<video>\nHi", "x"),
         "reject": "corrupt_media"},
        {"id": "no-gpt", "image": "a.jpg", "conversations": turns("<image>\nHi"),
         "reject": "bad_conversation"},
        {"id": "text-only", "conversations": turns("Count to three.", "one two three")},
        {"id": "placeholders", "images": ["a.jpg", "a.jpg"],
         "conversations": turns("<image>\nOnly one placeholder", "x"), "reject": "bad_conversation"},
        {"id": "two-humans", "image": "a.jpg", "reject": "bad_conversation",
         "conversations": [{"from": "human", "value": "<image>\nHi"},
                           {"from": "human", "value": "And?"}, {"from": "gpt", "value": "x"}]},
    ]  # fmt: skip


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("llava")
    media = root / "media"
    (media / "sub").mkdir(parents=True)
    (media / "a.jpg").write_bytes(encode_image(picture((220, 40, 40)), "jpg"))
    (media / "sub" / "b.png").write_bytes(encode_image(picture((40, 70, 220)), "png"))
    frames = np.stack([picture((40, 170, 60), 32)] * 12)
    frames[:, :, :4] = np.arange(12)[:, None, None, None] * 20  # the clip changes
    (media / "clip.mp4").write_bytes(encode_video(frames))
    (media / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing after")
    entries = llava_entries()
    source = root / "sft.json"
    source.write_text(json.dumps([{k: v for k, v in e.items() if k != "reject"} for e in entries]))
    return source, media, entries


def tar_bytes(pattern: str) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in expand_shards(pattern)}


def test_llava_json_converts_with_rejections_listed(llava, tmp_path):
    source, media, entries = llava
    summary = convert_llava(source, media, str(tmp_path / "sft-%06d.tar"), samples_per_shard=4)
    assert summary.pattern == str(tmp_path / "sft-{000000..000002}.tar")
    rejected = [json.loads(line) for line in (tmp_path / REJECTED).read_text().splitlines()]
    expected = [(i, e["id"], e["reject"]) for i, e in enumerate(entries) if "reject" in e]
    assert [(r["index"], r["id"], r["reason"]) for r in rejected] == expected
    assert (
        "nowhere.jpg" in rejected[0]["message"]
        and "1 media placeholders for 2" in (rejected[3]["message"])
    )
    assert summary.written == len(entries) - len(expected) == 5
    assert summary.rejected == {"missing_media": 1, "corrupt_media": 1, "bad_conversation": 3}

    # Every good entry is present, in its shard, with its media bytes in VILA's order.
    samples = {
        ref.key: (Path(ref.shard).name, ref.read())
        for shard in expand_shards(summary.pattern)
        for ref in index_shard(shard)
    }
    assert sorted(samples) == [f"{i:09d}" for i, e in enumerate(entries) if "reject" not in e]
    for i, entry in enumerate(entries):
        if "reject" in entry:
            continue
        shard, files = samples[f"{i:09d}"]
        assert shard == f"sft-{i // 4:06d}.tar"
        meta = json.loads(files.pop("json"))
        assert meta == {"id": entry["id"], "conversations": entry["conversations"]}
        paths = [entry.get("image"), *entry.get("images", []), entry.get("video")]
        paths = [p for p in paths if p]
        assert files == {
            f"{n}.{Path(p).suffix[1:]}": (media / p).read_bytes() for n, p in enumerate(paths)
        }


def test_conversion_is_deterministic_whatever_the_workers_and_resumes(llava, tmp_path, monkeypatch):
    source, media, _ = llava
    one = convert_llava(source, media, str(tmp_path / "a" / "x-%03d.tar"), samples_per_shard=3)
    two = convert_llava(
        source, media, str(tmp_path / "b" / "x-%03d.tar"), samples_per_shard=3, workers=2
    )
    assert tar_bytes(one.pattern) == tar_bytes(two.pattern) and len(one.shards) == 4
    for shard in one.shards:  # nothing of the time or the user in the headers
        with tarfile.open(shard) as tar:
            headers = {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in tar}
        assert headers <= {(0, 0, 0, "bigdata", "bigdata", 0o444)}  # (the last is empty)
    assert (tmp_path / "a" / REJECTED).read_bytes() == (tmp_path / "b" / REJECTED).read_bytes()

    # Interrupted in the third shard: the first two stay as they are, the rest is completed.
    record = shards_module._llava_record

    def crash_at_7(item, **kw):
        if item[0] == 7:
            raise KeyboardInterrupt
        return record(item, **kw)

    monkeypatch.setattr(shards_module, "_llava_record", crash_at_7)
    out = str(tmp_path / "c" / "x-%03d.tar")
    with pytest.raises(KeyboardInterrupt):
        convert_llava(source, media, out, samples_per_shard=3)
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("x-*.tar")}
    assert sorted(done) == ["x-000.tar", "x-001.tar"]
    monkeypatch.setattr(shards_module, "_llava_record", record)
    resumed = convert_llava(source, media, out, samples_per_shard=3)
    assert resumed.resumed == 2 and resumed.written == one.written
    assert tar_bytes(resumed.pattern) == tar_bytes(one.pattern)
    assert {n: (tmp_path / "c" / n).stat().st_mtime_ns for n in done} == done  # not rewritten
    assert (tmp_path / "c" / REJECTED).read_bytes() == (tmp_path / "a" / REJECTED).read_bytes()
    assert not list((tmp_path / "c").glob(".*.tmp"))
    # Other settings into the same shards: refused, not mixed.
    with pytest.raises(ValueError, match="other input or settings"):
        convert_llava(source, media, out, samples_per_shard=2)


def slow_first(item: tuple[int, object]) -> dict:
    """A conversion whose first entry finishes last (module level: workers receive it pickled)."""
    time.sleep(0.5 if item[0] == 0 else 0)
    return {"__key__": f"{item[0]:09d}", "txt": str(item[1]).encode()}


def test_workers_write_in_input_order(tmp_path):
    summary = write_shards(range(6), 6, slow_first, str(tmp_path / "w-%d.tar"),
                           samples_per_shard=6, workers=2, fingerprint="f")  # fmt: skip
    assert [ref.key for ref in index_shard(summary.shards[0])] == [f"{i:09d}" for i in range(6)]


@pytest.mark.parametrize(
    "pattern, kw, match",
    [
        ("out/sft.tar", {}, "one integer field"),
        ("out/sft-%06d.tar", {"kind": "video"}, "kind='video'"),
        ("out/sft-%06d.tar", {"samples_per_shard": 0}, "--samples-per-shard 0"),
    ],
)
def test_bad_arguments_are_named(llava, tmp_path, pattern, kw, match):
    source, media, _ = llava
    with pytest.raises(ValueError, match=match):
        convert_llava(source, media, str(tmp_path / pattern), **kw)
    with pytest.raises(ValueError, match="one integer field"):
        shard_paths("a-%d-%d.tar", 2)


def test_caption_kind_takes_one_image_and_the_reply(llava, tmp_path):
    source, media, entries = llava
    summary = convert_llava(source, media, str(tmp_path / "c-%02d.tar"), kind="caption")
    (shard,) = expand_shards(summary.pattern)
    refs = {ref.key: ref.read() for ref in index_shard(shard)}
    assert sorted(refs) == ["000000000"]  # only the one-image sample is a caption
    assert json.loads(refs["000000000"]["json"]) == {"id": "one-image", "caption": "red"}
    assert refs["000000000"]["jpg"] == (media / "a.jpg").read_bytes()
    assert "one image and one gpt reply" in (tmp_path / REJECTED).read_text()


# --- stage-4 token files ------------------------------------------------------------------


def write_token_lines(path: Path, lines: int, length: int, vocab: int, bad: dict | None = None):
    """A generator-made stage-4 file: line i holds `length` ids below `vocab`, but the one at the
    middle is bad[i] for the lines in `bad`."""
    rng = np.random.default_rng(0)
    with path.open("w") as out:
        for i in range(lines):
            ids = rng.integers(0, vocab, length)
            if i in (bad or {}):
                ids[length // 2] = bad[i]
            out.write(json.dumps({"text": ids.tolist(), "id": f"doc{i}"}) + "\n")


def test_token_lines_convert_with_bad_ids_named(tmp_path):
    source = tmp_path / "slim.jsonl"
    write_token_lines(source, 7, 50, 290, bad={2: 300, 3: 297, 5: -1})
    summary = convert_tokens(
        source, str(tmp_path / "t-%04d.tar"), 300, media_ids=[297, 298], samples_per_shard=3
    )
    assert summary.written == 4 and len(summary.shards) == 3
    rejected = [json.loads(line) for line in (tmp_path / REJECTED).read_text().splitlines()]
    assert [(r["index"], r["id"], r["reason"]) for r in rejected] == [
        (2, "doc2", "bad_token_ids"),
        (3, "doc3", "media_token_ids"),
        (5, "doc5", "bad_token_ids"),
    ]
    assert rejected[0]["message"].startswith("line 3: token id 300 at position 25")
    assert rejected[1]["message"].startswith("line 4: token id 297 at position 25")
    assert rejected[2]["message"].startswith("line 6: token id -1 at position 25")
    lines = source.read_text().splitlines()
    for shard in expand_shards(summary.pattern):
        for ref in index_shard(shard):
            ids = np.load(io.BytesIO(ref.read()["npy"]))
            assert ids.dtype == np.int32
            assert ids.tolist() == json.loads(lines[int(ref.key)])["text"]


@pytest.mark.slow
def test_a_large_token_file_streams_in_bounded_memory(tmp_path):
    """~150 MB of lines through a child process: its peak RSS grows by a few MB (7.7 MB
    measured), not by the file's size."""
    source = tmp_path / "big.jsonl"
    ids = np.random.default_rng(0).integers(0, 151_000, 100_000).tolist()
    line = (json.dumps({"text": ids}) + "\n").encode()
    with source.open("wb") as out:
        for _ in range(200):
            out.write(line)
    size = source.stat().st_size
    assert size > 120e6
    script = (
        "import resource\n"
        "from longvila_mcore.data.shards import convert_tokens\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"convert_tokens({str(source)!r}, {str(tmp_path / 'b-%03d.tar')!r}, 151_646,"
        " samples_per_shard=100)\n"
        "print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = (int(v) * 1024 for v in done.stdout.split())  # ru_maxrss is in KiB
    assert after - before < min(40e6, size / 4), (before, after, size)
    assert len(expand_shards(str(tmp_path / "b-{000..001}.tar"))) == 2


# --- the CLI and training on its shards ---------------------------------------------------


def make_shards(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_shards.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.mark.slow
def test_stage3_and_stage4_train_on_converted_shards(llava, tmp_path):
    from tests.test_train import losses, run_train

    source, media, _ = llava
    tokenizer = train_tokenizer(TEXTS, 300, tmp_path / "tokenizer")
    sft = str(tmp_path / "sft" / "sft-%06d.tar")
    done = make_shards("llava", "--json", str(source), "--media-dir", str(media), "--out", sft,
                       "--samples-per-shard", "4", "--workers", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr
    pattern = str(tmp_path / "sft" / "sft-{000000..000002}.tar")
    assert f"5 samples in 3 shards: {pattern}" in done.stdout
    assert "5 rejected (bad_conversation 3, corrupt_media 1, missing_media 1)" in done.stdout

    text = tmp_path / "slim.jsonl"
    size = len(AutoTokenizer.from_pretrained(tokenizer))
    write_token_lines(text, 12, 40, size - 6, bad={4: size - 1})  # the last id: <vila/video>
    done = make_shards("tokens", "--json", str(text), "--tokenizer", str(tokenizer),
                       "--out", str(tmp_path / "text" / "t-%02d.tar"), "--samples-per-shard", "6")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "11 samples in 2 shards" in done.stdout
    assert "1 rejected (media_token_ids 1)" in done.stdout

    data = ["data=webdataset", f"data.tokenizer={tokenizer}", "data.num_workers=0"]
    for stage, shards in (("3_sft", f"data.conversation='{pattern}'"),
                          ("4_extend_llm_64k", f"data.text='{tmp_path}/text/t-{{00..01}}.tar'")):  # fmt: skip
        out = tmp_path / stage
        run_train(out, f"+stage={stage}", "train.max_steps=2", shards, *data)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2] and all(
            m["skipped_samples"] == 0 for m in metrics
        )
        assert all(np.isfinite(list(losses(out).values())))


def test_cli_reports_bad_input_in_one_line(tmp_path):
    done = make_shards("tokens", "--json", str(tmp_path / "none.jsonl"), "--tokenizer", "x",
                       "--out", str(tmp_path / "t-%02d.tar"))  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: --tokenizer x is not a directory" in done.stderr
