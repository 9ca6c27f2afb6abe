"""Read released LongVILA checkpoints (the HF "VILA layout", REFERENCE 2).

```
model_dir/
  config.json       top level: mm_vision_select_layer, num_video_frames, ...
  llm/              Qwen2ForCausalLM safetensors + config + tokenizer
  vision_tower/     SiglipVisionModel safetensors + config + preprocessor_config.json
  mm_projector/     config {"mm_projector_type": "mlp_downsample"} + safetensors
```

The projector's token order is not part of VILA's configs: it is `raster` (the Qwen2 LongVILA
releases) unless `mm_projector/config.json` has our `token_order` key (written by mcore-to-hf) or
the caller overrides it (`--token-order`).

`llm/config.json` is accepted as transformers 4.x wrote it (`rope_theta`, `rope_scaling`) and as
5.x writes it (`rope_parameters`). Tensors are read one at a time (safetensors is memory-mapped).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from megatron.core import parallel_state
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from longvila_mcore.checkpoint.mapping import Rule, projector_rules, qwen2_rules, siglip_rules
from longvila_mcore.checkpoint.tensors import CheckpointError, load_full_tensors
from longvila_mcore.config import (
    TOKEN_ORDERS,
    LLMConfig,
    ModelConfig,
    ParallelConfig,
    VisionConfig,
    with_token_order,
)
from longvila_mcore.data.tokenizer import MediaTokenIds, ensure_media_tokens
from longvila_mcore.models.longvila import LongVILAModel
from longvila_mcore.models.projector import SUPPORTED_PROJECTORS
from longvila_mcore.models.qwen2 import padded_vocab_size

log = logging.getLogger(__name__)

COMPONENTS = ("llm", "vision_tower", "mm_projector")
DEFAULT_NUM_FRAMES = 8
"""Frames a video is sampled to when a checkpoint does not say (`num_video_frames`)."""
CONFIG_FILES = {
    "config": "config.json",
    "llm": "llm/config.json",
    "generation_config": "llm/generation_config.json",
    "vision_tower": "vision_tower/config.json",
    "preprocessor": "vision_tower/preprocessor_config.json",
    "mm_projector": "mm_projector/config.json",
}
"""The VILA layout's config files, by their key under "hf" in longvila.json."""
TOKEN_ORDER_KEY = "token_order"
"""Our key in `mm_projector/config.json` for `ModelConfig.token_order`. VILA's code ignores it
(its projector config keeps only `mm_projector_type`); without it, the order is the releases'
raster one."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a VILA-layout checkpoint (REFERENCE 2)")
    with open(path) as f:
        return json.load(f)


def check_layout(hf_dir: str | Path) -> Path:
    """The checkpoint directory, once its top-level config and three subfolders are found."""
    root = Path(hf_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    missing = [c for c in COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise CheckpointError(
            f"{root} has no {', '.join(s + '/' for s in missing)} subfolder: expected the VILA "
            "layout (config.json, llm/, vision_tower/, mm_projector/)"
        )
    _read_json(root / "config.json")
    return root


def _rope(cfg: dict, where: Path) -> tuple[float, float | None]:
    """(theta, linear scaling factor) from a 4.x or 5.x Qwen2 config."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{where} gives no rope_theta (nor rope_parameters.rope_theta)")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), float(scaling["factor"])
    raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (only linear)")


