"""Generation with the sharded KV cache: the log-sum-exp merge against full attention, and
greedy / sampled tokens under Ulysses x ring x TP layouts against one process (and one process
against recomputing the whole sequence without a cache)."""

import pytest
import torch

from tests.multiproc import run_ranks

# (tp, ulysses, ring); 8 gloo ranks run each, the smaller ones as data-parallel replicas.
LAYOUTS = [(1, 2, 1), (1, 1, 2), (1, 2, 2), (2, 2, 1), (2, 1, 2), (2, 2, 2)]
NEW_TOKENS = 6


def full_attention(q, k, v, q_pos, k_pos, scale):
    """float64 reference: every key of every shard at once, GQA heads repeated."""
    groups = q.shape[2] // k.shape[2]
    k, v = (x.double().repeat_interleave(groups, dim=2) for x in (k, v))
    scores = torch.einsum("mbhd,tbhd->bhmt", q.double(), k) * scale
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("bhmt,tbhd->mbhd", scores.softmax(-1), v)


@pytest.mark.parametrize("sharpness", [1.0, 40.0])
def test_lse_merge_of_uneven_shards_equals_full_attention(sharpness):
    """Shards of 1, 9, 0 and 14 keys with scattered positions (as the cache holds them), 3
    queries at successive positions (one sees only part of the keys), GQA 6 / 2 heads. With
    sharp attention the log-sum-exps exceed float32's exp range: the merge must subtract the
    largest."""
    from longvila_mcore.parallel.kv_cache import merge_partials, partial_attention

    g = torch.Generator().manual_seed(0)
    sizes, d = [1, 9, 0, 14], 8
    total = sum(sizes)
    q = torch.randn(3, 1, 6, d, generator=g) * sharpness
    k, v = torch.randn(total, 1, 2, d, generator=g), torch.randn(total, 1, 2, d, generator=g)
    k_pos = torch.randperm(total, generator=g)
    q_pos = torch.tensor([total - 3, total - 2, total - 1])
    scale = d**-0.5
    outs, lses, start = [], [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out, lse = partial_attention(q, k[rows], v[rows], q_pos, k_pos[rows], scale)
        outs.append(out)
        lses.append(lse)
        start += n
    assert torch.isinf(lses[2]).all()  # the empty shard weighs nothing
    if sharpness > 1:
        assert torch.stack(lses).max() > 100  # exp() alone would overflow float32
    merged = merge_partials(torch.stack(outs), torch.stack(lses))
    expected = full_attention(q, k, v, q_pos, k_pos, scale)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged.double(), expected, rtol=1e-5, atol=1e-5)


def model_config():
    from longvila_mcore.config import ModelConfig
    from tests.hf_reference import tiny_llm_config, tiny_vision_config

    # GQA (4 query heads, 2 KV heads) and linear RoPE scaling.
    return ModelConfig(llm=tiny_llm_config(rope_scaling_factor=2.0), vision=tiny_vision_config())


def prompt(tokens_per_frame: int, frames: int = 5):
    """A prefix of text, `frames` frames (each followed by a newline token) and text, 3 + frames x
    (tpf + 1) + 5 tokens (33 with 4 tokens per frame: padded for every layout); and two questions
    of different lengths."""
    g = torch.Generator().manual_seed(7)
    media = [-1] * 3
    for f in range(frames):
        media += [f * tokens_per_frame + t for t in range(tokens_per_frame)] + [-1]
    media += [-1] * 5
    media = torch.tensor(media)
    ids = torch.randint(0, 90, (len(media),), generator=g)
    ids[media >= 0] = 95
    questions = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (5, 2)]
    return ids, media, torch.randn(frames, 3, 16, 16, generator=g), questions


