"""Conversations through the tokenizer's chat template, with assistant-only targets.

A LLaVA-style conversation (`{"from": "human" | "gpt", "value": ...}` turns, `<image>` or
`<video>` placeholders in human turns) becomes chat messages as VILA's `LLaVADataset` makes them:
every placeholder is removed and the media tokens, one per medium and in the sample's order, open
the first human turn, immediately followed by its text (`<image><vila/video>What happens?`,
REFERENCE 1). The rendered text is tokenised piece by piece so that exactly the assistant replies
and the `<|im_end|>` after each are targets, whatever the template around them looks like.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from longvila_mcore.data.tokenizer import (
    CHAT_TEMPLATE,
    IM_END,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    encode_text,
)
from longvila_mcore.errors import ConfigError, DataError

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PLACEHOLDERS = ("<image>", "<video>")
"""LLaVA's media placeholders; either stands for either kind of medium."""
MEDIA_TOKENS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}


class ConversationError(DataError):
    """A conversation that cannot be trained on (no assistant turn, placeholders not matching)."""


def media_prefix(media: Sequence[str]) -> str:
    """The media tokens that open the first user turn: one per medium ("image" / "video"), in
    order, nothing between them (VILA's `extract_media`)."""
    unknown = [m for m in media if m not in MEDIA_TOKENS]
    if unknown:
        raise DataError(f"media kinds {unknown} are not 'image' or 'video'")
    return "".join(MEDIA_TOKENS[m] for m in media)


def remove_placeholders(text: str) -> str:
    """`text` without its placeholders and the newline each usually has, stripped; the same
    string VILA trains on (`_remove_media_tokens`, applied to every turn)."""
    for token in PLACEHOLDERS:
        text = text.replace(token + "\n", "").replace("\n" + token, "").replace(token, "")
    return text.strip()


def conversation_messages(conversations: object, media: Sequence[str] = ()) -> list[dict[str, str]]:
    """Chat messages of a LLaVA-style conversation about `media` (each "image" or "video").

    Turns alternate human / gpt after any system turns, opening with human, with at least one gpt
    reply; the placeholders, all in human turns, number as many as the media. Every turn is
    stripped of its placeholders and the media tokens open the first human turn.
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
        count = sum(text.count(token) for token in PLACEHOLDERS)
        if count and role != "user":
            raise ConversationError(f"a media placeholder outside a human turn: {text!r}")
        placeholders += count
        messages.append({"role": role, "content": remove_placeholders(text)})
    if placeholders != len(media):
        raise ConversationError(
            f"{placeholders} media placeholders for {len(media)} media ({', '.join(media) or 'none'});"
            " a sample needs one <image> or <video> per medium"
        )
    first = next((k for k, m in enumerate(messages) if m["role"] != "system"), len(messages))
    roles = [m["role"] for m in messages[first:]]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise ConversationError(
            f"turns go {'/'.join(r for r in roles)}: after any system turns a conversation "
            "alternates human and gpt, opening with human"
        )
    if len(roles) < 2:
        raise ConversationError("a conversation needs a gpt reply")
    messages[first]["content"] = media_prefix(media) + messages[first]["content"]
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
            raise ConfigError(
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
    tokenizer: PreTrainedTokenizerBase, prompt: str, media: Sequence[str] = ("video",)
) -> list[int]:
    """Token ids of one user turn (opened by the tokens of `media`, each "image" or "video", in
    order) and the opened assistant turn: the generation prompt, tokenised exactly as the prefix
    of a training sample."""
    content = media_prefix(media) + prompt
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
