"""Tokenizer, chat template, assistant-only targets, media expansion and the label shift."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from longvila_mcore.config import VisionConfig
from longvila_mcore.data.batch import IGNORE_INDEX
from longvila_mcore.data.chat import (
    ConversationError,
    conversation_messages,
    render_chat,
    render_prompt,
)
from longvila_mcore.data.layout import MediaLayout, shift_labels
from longvila_mcore.data.packing import load_frames
from longvila_mcore.data.samples import SampleBuilder
from longvila_mcore.data.synthetic import encode_image
from longvila_mcore.data.tokenizer import (
    IM_END,
    MEDIA_TOKENS,
    QWEN2_SPECIAL_TOKENS,
    ensure_media_tokens,
    newline_token_id,
    train_tokenizer,
)

CORPUS = ["What colour is the shape? red. a blue circle on the left, a square.\n"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = train_tokenizer(CORPUS, 300, tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(out)


def enc(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_trained_tokenizer_files(tokenizer):
    specials = [*QWEN2_SPECIAL_TOKENS, *MEDIA_TOKENS]
    ids = tokenizer.convert_tokens_to_ids(specials)
    assert ids == list(range(len(tokenizer) - 6, len(tokenizer)))  # after the vocabulary, in order
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == IM_END
    assert len(enc(tokenizer, "\n")) == 1 and newline_token_id(tokenizer) == enc(tokenizer, "\n")[0]
    assert enc(tokenizer, "<vila/video>red") == [ids[5], *enc(tokenizer, "red")]
    media = ensure_media_tokens(tokenizer)
    assert (media.image, media.video, media.added) == (ids[4], ids[5], False)


def test_ensure_media_tokens_adds_them_in_order():
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.add_special_tokens(list(QWEN2_SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    before = len(tokenizer)
    media = ensure_media_tokens(tokenizer)
    assert media.added and len(tokenizer) == before + 3
    assert tokenizer.convert_tokens_to_ids(list(MEDIA_TOKENS)) == [before, before + 1, before + 2]
    assert (media.image, media.video) == (before + 1, before + 2)
    assert not ensure_media_tokens(tokenizer).added
    with pytest.raises(ValueError, match="exactly one"):
        newline_token_id(tokenizer)  # an empty BPE has no "\n" token


def test_chat_rendering_and_assistant_only_targets(tokenizer):
    conversation = [
        {"from": "human", "value": "<video>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"},
        {"from": "gpt", "value": "a square"},
    ]
    messages = conversation_messages(conversation, ["video"])
    assert messages[0] == {"role": "user", "content": "<vila/video>What colour is the shape?"}
    ids, is_target = render_chat(tokenizer, messages)
    # Independent expectation: ChatML written out, each assistant span tokenised on its own.
    pieces = [
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
         "<vila/video>What colour is the shape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("red<|im_end|>", True),
        ("\n<|im_start|>user\nAnd the shape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("a square<|im_end|>", True),
        ("\n", False),
    ]  # fmt: skip
    expected_ids = [i for text, _ in pieces for i in enc(tokenizer, text)]
    expected_targets = [t for text, t in pieces for _ in enc(tokenizer, text)]
    assert ids == expected_ids and is_target == expected_targets
    assert ids == enc(tokenizer, "".join(text for text, _ in pieces))  # same as in one go
    # Generation renders exactly the training prefix, up to the opened assistant turn.
    prompt = render_prompt(tokenizer, "What colour is the shape?", ["video"])
    assert prompt == enc(tokenizer, pieces[0][0])
    # A tokenizer without a chat template gets ChatML.
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert render_chat(tokenizer, messages) == (ids, is_target)
    finally:
        tokenizer.chat_template = template


@pytest.mark.parametrize(
    "conversation, media",
    [
        ([{"from": "human", "value": "<image>\nHi"}], ["image"]),  # no reply
        ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "red"}], ["video"]),
        (
            [{"from": "human", "value": "<image><image>Hi"}, {"from": "gpt", "value": "a"}],
            ["image"],
        ),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>b"}], ["image"]),
        ([{"from": "robot", "value": "<image>b"}], ["image"]),
        ("not a list", ["image"]),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}] * 2, ["image"]),
        (
            [
                {"from": "human", "value": "<image>a"},
                {"from": "human", "value": "b"},
                {"from": "gpt", "value": "c"},
            ],
            ["image"],
        ),  # two human turns in a row
        ([{"from": "human", "value": "<image>a"}, {"from": "gpt", "value": "<image>"}], ["image"]),
    ],
)
def test_unusable_conversations(conversation, media):
    with pytest.raises(ConversationError):
        conversation_messages(conversation, media)


def test_placeholder_anywhere_moves_to_the_front():
    # VILA's _remove_media_tokens: the placeholder goes with one adjacent newline, the rest stays.
    turns = [{"from": "human", "value": "What is\n<image>\nthis?"}, {"from": "gpt", "value": "x"}]
    assert conversation_messages(turns, ["image"])[0]["content"] == "<image>What is\nthis?"


def test_media_expansion():
    layout = MediaLayout(image_id=90, video_id=91, newline_id=10, tokens_per_frame=2)
    ids = [1, 90, 2, 91, 3]
    out = layout.expand(ids, [1, 3], [False, False, True, False, True])
    frame = lambda f: [[90, 91][f > 0]] * 2 + [10]  # noqa: E731
    assert out.input_ids.tolist() == [1, *frame(0), 2, *frame(1), *frame(2), *frame(3), 3]
    assert out.media_index.tolist() == [-1, 0, 1, -1, -1, 2, 3, -1, 4, 5, -1, 6, 7, -1, -1]
    assert out.is_target.tolist() == [False] * 4 + [True] + [False] * 9 + [True]
    with pytest.raises(ValueError, match="placeholder"):
        layout.expand(ids, [1])


def test_label_shift_on_the_whole_sample():
    ids = torch.tensor([5, 6, 7, 8, 9])
    labels = shift_labels(ids, torch.tensor([False, False, True, True, False]))
    assert labels.tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, IGNORE_INDEX]
    # The last position is ignored even when its token is a target.
    assert shift_labels(ids, torch.ones(5, dtype=torch.bool))[-1] == IGNORE_INDEX


def test_conversation_sample_layout_and_labels(tokenizer):
    vision = VisionConfig(image_size=28)
    layout = MediaLayout.from_tokenizer(tokenizer, tokens_per_frame=4)
    builder = SampleBuilder(tokenizer, layout, vision, num_frames=8)
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    image = encode_image(torch.zeros(56, 56, 3, dtype=torch.uint8).numpy(), "png")
    sample = builder.build(
        "conversation", "k", {"json": json.dumps({"conversations": turns}).encode(), "png": image}
    )
    # The image is probed when the sample is built and prepared when a rank loads its frames.
    assert sample.num_frames == 1
    assert load_frames(sample.frames, 0, 1).shape == (1, 3, 28, 28)
    media = (sample.media_index >= 0).nonzero().flatten()
    assert sample.media_index[media].tolist() == [0, 1, 2, 3]
    assert (sample.input_ids[media] == layout.image_id).all()
    assert sample.input_ids[media[-1] + 1] == layout.newline_id  # "\n" after the frame
    targets = enc(tokenizer, "red" + IM_END)
    labelled = sample.labels[sample.labels != IGNORE_INDEX].tolist()
    assert labelled == targets
    # Shifted once: the label sits one position before its token; the sample's last is ignored.
    first = (sample.labels != IGNORE_INDEX).nonzero()[0].item()
    assert sample.input_ids[first + 1 : first + 1 + len(targets)].tolist() == targets
    assert sample.labels[-1] == IGNORE_INDEX
    assert sample.input_ids[-1] == newline_token_id(tokenizer)  # ChatML ends with "\n"