def read_model_config(hf_dir: str | Path) -> ModelConfig:
    """The model dimensions of a VILA-layout checkpoint."""
    root = check_layout(hf_dir)
    top = _read_json(root / "config.json")
    llm_cfg = _read_json(root / "llm" / "config.json")
    tower = _read_json(root / "vision_tower" / "config.json")
    tower = tower.get("vision_config", tower)  # a full SiglipConfig nests the vision part
    projector = _read_json(root / "mm_projector" / "config.json")
    projector_type = projector.get("mm_projector_type")
    if projector_type not in SUPPORTED_PROJECTORS:
        raise CheckpointError(
            f"{root / 'mm_projector' / 'config.json'}: projector type {projector_type!r} is not "
            f"supported (supported: {', '.join(SUPPORTED_PROJECTORS)})"
        )
    order = projector.get(TOKEN_ORDER_KEY, "raster")
    if order not in TOKEN_ORDERS:
        raise CheckpointError(
            f"{root / 'mm_projector' / 'config.json'}: {TOKEN_ORDER_KEY} {order!r} is not one of "
            f"{', '.join(TOKEN_ORDERS)}"
        )
    theta, factor = _rope(llm_cfg, root / "llm" / "config.json")
    llm = LLMConfig(
        vocab_size=llm_cfg["vocab_size"],
        hidden_size=llm_cfg["hidden_size"],
        num_layers=llm_cfg["num_hidden_layers"],
        num_attention_heads=llm_cfg["num_attention_heads"],
        num_key_value_heads=llm_cfg.get("num_key_value_heads", llm_cfg["num_attention_heads"]),
        ffn_hidden_size=llm_cfg["intermediate_size"],
        rope_theta=theta,
        rope_scaling_factor=factor,
        rms_norm_eps=llm_cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=llm_cfg.get("tie_word_embeddings", False),
        max_position_embeddings=llm_cfg.get("max_position_embeddings", 32768),
    )
    preprocessor_path = root / "vision_tower" / "preprocessor_config.json"
    preprocessor = _read_json(preprocessor_path) if preprocessor_path.is_file() else {}
    vision = VisionConfig(
        image_size=tower.get("image_size", 224),
        patch_size=tower.get("patch_size", 16),
        hidden_size=tower["hidden_size"],
        num_layers=tower["num_hidden_layers"],
        num_attention_heads=tower["num_attention_heads"],
        ffn_hidden_size=tower["intermediate_size"],
        layer_norm_eps=tower.get("layer_norm_eps", 1e-6),
        select_layer=top.get("mm_vision_select_layer", -2),
        image_mean=tuple(preprocessor.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(preprocessor.get("image_std", (0.5, 0.5, 0.5))),
        use_head=tower.get("vision_use_head", True),
    )
    return ModelConfig(
        name=root.name, llm=llm, vision=vision, projector_type=projector_type, token_order=order
    )


def _released_name(component: str, name: str) -> str:
    """transformers 5 saves SiglipVisionModel without the `vision_model.` prefix that the
    released (4.x) checkpoints have; index both under the released name."""
    if component == "vision_tower" and not name.startswith("vision_model."):
        return f"vision_model.{name}"
    return name


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}


