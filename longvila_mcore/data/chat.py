"""Conversations through the tokenizer's chat template, with assistant-only targets.

A LLaVA-style conversation (`{"from": "human" | "gpt", "value": ...}` turns, an `<image>` or
`<video>` placeholder in a human turn) becomes chat messages in which the media token opens the
user turn, immediately followed by its text (`<vila/video>What happens?`, REFERENCE 1). The
rendered text is tokenised piece by piece so that exactly the assistant replies and the
`<|im_end|>` after each are targets, whatever the template around them looks like.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from longvila_mcore.data.tokenizer import (
    CHAT_TEMPLATE,
    IM_END,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    encode_text,
)

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PLACEHOLDER = re.compile(r"\s*<(?:image|video)>\s*")
"""LLaVA's media placeholders, with the whitespace around them (usually a newline)."""
MEDIA_TOKENS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}


class ConversationError(ValueError):
    """A conversation that cannot be trained on (no assistant turn, placeholders not matching)."""


def conversation_messages(conversations: object, media: str | None) -> list[dict[str, str]]:
    """Chat messages of a LLaVA-style conversation about one `media` ("image", "video" or None).

    Its placeholders (`<image>` or `<video>`, either for either media) must number one when there
    is media and none otherwise; the media token then opens that user turn.
    """
    if not isinstance(conversations, list) or not conversations:
        raise ConversationError("no 'conversations' list")
    messages = []
    placeholders = 0
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES:
            raise ConversationError(f"turn {turn!r} is not {{'from': human|gpt|system, ...}}")
        text = turn.get("value")
        if not isinstance(text, str):
            raise ConversationError(f"turn {turn!r} has no text 'value'")
        role = ROLES[turn["from"]]
        count = len(PLACEHOLDER.findall(text))
        if count and role != "user":
            raise ConversationError(f"a media placeholder outside a human turn: {text!r}")
        if count and media:  # a count other than one is rejected below
            text = MEDIA_TOKENS[media] + PLACEHOLDER.sub(" ", text).strip()
        placeholders += count
        messages.append({"role": role, "content": text})
    expected = 1 if media else 0
    if placeholders != expected:
        raise ConversationError(
            f"{placeholders} media placeholders for {expected} {media or 'media'} item(s)"
        )
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user" or "assistant" not in roles:
        raise ConversationError("a conversation must open with a human turn and have a gpt reply")
    return messages


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> tuple[list[int], list[bool]]:
    """Token ids of `messages` through the chat template, and which of them are targets.

    Targets are each assistant reply and the `<|im_end|>` closing it. Each reply's place is found
    by rendering the conversation up to it with the generation prompt, so any template that
    renders a reply as `<generation prompt><reply><|im_end|>` works; a tokenizer without a
    template gets ChatML.
    """
    text = _apply_template(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _apply_template(tokenizer, messages[:k], add_generation_prompt=True)
        target = message["content"] + IM_END
        if not text.startswith(prefix) or not text.startswith(target, len(prefix)):
            raise ValueError(
                "the tokenizer's chat template does not render an assistant reply as "
                f"<generation prompt><reply>{IM_END}; use a ChatML template (data/tokenizer.py)"
            )
        spans.append((len(prefix), len(prefix) + len(target)))
    ids: list[int] = []
    is_target: list[bool] = []
    start = 0
    for span_start, span_end in [*spans, (len(text), len(text))]:
        for piece, target in ((text[start:span_start], False), (text[span_start:span_end], True)):
            piece_ids = encode_text(tokenizer, piece)
            ids += piece_ids
            is_target += [target] * len(piece_ids)
        start = span_end
    return ids, is_target


def render_prompt(
    tokenizer: PreTrainedTokenizerBase, prompt: str, media: str | None = "video"
) -> list[int]:
    """Token ids of one user turn (opened by the `media` token, if any) and the opened assistant
    turn: the generation prompt, tokenised exactly as the prefix of a training sample."""
    content = MEDIA_TOKENS[media] + prompt if media else prompt
    text = _apply_template(tokenizer, [{"role": "user", "content": content}], True)
    return encode_text(tokenizer, text)


def _apply_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = False,
) -> str:
    """The tokenizer's chat template, or ChatML (REFERENCE 1) for a tokenizer without one."""
    return tokenizer.apply_chat_template(
        list(messages),
        chat_template=tokenizer.chat_template or CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