def build(parallel):
    from longvila_mcore.models.longvila import LongVILAModel
    from longvila_mcore.runtime import init_model_parallel

    init_model_parallel(parallel)
    torch.manual_seed(0)
    model = LongVILAModel(model_config(), parallel, torch.device("cpu"))
    with torch.no_grad():  # sharper attention: the answers depend on where tokens sit
        for name, param in model.named_parameters():
            if "linear_qkv.weight" in name:
                param.mul_(4.0)
    return model.eval()


def answers(model):
    """Greedy after the prompt, after each question (the prefix prefilled once), and sampled;
    with the cache sizes of every rank just before each rewind."""
    from longvila_mcore.inference.sampling import Sampler
    from longvila_mcore.inference.session import Session

    ids, media, frames, questions = prompt(model.cfg.tokens_per_frame)
    result = {"sizes": []}
    with Session(model, ids, media, frames, pad_id=0) as session:
        rewind = session.cache.truncate

        def truncate(sizes):
            result["sizes"].append((list(session.cache.sizes), session.cache.length))
            rewind(sizes)

        session.cache.truncate = truncate
        result["prefix_sizes"] = list(session.cache.sizes)
        result["greedy"] = session.answer([], NEW_TOKENS, stop_id=-1)
        result["questions"] = [session.answer(q, NEW_TOKENS, stop_id=-1) for q in questions]
        sampler = Sampler(temperature=1.0, top_p=0.9, seed=3)
        result["sampled"] = [session.answer(q, NEW_TOKENS, -1, sampler) for q in questions]
        result["again"] = session.answer([], NEW_TOKENS, stop_id=-1)
    return result


@torch.no_grad()
def no_cache_greedy(model, ids, media, frames, new_tokens):
    """Greedy by recomputing the whole sequence for every token (no KV cache at all)."""
    from longvila_mcore.data.batch import IGNORE_INDEX, Batch

    tokens = []
    for _ in range(new_tokens):
        seq = torch.cat([ids, torch.tensor(tokens, dtype=torch.long)])
        index = torch.cat([media, torch.full((len(tokens),), -1)])
        batch = Batch(seq, index, torch.full_like(seq, IGNORE_INDEX), torch.arange(len(seq)),
                      torch.tensor([0, len(seq)]), frames)  # fmt: skip
        tokens.append(int(model(batch)[-1, 0, : model.llm.true_vocab_size].argmax()))
    return tokens


def _layouts():
    import torch.distributed as dist

    from longvila_mcore.config import ParallelConfig

    model = build(ParallelConfig())  # every rank alone (building the groups is collective)
    ids, media, frames, questions = prompt(model.cfg.tokens_per_frame)
    single = None
    if dist.get_rank() == 0:  # the reference once, not on all 8 ranks of 2 cores
        single = answers(model)
        single["no_cache"] = no_cache_greedy(model, ids, media, frames, NEW_TOKENS)
        question = torch.tensor(questions[0])
        single["no_cache_question"] = no_cache_greedy(
            model, torch.cat([ids, question]), torch.cat([media, torch.full_like(question, -1)]),
            frames, NEW_TOKENS,
        )  # fmt: skip
    results = {}
    for tp, ulysses, ring in LAYOUTS:
        model = build(ParallelConfig(tp=tp, ulysses=ulysses, ring=ring, sequence_parallel=False))
        got = answers(model)
        # Every rank saw the same tokens.
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {k: got[k] for k in ("greedy", "questions", "sampled")})
        assert all(x == gathered[0] for x in gathered)
        results[(tp, ulysses, ring)] = got
    return single, results, len(ids)


@pytest.mark.slow
def test_sequence_parallel_generation_equals_one_process():
    single, results, length = run_ranks(8, _layouts)
    # The cache path against no cache at all.
    assert single["greedy"] == single["no_cache"]
    assert single["questions"][0] == single["no_cache_question"]
    assert single["again"] == single["greedy"]  # the rewind restored the prefix
    assert len({tuple(t) for t in (single["greedy"], *single["questions"])}) == 3
    assert single["sampled"] != single["questions"]
    for layout, got in results.items():
        sp = layout[1] * layout[2]
        for key in ("greedy", "questions", "sampled", "again"):
            assert got[key] == single[key], (layout, key)
        # Sharded: no rank holds the whole prefix; padding dropped.
        assert sum(got["prefix_sizes"]) == length and max(got["prefix_sizes"]) < length
        # Balanced: after each answer's new tokens every shard is within one entry of the others.
        for sizes, _ in got["sizes"]:
            assert len(sizes) == sp and max(sizes) - min(sizes) <= 1, (layout, sizes)