class SafetensorsReader:
    """Tensors of the three subfolders by (component, name), read lazily one at a time."""

    def __init__(self, hf_dir: str | Path):
        root = check_layout(hf_dir)
        self._files: dict[str, dict[str, tuple[Path, str]]] = {}
        self._headers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
        for component in COMPONENTS:
            files = sorted((root / component).glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{root / component} holds no *.safetensors file")
            index, headers = {}, {}
            for path in files:
                with safe_open(path, "pt") as f:
                    for stored in f.keys():  # noqa: SIM118
                        name, info = _released_name(component, stored), f.get_slice(stored)
                        index[name] = (path, stored)
                        headers[name] = (tuple(info.get_shape()), info.get_dtype())
            self._files[component] = index
            self._headers[component] = headers

    def names(self, component: str) -> set[str]:
        return set(self._files[component])

    def shape(self, component: str, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (nothing is read)."""
        return self._headers[component][name][0]

    def dtype(self, component: str) -> torch.dtype:
        """The dtype of a component's tensors; float32 (which holds each of them exactly) when
        they are mixed."""
        kinds = {dtype for _, dtype in self._headers[component].values()}
        if len(kinds) == 1 and (kind := kinds.pop()) in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[kind]
        return torch.float32

    def read(self, component: str, name: str) -> torch.Tensor:
        """One tensor by its released name."""
        found = self._files[component].get(name)
        if found is None:
            raise CheckpointError(f"tensor {component}/{name} is missing from the checkpoint")
        path, stored_name = found
        with safe_open(path, "pt") as f:
            return f.get_tensor(stored_name)

    def check_complete(self, rules: list[Rule], ignore: dict[str, set[str]] | None = None):
        """Raise naming any tensor the rules need but the files lack, or the other way round."""
        ignore = ignore or {}
        for component in COMPONENTS:
            wanted = {n for r in rules if r.component == component for n in r.hf}
            have = self.names(component) - ignore.get(component, set())
            if missing := sorted(wanted - have):
                raise CheckpointError(
                    f"{component}/ lacks {len(missing)} tensor(s) the model needs, e.g. "
                    f"{missing[0]}: the checkpoint does not match its config"
                )
            if unexpected := sorted(have - wanted):
                raise CheckpointError(
                    f"{component}/ has {len(unexpected)} tensor(s) the model does not use, e.g. "
                    f"{unexpected[0]}: the checkpoint does not match its config"
                )


def hf_origin(root: Path, reader: SafetensorsReader) -> dict[str, Any]:
    """What a checkpoint of ours keeps of the VILA-layout checkpoint it started from (its
    config files and dtypes), so that exporting it back gives the configs users had."""
    carried = {key: _optional_json(root / path) for key, path in CONFIG_FILES.items()}
    return {**carried, "dtypes": {c: dtype_name(reader.dtype(c)) for c in COMPONENTS}}


def _optional_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_tokenizer(hf_dir: str | Path) -> tuple[PreTrainedTokenizerBase, MediaTokenIds]:
    """The tokenizer of `llm/`, with VILA's media tokens added when it lacks them."""
    tokenizer = AutoTokenizer.from_pretrained(check_layout(hf_dir) / "llm")
    return tokenizer, ensure_media_tokens(tokenizer)


def read_config_and_tokenizer(
    hf_dir: str | Path, token_order: str | None = None
) -> tuple[ModelConfig, PreTrainedTokenizerBase, MediaTokenIds]:
    """The model config and tokenizer of a checkpoint, the vocabulary grown to the tokenizer.

    When the tokenizer lacked the media tokens, the embedding (and untied output) tables grow to
    the new vocabulary; the added rows are zero (media-token embeddings are never used as inputs).
    `token_order` overrides the projector's token order (None: the checkpoint's, see above).
    """
    cfg = with_token_order(read_model_config(hf_dir), token_order, hf_dir)
    tokenizer, media = load_tokenizer(hf_dir)
    cfg.llm.vocab_size = max(cfg.llm.vocab_size, len(tokenizer))
    return cfg, tokenizer, media


def tokenizer_files(hf_dir: str | Path) -> list[Path]:
    """The files of `llm/` other than the model's own (its config, generation config and
    weights): the tokenizer, whatever files its kind uses."""
    model_files = {"config.json", "generation_config.json"}
    weights = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
    return sorted(
        p
        for p in (check_layout(hf_dir) / "llm").iterdir()
        if p.is_file() and p.name not in model_files and not p.name.endswith(weights)
    )


def unused_tensors(cfg: ModelConfig) -> dict[str, set[str]]:
    """HF tensors a checkpoint may hold that the model does not load, by component: tied
    checkpoints sometimes still store the (identical) output matrix."""
    return {"llm": {"lm_head.weight"}} if cfg.llm.tie_word_embeddings else {}


def longvila_rules(cfg: ModelConfig, tp: int) -> list[Rule]:
    """Every tensor of the composed model: decoder, tower, projector."""
    padded = padded_vocab_size(cfg.llm.vocab_size, tp)
    return qwen2_rules(cfg, padded) + siglip_rules(cfg) + projector_rules(cfg)


def stage_rules(cfg: ModelConfig, tp: int) -> list[Rule]:
    """`longvila_rules` for filling one pipeline stage: with tied embeddings a last stage
    without the first holds its own copy of the embedding as its output layer (Megatron sums
    the two copies' gradients), filled from the same HF tensor."""
    rules = longvila_rules(cfg, tp)
    if cfg.llm.tie_word_embeddings:
        embedding = next(r for r in rules if r.mcore == "llm.embedding.word_embeddings.weight")
        rules.append(dataclasses.replace(embedding, mcore="llm.output_layer.weight"))
    return rules


def fill_from_vila(model: LongVILAModel, hf_dir: str | Path) -> None:
    """Fill this rank's shard of `model` from a VILA-layout checkpoint, tensor by tensor."""
    cfg = model.cfg
    rules = stage_rules(cfg, parallel_state.get_tensor_model_parallel_world_size())
    reader = SafetensorsReader(hf_dir)
    reader.check_complete(rules, unused_tensors(cfg))
    load_full_tensors(
        model,
        rules,
        reader.read,
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )


def load_vila(
    hf_dir: str | Path,
    parallel: ParallelConfig,
    device: torch.device,
    dtype: torch.dtype,
    token_order: str | None = None,
) -> tuple[LongVILAModel, PreTrainedTokenizerBase]:
    """Build LongVILAModel for this rank's layout and fill it from a VILA-layout checkpoint."""
    cfg, tokenizer, _ = read_config_and_tokenizer(hf_dir, token_order)
    model = LongVILAModel(cfg, parallel, device, dtype, initialize=False)
    fill_from_vila(model, hf_dir)
    return model, tokenizer
