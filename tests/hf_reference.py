"""Tiny HF `transformers` models with random weights: the independent references of the tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from longvila_mcore.config import LLMConfig, VisionConfig


def tiny_llm_config(**overrides) -> LLMConfig:
    base = dict(
        vocab_size=96,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        ffn_hidden_size=96,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    base.update(overrides)
    return LLMConfig(**base)


def hf_qwen2(llm: LLMConfig, seed: int = 0, qk_scale: float = 1.0) -> Qwen2ForCausalLM:
    """A random Qwen2; `qk_scale` multiplies the query and key projections: with sharper
    attention than the near-uniform attention of a random model, outputs depend on where each
    token sits (the projector's token order)."""
    rope = {"rope_type": "default", "rope_theta": llm.rope_theta}
    if llm.rope_scaling_factor:
        rope = {
            "rope_type": "linear",
            "factor": llm.rope_scaling_factor,
            "rope_theta": llm.rope_theta,
        }
    config = Qwen2Config(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        intermediate_size=llm.ffn_hidden_size,
        rms_norm_eps=llm.rms_norm_eps,
        tie_word_embeddings=llm.tie_word_embeddings,
        max_position_embeddings=llm.max_position_embeddings,
        rope_parameters=rope,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped tensor cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    return model


def tiny_vision_config(**overrides) -> VisionConfig:
    """4 x 4 patches of 4 px; 3 layers of which the first 2 are used (select_layer -2)."""
    base = dict(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_layers=3,
        num_attention_heads=4,
        ffn_hidden_size=48,
    )
    base.update(overrides)
    return VisionConfig(**base)


def hf_siglip(vision: VisionConfig, seed: int = 0) -> SiglipVisionModel:
    config = SiglipVisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=vision.layer_norm_eps,
        vision_use_head=vision.use_head,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = SiglipVisionModel(config).eval()
    with torch.no_grad():  # non-trivial norms and biases (HF zeroes the attention biases)
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def released_siglip_tensors(model: SiglipVisionModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of the released checkpoints.

    Those were written by transformers 4.x with a `vision_model.` prefix, which transformers 5
    drops when saving (and strips when loading).
    """
    return {f"vision_model.{name}": t for name, t in model.state_dict().items()}


def reference_downsample(x: torch.Tensor, token_order: str) -> torch.Tensor:
    """REFERENCE 1 stated cell by cell: `[n, P, C]` -> `[n, h * h, 4C]`, h = ceil(sqrt(P) / 2).

    The token of row pair r and column pair s concatenates grid cells (2r, 2s), (2r, 2s + 1),
    (2r + 1, 2s), (2r + 1, 2s + 1) (zeros outside an odd grid). `raster`: tokens row pair by row
    pair (r major); `legacy`: the transposed order of VILA before December 2024 (s major).
    """
    n, p, c = x.shape
    side = round(p**0.5)
    half = (side + 1) // 2

    def cell(row: int, col: int) -> torch.Tensor:
        if row < side and col < side:
            return x[:, row * side + col]
        return x.new_zeros(n, c)

    def token(r: int, s: int) -> torch.Tensor:
        cells = [(2 * r, 2 * s), (2 * r, 2 * s + 1), (2 * r + 1, 2 * s), (2 * r + 1, 2 * s + 1)]
        return torch.cat([cell(row, col) for row, col in cells], dim=-1)

    if token_order == "raster":
        tokens = [token(r, s) for r in range(half) for s in range(half)]
    elif token_order == "legacy":
        tokens = [token(r, s) for s in range(half) for r in range(half)]
    else:
        raise ValueError(token_order)
    return torch.stack(tokens, dim=1)


def make_vila_checkpoint(
    root: Path,
    tokenizer_dir: Path,
    llm: LLMConfig,
    vision: VisionConfig,
    seed: int = 0,
    transformers4_rope: bool = False,
    qk_scale: float = 1.0,
) -> Path:
    """A released-layout LongVILA checkpoint with random weights, written by HF's own classes.

    `transformers4_rope` rewrites llm/config.json the way transformers 4.x wrote it
    (`rope_theta` / `rope_scaling` instead of `rope_parameters`).
    """
    root = Path(root)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    hf_qwen2(llm, seed, qk_scale).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    if transformers4_rope:
        path = root / "llm" / "config.json"
        cfg = json.loads(path.read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type") == "linear":
            cfg["rope_scaling"] = {"type": "linear", "factor": rope["factor"]}
        path.write_text(json.dumps(cfg))
    tower = hf_siglip(vision, seed + 1)
    tower.save_pretrained(root / "vision_tower")
    size = {"height": vision.image_size, "width": vision.image_size}
    (root / "vision_tower" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_mean": list(vision.image_mean),
                "image_std": list(vision.image_std),
                "size": size,
            }
        )
    )
    (root / "mm_projector").mkdir()
    (root / "mm_projector" / "config.json").write_text(
        json.dumps({"mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"})
    )
    g = torch.Generator().manual_seed(seed + 2)
    wide, hidden = 4 * vision.hidden_size, llm.hidden_size
    projector = {
        "layers.1.weight": 1.0 + 0.1 * torch.randn(wide, generator=g),
        "layers.1.bias": 0.1 * torch.randn(wide, generator=g),
        "layers.2.weight": torch.randn(hidden, wide, generator=g) / wide**0.5,
        "layers.2.bias": 0.1 * torch.randn(hidden, generator=g),
        "layers.4.weight": torch.randn(hidden, hidden, generator=g) / hidden**0.5,
        "layers.4.bias": 0.1 * torch.randn(hidden, generator=g),
    }
    save_file(projector, root / "mm_projector" / "model.safetensors")
    top = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "hidden_size": hidden,
        "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": vision.select_layer,
        "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": "resize",
        "num_video_frames": 8,
        "fps": 0.0,
    }
    (root / "config.json").write_text(json.dumps(top))
    return root


class HFLongVILA:
    """LongVILA assembled from HF modules and REFERENCE 1, independent of our model code; the
    projector's tokens in `token_order` (raster: the Qwen2 releases, legacy: VILA1.5 era)."""

    def __init__(self, root: Path, token_order: str = "raster"):
        root = Path(root)
        self.token_order = token_order
        self.llm = Qwen2ForCausalLM.from_pretrained(
            root / "llm", attn_implementation="eager"
        ).eval()
        self.tower = SiglipVisionModel.from_pretrained(
            root / "vision_tower", attn_implementation="eager"
        ).eval()
        self.projector = load_file(root / "mm_projector" / "model.safetensors")
        self.select_layer = json.loads((root / "config.json").read_text())["mm_vision_select_layer"]

    def frame_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """`[F, 3, H, W]` -> `[F, tokens_per_frame, hidden]`: tower layer -2, then the projector."""
        p = self.projector
        features = self.tower(frames, output_hidden_states=True).hidden_states[self.select_layer]
        x = reference_downsample(features, self.token_order)
        x = F.layer_norm(x, x.shape[-1:], p["layers.1.weight"], p["layers.1.bias"], eps=1e-5)
        x = F.gelu(F.linear(x, p["layers.2.weight"], p["layers.2.bias"]))
        return F.linear(x, p["layers.4.weight"], p["layers.4.bias"])

    def embeddings(self, input_ids, media_index, frames) -> torch.Tensor:
        """`[1, S, hidden]`: token embeddings with media positions replaced by frame tokens."""
        embeds = self.llm.get_input_embeddings()(input_ids).clone()
        media = media_index >= 0
        if media.any():
            embeds[media] = self.frame_tokens(frames).flatten(0, 1)[media_index[media]]
        return embeds[None]

    @torch.no_grad()
    def greedy(self, input_ids, media_index, frames, max_new_tokens: int, eos_id: int) -> list[int]:
        """Greedy decoding with a full forward each step (no cache)."""
        embeds = self.embeddings(input_ids, media_index, frames)
        out = []
        for _ in range(max_new_tokens):
            token = int(self.llm(inputs_embeds=embeds).logits[0, -1].argmax())
            out.append(token)
            if token == eos_id:
                break
            next_embed = self.llm.get_input_embeddings()(torch.tensor([[token]]))
            embeds = torch.cat([embeds, next_embed], dim=1)
        return out


def tokenizer_without_media_tokens(tokenizer_dir: Path, out_dir: Path) -> Path:
    """A copy of a `train_tokenizer` tokenizer without VILA's media tokens (the last ids), like
    a plain Qwen2 tokenizer: a model loaded with it must grow its embeddings."""
    from longvila_mcore.data.tokenizer import MEDIA_TOKENS

    tokenizer = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [
        t for t in tokenizer["added_tokens"] if t["content"] not in MEDIA_TOKENS
    ]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    for file in Path(tokenizer_dir).iterdir():
        if file.name != "tokenizer.json":
            (out_dir / file.name).write_bytes(file.read_bytes())
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out_dir


def cast_vila_checkpoint(root: Path, dtype: torch.dtype) -> Path:
    """Store every tensor of a VILA-layout checkpoint in `dtype` (the releases are bfloat16)."""
    root = Path(root)
    for path in root.glob("*/*.safetensors"):
        save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path, {"format": "pt"})
    for path in (root / "llm" / "config.json", root / "vision_tower" / "config.json"):
        cfg = json.loads(path.read_text())
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        path.write_text(json.dumps(cfg))
    return root


def vila_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a VILA-layout checkpoint as `component/name`, tower names as released
    (with the `vision_model.` prefix that transformers 5 drops when it saves)."""
    tensors = {}
    for path in sorted(Path(root).glob("*/*.safetensors")):
        component = path.parent.name
        for name, tensor in load_file(path).items():
            if component == "vision_tower" and not name.startswith("vision_model."):
                name = f"vision_model.{name}"
            tensors[f"{component}/{name}"] = tensor
    return tensors


def vila_sequence(
    pieces: list[tuple[str, bool]],
    tokenizer,
    media: list[torch.Tensor],
    tokens_per_frame: int,
) -> tuple[list[int], list[int], torch.Tensor]:
    """A sample laid out as VILA's `_embed` lays it out, from hand-written text pieces
    `(text, is_target)`: each media token of the text, in order, becomes every frame of its
    medium (`media[i]`, `[F, 3, H, W]`), each frame its `tokens_per_frame` tokens then "\\n".

    Returns per position the token id (-1 at frame tokens), the frame token it reads (-1 for
    text) and the labels (next token where it is a target, shifted; -100 elsewhere).
    """
    media_ids = set(tokenizer.convert_tokens_to_ids(["<image>", "<vila/video>"]))
    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    ids, reads, targets, frame = [], [], [], 0
    remaining = list(media)
    for text, is_target in pieces:
        for token in tokenizer.encode(text, add_special_tokens=False):
            if token not in media_ids:
                ids.append(token), reads.append(-1), targets.append(is_target)
                continue
            for _ in range(len(remaining.pop(0))):
                ids += [-1] * tokens_per_frame + [newline]
                reads += [frame * tokens_per_frame + t for t in range(tokens_per_frame)] + [-1]
                targets += [False] * (tokens_per_frame + 1)
                frame += 1
    assert not remaining, "fewer media tokens than media"
    labels = [ids[i + 1] if targets[i + 1] else -100 for i in range(len(ids) - 1)] + [-100]
    return ids, reads, torch.tensor(labels)


def vila_logits(reference: HFLongVILA, ids: list[int], reads: list[int], frames: torch.Tensor):
    """`[S, vocab]` logits of the HF assembly on a `vila_sequence` layout."""
    embed = reference.llm.get_input_embeddings()
    frame_tokens = reference.frame_tokens(frames).flatten(0, 1)
    rows = [frame_tokens[r] if r >= 0 else embed(torch.tensor(i)) for i, r in zip(ids, reads)]
    return reference.llm(inputs_embeds=torch.stack(rows)[None]).logits[0]
