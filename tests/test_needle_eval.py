"""The needle evaluation: scoring against greedy decoding, the frame cache, the sequence-parallel
run against one process, results.json, resuming, the heatmap, haystacks, needles, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from longvila_mcore.config import ParallelConfig, model_preset
from longvila_mcore.data.layout import MediaLayout
from longvila_mcore.data.media import load_image, normalize
from longvila_mcore.data.synthetic import COLOURS, NEEDLE_QUESTIONS, SHAPES
from longvila_mcore.data.tokenizer import train_tokenizer
from longvila_mcore.eval import haystack as hs
from longvila_mcore.eval.scoring import FrameCache, score_answer, teacher_forced_batch
from tests.multiproc import run_ranks

TEXTS = ["What colour is the shape? red green blue. What shape? square circle."] * 30
TRAINED_FRAMES = 6


def tiny_checkpoint(root: Path) -> Path:
    """A random tiny LongVILA saved as training saves it, recording TRAINED_FRAMES. Its
    attention is sharpened so that the answers depend on the frames."""
    from longvila_mcore.checkpoint.dist import save_checkpoint
    from longvila_mcore.models.longvila import LongVILAModel

    path = root / "ckpt"
    if path.is_dir():
        return path
    tokenizer = AutoTokenizer.from_pretrained(train_tokenizer(TEXTS, 300, root / "tok"))
    cfg = model_preset("longvila_tiny")
    torch.manual_seed(0)
    model = LongVILAModel(cfg, ParallelConfig(), torch.device("cpu"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "linear_qkv.weight" in name:
                param.mul_(4.0)
    meta = {"stage": "5_sft_1024f", "config": {"stage": {"num_frames": 8}}}
    save_checkpoint(path, model, tokenizer, meta={**meta, "trained_frames": TRAINED_FRAMES})
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, single_rank):
    return tiny_checkpoint(tmp_path_factory.mktemp("needle"))


def _load(path, parallel):
    from longvila_mcore.checkpoint.load import load_for_inference

    return load_for_inference(path, parallel, torch.device("cpu"), torch.float32)


def test_scoring_is_greedy_decoding_teacher_forced(checkpoint):
    """A needle is found iff greedy decoding (the KV-cache path, frames encoded from pixels)
    starts with the answer; the frame cache gives the same scores as the pixels."""
    from longvila_mcore.generate import greedy_generate

    loaded = _load(checkpoint, ParallelConfig())
    model, tokenizer = loaded.model, loaded.tokenizer
    layout = MediaLayout.from_tokenizer(tokenizer, model.cfg.tokens_per_frame)
    vision = model.cfg.vision
    haystack = hs.load_haystack("synthetic", 7, vision, fps=1.0, seed=3, resize="rgb")
    needles = hs.generated_needles(vision)[:2]
    cache = FrameCache(model, haystack, torch.cat([n.image for n in needles]))
    # Needle 1 goes before frame round(depth x 7): first, after frame 3 (of 0..6), last.
    assert [cache.frame_ids(d, 1).tolist().index(8) for d in (0.0, 0.5, 1.0)] == [0, 4, 7]
    assert cache.frame_ids(0.5, 1).tolist() == [0, 1, 2, 3, 8, 4, 5, 6]
    vocab = len(tokenizer) - 6
    outcomes = []
    for depth in (0.0, 0.5, 1.0):
        for k, needle in enumerate(needles):
            ids = cache.frame_ids(depth, k)
            pixels = cache.pixels[ids]
            prompt = teacher_forced_batch(tokenizer, layout, needle.question, [], pixels, 1)
            greedy = greedy_generate(
                model, prompt.input_ids, prompt.media_index, pixels, 3, stop_id=-1
            )
            other = [(t + 1) % vocab for t in greedy]
            answers = {
                "greedy": (greedy, True),
                "last wrong": ([*greedy[:2], other[2]], False),
                "first wrong": ([other[0], *greedy[1:]], False),
                "middle wrong": ([greedy[0], other[1], greedy[2]], False),
            }
            for what, (answer, expected) in answers.items():
                by_pixels = score_answer(
                    model,
                    teacher_forced_batch(tokenizer, layout, needle.question, answer, pixels, 2),
                )
                cached = score_answer(
                    model,
                    teacher_forced_batch(tokenizer, layout, needle.question, answer, ids, 2),
                    cache.encode,
                )
                assert by_pixels.found == expected, (depth, k, what)
                assert cached.found == expected and cached.logprob == pytest.approx(
                    by_pixels.logprob, rel=1e-5
                )
                assert (by_pixels.logprob < 0) and (not expected or by_pixels.logprob > -50)
                outcomes.append(by_pixels.logprob)
    assert cache.encoded == 7 + 2  # each haystack frame and needle once, for every depth
    assert len(set(np.round(outcomes, 4))) > len(outcomes) // 2  # depths and needles differ


def test_synthetic_haystack_is_rebuildable():
    a = hs.synthetic_haystack(12, seed=0)
    assert a.shape == (12, 56, 56, 3) and a.dtype == np.uint8
    assert np.array_equal(a, hs.synthetic_haystack(12, seed=0))
    assert np.array_equal(a[:5], hs.synthetic_haystack(5, seed=0))  # a prefix of a longer one
    assert not np.array_equal(a, hs.synthetic_haystack(12, seed=1))
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # grey
    assert a.min() >= 40 and a.max() < 200 and (np.abs(np.diff(a.astype(int), axis=0)) > 0).any()
    # Written out independently: the mean of four consecutive draws, as 8 x 8 blocks.
    draws = np.random.default_rng(0).integers(40, 200, (15, 7, 7)).astype(float)
    level = (draws[4] + draws[5] + draws[6] + draws[7]) / 4
    assert a[4, 8 * 3 + 2, 8 * 5 + 7, 1] == int(level[3, 5])


def test_generated_needles_ask_every_colour_and_shape():
    vision = model_preset("longvila_tiny").vision
    needles = hs.generated_needles(vision)
    assert len(needles) == 12
    assert all(n.question == NEEDLE_QUESTIONS["colour"] for n in needles[0::2])
    assert all(n.question == NEEDLE_QUESTIONS["shape"] for n in needles[1::2])
    assert {n.answer for n in needles[0::2]} == set(COLOURS)
    assert {n.answer for n in needles[1::2]} == set(SHAPES)
    red_square = needles[0]  # colour 0, shape 0
    assert red_square.name == "colour-red-square" and red_square.image.shape == (1, 3, 56, 56)
    pixel = red_square.image[0, :, 28, 28]  # the centre is the shape's colour
    expected = normalize(np.array([[[COLOURS["red"]]]], np.uint8), vision)[0, :, 0, 0]
    assert torch.allclose(pixel, expected)


def test_folder_needles_and_their_errors(tmp_path):
    vision = model_preset("longvila_tiny").vision
    folder = tmp_path / "needles"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    entries = [{"image": "a.png", "question": "What is it?", "answer": "A cat."}]
    (folder / "needles.json").write_text(json.dumps(entries))
    (needle,) = hs.folder_needles(folder, vision)
    assert (needle.name, needle.question, needle.answer) == ("a", "What is it?", "A cat.")
    assert torch.equal(needle.image, load_image(folder / "a.png", vision))
    bad = {  # what is wrong: (needles.json, the message names)
        "no answer": ([{"image": "a.png", "question": "q"}], "needs string keys"),
        "missing image": ([{"image": "b.png", "question": "q", "answer": "x"}], "b.png"),
        "not a list": ({"image": "a.png"}, "non-empty list"),
    }
    for content, message in bad.values():
        (folder / "needles.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            hs.folder_needles(folder, vision)
    with pytest.raises(ValueError, match="has no needles.json"):
        hs.folder_needles(tmp_path, vision)
    with pytest.raises(ValueError, match="is not a file"):
        hs.load_haystack(str(tmp_path / "x.mp4"), 4, vision, fps=1.0, seed=0, resize="rgb")


def _args(checkpoint, out, *extra):
    from longvila_mcore.eval.needle import parse_args

    return parse_args(["--load", str(checkpoint), "--out", str(out), *extra])


GRID = ["--lengths", "5,8", "--depths", "0,40,100"]


def _evaluate_sp(checkpoint, out):
    from longvila_mcore.eval.needle import evaluate
    from longvila_mcore.runtime import init_model_parallel

    parallel = ParallelConfig(ulysses=2)
    init_model_parallel(parallel)
    return evaluate(_args(checkpoint, out, *GRID), parallel)


@pytest.mark.slow
def test_sequence_parallel_equals_one_process_and_results_contract(checkpoint, tmp_path):
    from longvila_mcore.eval.needle import evaluate

    single = evaluate(_args(checkpoint, tmp_path / "one", *GRID), ParallelConfig())
    sp = run_ranks(2, _evaluate_sp, checkpoint, tmp_path / "sp")
    assert [c["correct"] for c in sp["cells"]] == [c["correct"] for c in single["cells"]]
    for a, b in zip(sp["cells"], single["cells"], strict=True):
        assert (a["frames"], a["depth"]) == (b["frames"], b["depth"])
        assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-5)
    assert len({round(c["logprob"], 6) for c in single["cells"]}) == 6  # the frames matter

    written = json.loads((tmp_path / "one" / "results.json").read_text())
    names = {n.name for n in hs.generated_needles(model_preset("longvila_tiny").vision)}
    assert written["cells"] == single["cells"] and (tmp_path / "one" / "heatmap.png").is_file()
    cells = written["cells"]
    assert [(c["frames"], c["depth"]) for c in cells] == [
        (n, d) for n in (5, 8) for d in (0, 40, 100)
    ]
    for c in cells:
        assert c["needles"] == 12 and c["accuracy"] == c["correct"] / 12
        assert len(c["missed"]) == 12 - c["correct"] and set(c["missed"]) <= names
    assert written["trained_frames"] == TRAINED_FRAMES
    assert written["average"] == pytest.approx(np.mean([c["accuracy"] for c in cells]))
    within = [c["accuracy"] for c in cells if c["frames"] <= TRAINED_FRAMES]
    assert written["average_within_training"] == pytest.approx(np.mean(within))
    assert written["config"]["lengths"] == [5, 8] and written["time_s"] > 0


def test_resume_skips_the_cells_already_done(checkpoint, tmp_path):
    from longvila_mcore.eval.needle import evaluate

    out = tmp_path / "out"
    first = evaluate(_args(checkpoint, out, "--lengths", "4", "--depths", "50"), ParallelConfig())
    results = json.loads((out / "results.json").read_text())
    results["cells"][0].update(correct=7, accuracy=7 / 12)  # a marker: kept if skipped
    (out / "results.json").write_text(json.dumps(results))
    again = evaluate(_args(checkpoint, out, "--lengths", "4,6", "--depths", "50"), ParallelConfig())
    assert [c["frames"] for c in again["cells"]] == [4, 6]
    assert again["cells"][0]["correct"] == 7 and again["cells"][1]["needles"] == 12
    assert again["time_s"] > first["time_s"]  # summed over both runs
    assert again["average_within_training"] == pytest.approx(
        (7 / 12 + again["cells"][1]["accuracy"]) / 2
    )
    with pytest.raises(ValueError, match="other settings \\(seed\\)"):
        evaluate(_args(checkpoint, out, "--lengths", "4", "--seed", "1"), ParallelConfig())


def run_needle(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "longvila_mcore.eval.needle", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_tiny_grid_and_bad_input(checkpoint, tmp_path):
    done = run_needle("--load", str(checkpoint), "--out", str(tmp_path / "o"), "--lengths", "3",
                      "--depths", "0,100")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "average" in done.stdout and (tmp_path / "o" / "heatmap.png").stat().st_size > 1000
    cases = {
        "--lengths": (["--lengths", "0"], "every length must be >= 1"),
        "--depths": (["--depths", "150"], "percentages from 0 to 100"),
        "--load": (["--load", str(tmp_path)], "neither a checkpoint"),
        "--needles": (["--needles", str(tmp_path)], "has no needles.json"),
        "--ulysses": (["--ulysses", "2"], "--ulysses 2 x --ring 1"),
    }
    for what, (bad, message) in cases.items():
        args = ["--load", str(checkpoint), "--out", str(tmp_path / "bad"), *bad]
        done = run_needle(*args)
        assert done.returncode == 2, (what, done.stderr)
        assert message in done.stderr and done.stderr.strip().count("\n") == 0, what
