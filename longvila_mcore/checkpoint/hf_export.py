"""Write the VILA layout (REFERENCE 2), the way back from this project's checkpoints.

The config files are written the way transformers 4.x wrote them (`rope_theta` / `rope_scaling`,
`torch_dtype`; transformers 5 reads these too), over the ones a checkpoint carried from its HF
origin, and the tensors as transformers saves them, in files of at most 5 GB. The tokenizer goes
into `llm/` in the form of the releases, which VILA's code (transformers 4.46) reads: see
`write_tokenizer`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from longvila_mcore.checkpoint.hf import DEFAULT_NUM_FRAMES, TOKEN_ORDER_KEY, dtype_name
from longvila_mcore.config import ModelConfig
from longvila_mcore.data.tokenizer import CHAT_TEMPLATE

MAX_SHARD_BYTES = 5 * 10**9
"""Size limit of one safetensors file: transformers 4.x's `max_shard_size="5GB"`."""


class SafetensorsFiles:
    """One component's tensors, saved as transformers saves them: `model.safetensors`, or files
    of at most `max_bytes` named `model-0000i-of-0000n.safetensors` plus an index."""

    def __init__(self, folder: Path, max_bytes: int):
        folder.mkdir(parents=True)
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = self.total_bytes = 0
        self.written: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"part-{len(self.written)}.safetensors"
        save_file(self.pending, path, metadata={"format": "pt"})
        self.written.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        count = len(self.written)
        if count == 1:
            (self.folder / "part-0.safetensors").rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"part-{i}.safetensors").rename(self.folder / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


_QWEN2_DEFAULTS = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
}
_SIGLIP_DEFAULTS = {
    "architectures": ["SiglipVisionModel"],
    "model_type": "siglip_vision_model",
    "hidden_act": "gelu_pytorch_tanh",
    "attention_dropout": 0.0,
    "num_channels": 3,
}
_PREPROCESSOR_DEFAULTS = {
    "image_processor_type": "SiglipImageProcessor",
    "processor_class": "SiglipProcessor",
    "do_resize": True,
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
}
_PROJECTOR_DEFAULTS = {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector"}
_VILA_DEFAULTS = {
    "architectures": ["LlavaLlamaModel"],
    "model_type": "llava_llama",
    "mm_vision_select_feature": "cls_patch",
    "image_aspect_ratio": "resize",
    "num_video_frames": DEFAULT_NUM_FRAMES,
    "fps": 0.0,
}
# transformers 5 spellings, written back the way 4.x wrote them (torch_dtype, rope_theta and
# rope_scaling), which both read.
_TRANSFORMERS5_KEYS = ("dtype", "rope_parameters")


def _merged(defaults: dict, carried: dict | None, **fields) -> dict[str, Any]:
    merged = {**defaults, **(carried or {})}
    for key in _TRANSFORMERS5_KEYS:
        merged.pop(key, None)
    return merged | fields


def hf_configs(
    cfg: ModelConfig, carried: dict[str, Any], dtypes: dict[str, torch.dtype]
) -> dict[str, dict[str, Any]]:
    """The VILA layout's config files (keys of CONFIG_FILES) for `cfg`, over the carried ones."""
    llm, vision = cfg.llm, cfg.vision
    scaling = llm.rope_scaling_factor
    llm_cfg = _merged(
        _QWEN2_DEFAULTS,
        carried.get("llm"),
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position_embeddings,
        tie_word_embeddings=llm.tie_word_embeddings,
        rope_theta=llm.rope_theta,
        rope_scaling=None if scaling is None else {"type": "linear", "factor": scaling},
        torch_dtype=dtype_name(dtypes["llm"]),
    )
    tower_fields = dict(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        layer_norm_eps=vision.layer_norm_eps,
        vision_use_head=vision.use_head,
    )
    tower_cfg = carried.get("vision_tower") or {}
    dtype = {"torch_dtype": dtype_name(dtypes["vision_tower"])}
    if "vision_config" in tower_cfg:  # a full SiglipConfig: the tower is its vision part
        nested = _merged({}, tower_cfg["vision_config"], **tower_fields)
        tower_cfg = _merged({}, tower_cfg, vision_config=nested, **dtype)
    else:
        tower_cfg = _merged(_SIGLIP_DEFAULTS, tower_cfg, **tower_fields, **dtype)
    projector_cfg = _merged(
        _PROJECTOR_DEFAULTS,
        carried.get("mm_projector"),
        mm_projector_type=cfg.projector_type,
        torch_dtype=dtype_name(dtypes["mm_projector"]),
        **{TOKEN_ORDER_KEY: cfg.token_order},
    )
    configs = {
        "config": _merged(
            _VILA_DEFAULTS,
            carried.get("config"),
            hidden_size=llm.hidden_size,
            mm_hidden_size=vision.hidden_size,
            mm_vision_select_layer=vision.select_layer,
            llm_cfg=llm_cfg,
            vision_tower_cfg=tower_cfg,
            mm_projector_cfg=projector_cfg,
        ),
        "llm": llm_cfg,
        "vision_tower": tower_cfg,
        "preprocessor": _merged(
            _PREPROCESSOR_DEFAULTS,
            carried.get("preprocessor"),
            image_mean=list(vision.image_mean),
            image_std=list(vision.image_std),
            size={"height": vision.image_size, "width": vision.image_size},
        ),
        "mm_projector": projector_cfg,
    }
    if carried.get("generation_config"):
        configs["generation_config"] = carried["generation_config"]
    return configs


CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CLASSES_4X = {"TokenizersBackend": "PreTrainedTokenizerFast"}
"""Tokenizer class names that only transformers 5 knows, and the 4.x class that reads the same
`tokenizer.json` as it is. (Its `Qwen2Tokenizer`, which the releases name and 4.x reads as
Qwen2TokenizerFast, would not do for another BPE: transformers 5 rebuilds a Qwen2Tokenizer's
pre-tokenizer and normaliser as Qwen2's instead of taking those of `tokenizer.json`.)"""
LOADING_KEYS = ("is_local", "local_files_only")
"""Keys transformers 5 records about how a tokenizer was loaded, not what it is."""
_ADDED_TOKEN_FIELDS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def write_tokenizer(src: Path, dst: Path) -> None:
    """The tokenizer files of `src` into `dst` in the form the releases have them.

    transformers 4.46 (VILA's) needs a tokenizer class it knows and the chat template inline in
    `tokenizer_config.json` (it does not read `chat_template.jinja`, which transformers 5 writes
    instead); the added tokens, VILA's media tokens among them (special, never split), are listed
    in `added_tokens_decoder` as 4.x wrote them. transformers 5 reads this form too. A tokenizer
    without a template gets the ChatML one this project renders prompts with when there is none
    (data/chat.py), so both sides build the same prompts. Every other file is copied unchanged.
    """
    config = json.loads((src / "tokenizer_config.json").read_text())
    for file in src.iterdir():
        if file.is_file() and file.name not in ("tokenizer_config.json", CHAT_TEMPLATE_FILE):
            shutil.copy2(file, dst / file.name)
    template = src / CHAT_TEMPLATE_FILE
    if template.is_file():
        config["chat_template"] = template.read_text()
    if not config.get("chat_template"):
        config["chat_template"] = CHAT_TEMPLATE
    name = config.get("tokenizer_class")
    config["tokenizer_class"] = TOKENIZER_CLASSES_4X.get(name, name)
    for key in LOADING_KEYS:
        config.pop(key, None)
    tokenizer_json = src / "tokenizer.json"
    if tokenizer_json.is_file():
        added = json.loads(tokenizer_json.read_text()).get("added_tokens", [])
        config["added_tokens_decoder"] = {
            str(t["id"]): {k: t[k] for k in _ADDED_TOKEN_FIELDS if k in t} for t in added
        }
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
