"""Tokenizer facts shared by the data pipeline and generation: special tokens, ChatML, media ids.

The released checkpoints ship Qwen2's tokenizer with VILA's three media tokens appended
(REFERENCE 1). `train_tokenizer` builds a small byte-level BPE with the same special tokens, in the
same order, and an equivalent chat template, so tiny models and the synthetic data exercise
exactly the code paths of the real tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from longvila_mcore.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
"""ChatML end of turn: the end-of-sequence token of chat models and a target after each reply."""
SENTINEL_TOKEN = "<vila/sentinel>"
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<vila/video>"
QWEN2_SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
MEDIA_TOKENS = (SENTINEL_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN)
"""VILA's additions, in the order the releases appended them (ids 151648-151650)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML as in Qwen2's tokenizer: a default system prompt when the conversation has none."""


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE of `vocab_size` ids in total and save it as HF tokenizer files.

    The regular vocabulary comes first and the six special tokens follow, like Qwen2 + VILA.
    Load the result with `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    """
    specials = QWEN2_SPECIAL_TOKENS + MEDIA_TOKENS
    base = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < base + len(specials):
        raise ConfigError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs the {base} byte tokens "
            f"plus {len(specials)} special tokens; use at least {base + len(specials)}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=IM_END)
    hf.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    # Name the class as transformers 4 knows it too (5 writes its new name, TokenizersBackend).
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"}
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    logger.info("trained a %d-token byte-level BPE into %s", len(hf), out_dir)
    return out_dir


@dataclass(frozen=True)
class MediaTokenIds:
    """Ids of the media placeholder tokens in one tokenizer."""

    image: int
    video: int
    added: bool = False
    """True when `ensure_media_tokens` had to add tokens: the model's embeddings must grow."""


def ensure_media_tokens(tokenizer: PreTrainedTokenizerBase) -> MediaTokenIds:
    """Add VILA's media tokens to `tokenizer` when it lacks them (in place); return their ids."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in MEDIA_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
        logger.info("added media tokens %s to the tokenizer (now %d ids)", missing, len(tokenizer))
    return MediaTokenIds(
        image=token_id(tokenizer, IMAGE_TOKEN),
        video=token_id(tokenizer, VIDEO_TOKEN),
        added=bool(missing),
    )


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of one special token; raises naming the token when the tokenizer lacks it."""
    id_ = tokenizer.get_vocab().get(token)
    if id_ is None:
        fix = (
            "call data.tokenizer.ensure_media_tokens(tokenizer) and resize the embeddings"
            if token in MEDIA_TOKENS
            else "use a ChatML (Qwen2-style) tokenizer"
        )
        raise DataError(f"the tokenizer has no token {token!r}; {fix}")
    return id_


def newline_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of "\\n", which follows every frame; it must be a single token."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if len(ids) != 1:
        raise DataError(
            f'the tokenizer encodes "\\n" as {len(ids)} tokens {ids}; the frame layout needs '
            "exactly one (byte-level BPE tokenizers such as Qwen2's have it)"
        )
    return ids[0]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` alone: special-token strings inside it are parsed, nothing is added."""
    return tokenizer.encode(text, add_special_tokens=False) if text else []