def _run(*args: str, ranks: int = 1):
    import subprocess
    import sys

    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "longvila_mcore.generate", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _answers(stdout: str):
    """The JSON of each answer, after checking the text streamed before it: rank 0 prints each
    answer's text (which may hold newlines), a newline, then its JSON line."""
    import json

    answers, streamed = [], ""
    for line in stdout.splitlines(keepends=True):
        if line.startswith('{"text": '):
            answers.append(json.loads(line))
            assert streamed == answers[-1]["text"] + "\n"  # streamed piece by piece, the same
            streamed = ""
        else:
            streamed += line
    assert streamed == "" and answers
    return answers


@pytest.mark.slow
def test_cli_prompts_sampling_stop_and_streaming(tmp_path_factory):
    """Two questions about one video against each asked alone; sampling under Ulysses 2 on two
    torchrun ranks against one process for a seed; a stop string cuts the text."""
    import numpy as np

    from longvila_mcore.data.tokenizer import train_tokenizer
    from tests.hf_reference import make_vila_checkpoint, tiny_llm_config, tiny_vision_config
    from tests.test_data_media import lossless_video
    from tests.test_generate import TEXTS

    root = tmp_path_factory.mktemp("cli")
    vision = tiny_vision_config()
    checkpoint = make_vila_checkpoint(
        root / "ckpt", train_tokenizer(TEXTS, 300, root / "tokenizer"),
        tiny_llm_config(vocab_size=320), vision, qk_scale=10.0,
    )  # fmt: skip
    size = vision.image_size
    pixels = np.random.default_rng(0).integers(0, 256, (10, size, size, 3), dtype=np.uint8)
    video = root / "clip.mkv"
    video.write_bytes(lossless_video(pixels, rate=4))
    base = ["--load", str(checkpoint), "--video", str(video), "--num-frames", "6"]
    base += ["--max-new-tokens", "8", "--json"]
    first, second = "What colour is the shape?", "What shape?"
    both = _answers(_run(*base, "--prompt", first, "--prompt", second))
    alone = _answers(_run(*base, "--prompt", second))
    assert alone == both[1:]
    assert both[0]["token_ids"] != both[1]["token_ids"]

    sampling = ["--prompt", first, "--prompt", second, "--temperature", "0.8", "--top-p", "0.9"]
    sampling += ["--seed", "5"]
    sampled = _answers(_run(*base, *sampling))
    sharded = _answers(_run(*base, *sampling, "--ulysses", "2", ranks=2))
    assert sharded == sampled and sampled != both

    text = max((a["text"] for a in both), key=len)
    assert len(text) >= 4, both
    stop = text[2:4]
    cut = _answers(_run(*base, "--prompt", first if text == both[0]["text"] else second,
                        "--stop", stop, "--stop", "never said"))  # fmt: skip
    assert cut[0]["text"] == text[: text.index(stop)]


class _Chars:
    """A tokenizer of one character a token; token 9 is a character's first UTF-8 byte alone."""

    CHARS = ["a", "b", "c", "d", " ", "E", "N", "D", "f", "\ufffd"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.CHARS[i] for i in ids)


