"""Tensor-by-tensor correspondence between the HF (VILA layout) and Megatron parameter names.

Each `Rule` ties one Megatron tensor to the HF tensor(s) it is made of and knows how to fuse them
(HF -> Megatron) and split them again (Megatron -> HF). Conversion, HF loading and export all walk
the same rules, one tensor at a time, so no step needs a whole-model copy.

Megatron names are those of `LongVILAModel` (`llm.`, `vision_tower.`, `mm_projector.`); HF names
are relative to the VILA-layout subfolder (`llm/`, `vision_tower/`, `mm_projector/`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longvila_mcore.config import ModelConfig
from longvila_mcore.models.projector import check_projector_type

Tensor = torch.Tensor


def _one(tensors: list[Tensor]) -> Tensor:
    return tensors[0]


def _unsplit(tensor: Tensor) -> list[Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Rule:
    mcore: str
    component: str
    """HF subfolder: `llm`, `vision_tower` or `mm_projector`."""
    hf: tuple[str, ...]
    fuse: Callable[[list[Tensor]], Tensor] = _one
    split: Callable[[Tensor], list[Tensor]] = _unsplit


def _qkv_rules(prefix: str, hf_prefix: str, heads: int, kv_heads: int, component: str):
    """Megatron's fused QKV holds, per KV group, that group's query heads then its K and V head."""
    group = heads // kv_heads

    def fuse(tensors: list[Tensor]) -> Tensor:
        q, k, v = tensors
        rest = q.shape[1:]
        q = q.reshape(kv_heads, group, -1, *rest)
        k = k.reshape(kv_heads, 1, -1, *rest)
        v = v.reshape(kv_heads, 1, -1, *rest)
        return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

    def split(fused: Tensor) -> list[Tensor]:
        rest = fused.shape[1:]
        grouped = fused.reshape(kv_heads, group + 2, -1, *rest)
        q, k, v = grouped.split([group, 1, 1], dim=1)
        return [t.reshape(-1, *rest).clone() for t in (q, k, v)]

    names = [f"{hf_prefix}.{p}_proj" for p in "qkv"]
    return [
        Rule(
            f"{prefix}.linear_qkv.{kind}",
            component,
            tuple(f"{n}.{kind}" for n in names),
            fuse,
            split,
        )
        for kind in ("weight", "bias")
    ]


def _gate_up_fuse(tensors: list[Tensor]) -> Tensor:
    return torch.cat(tensors, dim=0)


def _gate_up_split(fused: Tensor) -> list[Tensor]:
    return [t.clone() for t in fused.chunk(2, dim=0)]


def _pad_rows(rows: int):
    """Embedding rows padded for tensor parallelism (zeros, never selected: logits are -inf)."""

    def fuse(tensors: list[Tensor]) -> Tensor:
        t = tensors[0]
        if t.shape[0] == rows:
            return t
        return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])

    return fuse


def _strip_rows(rows: int):
    def split(t: Tensor) -> list[Tensor]:
        return [t[:rows].clone()]

    return split


def qwen2_rules(model: ModelConfig, padded_vocab: int) -> list[Rule]:
    llm = model.llm
    c = "llm"
    rules = [
        Rule(
            "llm.embedding.word_embeddings.weight",
            c,
            ("model.embed_tokens.weight",),
            _pad_rows(padded_vocab),
            _strip_rows(llm.vocab_size),
        ),
        Rule("llm.decoder.final_layernorm.weight", c, ("model.norm.weight",)),
    ]
    if not llm.tie_word_embeddings:
        rules.append(
            Rule(
                "llm.output_layer.weight",
                c,
                ("lm_head.weight",),
                _pad_rows(padded_vocab),
                _strip_rows(llm.vocab_size),
            )
        )
    for i in range(llm.num_layers):
        m, h = f"llm.decoder.layers.{i}", f"model.layers.{i}"
        rules += [
            Rule(f"{m}.input_layernorm.weight", c, (f"{h}.input_layernorm.weight",)),
            Rule(f"{m}.pre_mlp_layernorm.weight", c, (f"{h}.post_attention_layernorm.weight",)),
            Rule(f"{m}.self_attention.linear_proj.weight", c, (f"{h}.self_attn.o_proj.weight",)),
            Rule(
                f"{m}.mlp.linear_fc1.weight",
                c,
                (f"{h}.mlp.gate_proj.weight", f"{h}.mlp.up_proj.weight"),
                _gate_up_fuse,
                _gate_up_split,
            ),
            Rule(f"{m}.mlp.linear_fc2.weight", c, (f"{h}.mlp.down_proj.weight",)),
            *_qkv_rules(
                f"{m}.self_attention",
                f"{h}.self_attn",
                llm.num_attention_heads,
                llm.num_key_value_heads,
                c,
            ),
        ]
    return rules


# Tensors of SigLIP's attention-pooling head, held unchanged under the same names (see siglip.py).
_SIGLIP_HEAD = (
    "probe",
    "attention.in_proj_weight",
    "attention.in_proj_bias",
    "attention.out_proj.weight",
    "attention.out_proj.bias",
    "layernorm.weight",
    "layernorm.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)


def siglip_rules(model: ModelConfig) -> list[Rule]:
    """The vision tower, every layer included (not only the used ones), and the head if any.

    HF names carry the `vision_model.` prefix of the released checkpoints (written by transformers
    4.x); transformers 5 saves `SiglipVisionModel` without it and loads both.
    """
    vision = model.vision
    c, m, h = "vision_tower", "vision_tower", "vision_model"
    rules = [
        Rule(f"{m}.patch_embedding.weight", c, (f"{h}.embeddings.patch_embedding.weight",)),
        Rule(f"{m}.patch_embedding.bias", c, (f"{h}.embeddings.patch_embedding.bias",)),
        Rule(f"{m}.position_embedding.weight", c, (f"{h}.embeddings.position_embedding.weight",)),
        Rule(f"{m}.encoder.final_layernorm.weight", c, (f"{h}.post_layernorm.weight",)),
        Rule(f"{m}.encoder.final_layernorm.bias", c, (f"{h}.post_layernorm.bias",)),
    ]
    for i in range(vision.num_layers):
        ml, hl = f"{m}.encoder.layers.{i}", f"{h}.encoder.layers.{i}"
        for kind in ("weight", "bias"):
            rules += [
                Rule(f"{ml}.input_layernorm.{kind}", c, (f"{hl}.layer_norm1.{kind}",)),
                Rule(
                    f"{ml}.self_attention.linear_proj.{kind}",
                    c,
                    (f"{hl}.self_attn.out_proj.{kind}",),
                ),
                Rule(f"{ml}.pre_mlp_layernorm.{kind}", c, (f"{hl}.layer_norm2.{kind}",)),
                Rule(f"{ml}.mlp.linear_fc1.{kind}", c, (f"{hl}.mlp.fc1.{kind}",)),
                Rule(f"{ml}.mlp.linear_fc2.{kind}", c, (f"{hl}.mlp.fc2.{kind}",)),
            ]
        heads = vision.num_attention_heads
        rules += _qkv_rules(f"{ml}.self_attention", f"{hl}.self_attn", heads, heads, c)
    if vision.use_head:
        rules += [Rule(f"{m}.head.{name}", c, (f"{h}.head.{name}",)) for name in _SIGLIP_HEAD]
    return rules


def projector_rules(model: ModelConfig) -> list[Rule]:
    """`mlp_downsample`: `layers.1` is the LayerNorm, `layers.2` and `layers.4` the Linears."""
    check_projector_type(model)
    return [
        Rule(f"mm_projector.layers.{i}.{kind}", "mm_projector", (f"layers.{i}.{kind}",))
        for i in (1, 2, 4)
        for kind in ("weight", "bias")
    ]


def tensor_parallel_slice(full: Tensor, param: torch.nn.Parameter, rank: int, size: int) -> Tensor:
    """This rank's part of a full Megatron tensor, the way Megatron splits `param`.

    A parameter split along `partition_dim` with `partition_stride` s is cut into size x s pieces
    and rank r holds pieces r, r + size, ... (s = 2 for the fused gate/up MLP weight, so each rank
    gets its slice of the gate and of the up projection).
    """
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = full.chunk(size * stride, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim)
