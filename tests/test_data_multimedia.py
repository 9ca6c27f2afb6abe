"""Several media in one conversation sample: VILA's placement, through shards, layout and the
model, against the HF assembly laid out as VILA lays it out."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from PIL import Image

from longvila_mcore.checkpoint.hf import load_vila
from longvila_mcore.config import ParallelConfig, VisionConfig
from longvila_mcore.data.batch import IGNORE_INDEX, Batch
from longvila_mcore.data.chat import ConversationError, conversation_messages
from longvila_mcore.data.layout import MediaLayout
from longvila_mcore.data.packing import load_frames
from longvila_mcore.data.samples import BadSample, SampleBuilder
from longvila_mcore.data.shards import convert_llava
from longvila_mcore.data.stream import expand_shards, index_shard
from longvila_mcore.data.tokenizer import train_tokenizer
from tests.hf_reference import (
    HFLongVILA,
    make_vila_checkpoint,
    tiny_llm_config,
    tiny_vision_config,
    vila_logits,
    vila_sequence,
)
from tests.test_data_media import lossless_video
from tests.test_generate import reference_frames

TEXTS = ["Compare the pictures with the clip: red, then blue. Which moves?\n"] * 20
CONVERSATION = [
    {"from": "human", "value": "Compare <image> with\n<image>\nand the clip:\n<video>"},
    {"from": "gpt", "value": "red, then blue"},
    {"from": "human", "value": "Which moves?"},
    {"from": "gpt", "value": "the clip"},
]
FIRST_TURN = "<image><image><vila/video>Compare  with\nand the clip:"
"""VILA's first user turn, written out: every placeholder removed as `_remove_media_tokens`
removes it, the media tokens in LLaVADataset's order (image, images, video) before the text."""


def test_media_tokens_open_the_first_human_turn_in_vilas_order():
    messages = conversation_messages(CONVERSATION, ["image", "image", "video"])
    assert messages[0] == {"role": "user", "content": FIRST_TURN}
    assert [m["content"] for m in messages[1:]] == ["red, then blue", "Which moves?", "the clip"]
    # A placeholder in a later human turn still puts the media first in the first one.
    later = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Look."},
        {"from": "gpt", "value": "ok"},
        {"from": "human", "value": "<video>\nAnd now?"},
        {"from": "gpt", "value": "red"},
    ]
    messages = conversation_messages(later, ["video"])
    assert [m["content"] for m in messages[1:4]] == ["<vila/video>Look.", "ok", "And now?"]
    with pytest.raises(ConversationError, match="3 media placeholders for 2"):
        conversation_messages(CONVERSATION, ["image", "video"])


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two images and a video, through the LLaVA converter into a shard; the pixels as written."""
    root = tmp_path_factory.mktemp("multi")
    vision = tiny_vision_config()
    rng = np.random.default_rng(1)
    size = vision.image_size
    images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    clip = rng.integers(0, 256, (12, size, size, 3), dtype=np.uint8)
    (root / "media").mkdir()
    (root / "media" / "a.png").write_bytes(png(images[0]))
    (root / "media" / "b.png").write_bytes(png(images[1]))
    (root / "media" / "clip.mkv").write_bytes(lossless_video(clip, rate=4))
    entry = {"id": "m", "images": ["a.png", "b.png"], "video": "clip.mkv",
             "conversations": CONVERSATION}  # fmt: skip
    (root / "sft.json").write_text(json.dumps([entry]))
    summary = convert_llava(root / "sft.json", root / "media", str(root / "s-%02d.tar"))
    (ref,) = index_shard(expand_shards(summary.pattern)[0])
    tokenizer_dir = train_tokenizer(TEXTS, 300, root / "tokenizer")
    return ref.read(), images, clip, tokenizer_dir, root


def normalised(pixels: np.ndarray, vision: VisionConfig) -> torch.Tensor:
    return reference_frames(pixels, len(pixels), vision)


def test_several_media_match_the_hf_assembly(single_rank, converted, tmp_path):
    """Logits, loss and labels of a two-image + video sample built from its shard equal the HF
    assembly's on VILA's layout, written from hand-made text pieces (fp32, 1e-5 relative)."""
    files, images, clip, tokenizer_dir, _ = converted
    assert sorted(files) == ["0.png", "1.png", "2.mkv", "json"]
    vision = tiny_vision_config()
    llm = tiny_llm_config(vocab_size=320)
    root = make_vila_checkpoint(tmp_path / "ckpt", tokenizer_dir, llm, vision, qk_scale=4.0)
    model, tokenizer = load_vila(root, ParallelConfig(), torch.device("cpu"), torch.float32)
    tpf = model.cfg.tokens_per_frame
    layout = MediaLayout.from_tokenizer(tokenizer, tpf)
    sample = SampleBuilder(tokenizer, layout, vision, num_frames=4).build(
        "conversation", "m", files
    )

    media = [normalised(images[:1], vision), normalised(images[1:], vision),
             reference_frames(clip, 4, vision)]  # fmt: skip
    pieces = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
         f"{FIRST_TURN}<|im_end|>\n<|im_start|>assistant\n", False),
        ("red, then blue<|im_end|>", True),
        ("\n<|im_start|>user\nWhich moves?<|im_end|>\n<|im_start|>assistant\n", False),
        ("the clip<|im_end|>", True),
        ("\n", False),
    ]  # fmt: skip
    ids, reads, labels = vila_sequence(pieces, tokenizer, media, tpf)
    frames = torch.cat(media)
    sample_frames = load_frames(sample.frames, 0, sample.num_frames)  # media decoded on demand
    assert torch.equal(sample_frames, frames) and len(frames) == 6
    assert sample.media_index.tolist() == reads
    text = sample.media_index < 0
    assert sample.input_ids[text].tolist() == [i for i in ids if i >= 0]
    assert torch.equal(sample.labels, labels)

    length = len(sample)
    batch = Batch(input_ids=sample.input_ids, media_index=sample.media_index,
                  labels=sample.labels, position_ids=torch.arange(length),
                  cu_seqlens=torch.tensor([0, length]), frames=sample_frames)  # fmt: skip
    reference = HFLongVILA(root)
    with torch.no_grad():
        ours = gather_from_tensor_model_parallel_region(model(batch))[:, 0, : llm.vocab_size]
        ref = vila_logits(reference, ids, reads, frames)
        loss_sum, count = model.loss(batch)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-5
    ref_loss = F.cross_entropy(ref, labels, ignore_index=IGNORE_INDEX)
    replies = [tokenizer.encode(r + "<|im_end|>", add_special_tokens=False) for r in
               ("red, then blue", "the clip")]  # fmt: skip
    assert count == (labels != IGNORE_INDEX).sum() == sum(map(len, replies))
    assert abs((loss_sum / count).item() - ref_loss.item()) <= 1e-5 * ref_loss.item()


def test_media_files_must_be_one_or_numbered_from_zero(converted):
    files, _, _, tokenizer_dir, _ = converted
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    builder = SampleBuilder(tokenizer, MediaLayout.from_tokenizer(tokenizer, 4),
                            tiny_vision_config(), num_frames=4)  # fmt: skip
    gap = {"json": files["json"], "0.png": files["0.png"], "2.mkv": files["2.mkv"]}
    mixed = {**files, "png": files["0.png"]}
    for broken in (gap, mixed):
        with pytest.raises(BadSample, match="numbered from 0"):
            builder.build("conversation", "m", broken)