def test_text_stream_cuts_at_stop_strings_and_streams_what_cannot_start_one():
    from longvila_mcore.inference.sampling import TextStream

    pieces = []
    stream = TextStream(_Chars(), stops=[" END", "ff"], write=pieces.append)
    tokens = [0, 1, 2, 4, 3, 4, 5]  # "abc d E"
    assert not any(stream.push(tokens[: i + 1]) for i in range(len(tokens)))
    assert "".join(pieces) == "abc "  # " E" and the character before could begin " END"
    assert stream.push([*tokens, 6, 7]) is True  # "abc d END": cut before " END"
    assert stream.finish() == "abc d" and "".join(pieces) == "abc d"
    other = TextStream(_Chars(), stops=["ff"])
    assert other.push([0, 8, 8, 1]) and other.finish() == "a"
    written = []
    plain = TextStream(_Chars(), write=written.append)
    assert not plain.push([0, 9])  # "a" and a character's first byte: the byte waits
    assert "".join(written) == "a"
    assert not plain.push([0, 1]) and "".join(written) == "ab" and plain.finish() == "ab"
    with pytest.raises(ValueError, match="--stop ''"):
        TextStream(_Chars(), stops=[""])


def test_sampler_is_seeded_and_keeps_to_top_p():
    from longvila_mcore.inference.sampling import Sampler

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    assert Sampler()(logits) == 0  # temperature 0: greedy
    draws = [Sampler(1.0, 1.0, seed=s)(logits) for s in range(200)]
    assert set(draws) == {0, 1, 2, 3, 4} or len(set(draws)) >= 4
    again = [Sampler(1.0, 1.0, seed=s)(logits) for s in range(200)]
    assert draws == again  # a seed gives its tokens
    # Probabilities 0.61, 0.22, 0.14, ...: top-p 0.8 keeps the first two (0.61 < 0.8 <= 0.83).
    assert {Sampler(1.0, 0.8, seed=s)(logits) for s in range(200)} == {0, 1}
    probs = logits.double().softmax(0)
    share = sum(d == 0 for d in draws) / len(draws)
    assert abs(share - float(probs[0])) < 0.1
    for bad, match in (((-1.0, 1.0), "--temperature -1.0"), ((1.0, 0.0), "--top-p 0.0")):
        with pytest.raises(ValueError, match=match):
            Sampler(*bad)


def test_parallel_layout_fills_the_ranks_or_says_how():
    from longvila_mcore.generate import parallel_layout, parse_args

    def layout(world, *flags):
        args = parse_args(["--load", "x", "--prompt", "hi", *flags])
        return parallel_layout(args, world)

    assert (layout(8, "--ulysses", "2", "--ring", "2").tp, layout(1).tp) == (2, 1)
    assert layout(4, "--ring", "2", "--tp", "2").ring == 2
    with pytest.raises(ValueError, match="must equal the 8 ranks"):
        layout(8, "--ulysses", "2", "--tp", "2")


def test_several_prompts_share_the_prefix_up_to_their_text():
    from longvila_mcore.data.layout import Expanded
    from longvila_mcore.generate import split_prompts

    def expanded(ids, media):
        return Expanded(torch.tensor(ids), torch.tensor(media), torch.zeros(len(ids), dtype=bool))

    media = [-1, 0, 1, -1]
    a = expanded([5, 9, 9, 6, 7, 8], [*media, -1, -1])
    b = expanded([5, 9, 9, 6, 7, 3, 4], [*media, -1, -1, -1])
    ids, index, rest = split_prompts([a, b])
    assert ids.tolist() == [5, 9, 9, 6, 7] and rest == [[8], [3, 4]]
    assert index.tolist() == [*media, -1]
    ids, _, rest = split_prompts([a, a])  # the same question twice: each keeps its last token
    assert ids.tolist() == [5, 9, 9, 6, 7] and rest == [[8], [8]]
    ids, _, rest = split_prompts([a])  # one prompt: all of it is prefilled
    assert len(ids) == 6 and rest == [[]]
    with pytest.raises(ValueError, match="differ only after the media"):
        split_prompts([a, expanded([5, 1, 9, 6, 7, 8], [-1, -1, 0, 1, -1, -1])])
