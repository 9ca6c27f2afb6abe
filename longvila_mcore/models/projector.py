"""The `mlp_downsample` projector: SigLIP features of a frame -> LLM token embeddings.

DownSample (2x2 patches -> 1 token) -> LayerNorm(4C) -> Linear(4C -> H) -> GELU (exact erf) ->
Linear(H -> H), REFERENCE 1. The indices of `layers` are the checkpoint's tensor names
(`layers.1`, `layers.2`, `layers.4`). It is small next to the tower and the decoder (4C x H + H x H
weights), so it is replicated on every tensor-parallel rank instead of split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from longvila_mcore.config import ModelConfig, VisionConfig

SUPPORTED_PROJECTORS = ("mlp_downsample",)


def check_projector_type(model: ModelConfig) -> None:
    if model.projector_type not in SUPPORTED_PROJECTORS:
        raise ValueError(
            f"model.projector_type={model.projector_type!r} is not supported; set it to "
            f"{' or '.join(map(repr, SUPPORTED_PROJECTORS))} (the projector of the LongVILA releases)"
        )


class DownSample2x2(nn.Module):
    """`[f, P, C]` -> `[f, ceil(a / 2) ** 2, 4C]`: each 2x2 block of an a x a patch grid -> 1 token.

    Patches are a row-major raster (P = a * a). An odd grid gets one zero row at the bottom and
    one zero column at the right. Tokens are column-pair-major: with h = ceil(a / 2), token
    `j * h + k` is the block of column pair j and row pair k, its four patches (row, column) in
    the order (2k, 2j), (2k, 2j + 1), (2k + 1, 2j), (2k + 1, 2j + 1). That is the order VILA's
    view/permute sequence produces (REFERENCE 1), the one the released projectors were trained on.
    """

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f, p, c = features.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ValueError(
                f"{p} patches per frame do not form a square grid; the projector needs square "
                "frames (vision.image_size a multiple of vision.patch_size)"
            )
        grid = features.reshape(f, side, side, c)
        if side % 2:
            grid = F.pad(grid, (0, 0, 0, 1, 0, 1))
        half = (side + 1) // 2
        # [f, row pair k, row in pair, column pair j, column in pair, C] -> [f, j, k, row, col, C]
        blocks = grid.reshape(f, half, 2, half, 2, c).permute(0, 3, 1, 2, 4, 5)
        return blocks.reshape(f, half * half, 4 * c)


class MlpDownsampleProjector(nn.Module):
    """Tower features `[f, P, C]` -> `[f, tokens_per_frame, llm_hidden]` (see ModelConfig)."""

    def __init__(self, vision: VisionConfig, llm_hidden: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        wide = 4 * vision.hidden_size
        self.layers = nn.Sequential(
            DownSample2x2(),
            nn.LayerNorm(wide, dtype=dtype),  # torch's default eps (1e-5), as VILA built it
            nn.Linear(wide, llm_hidden, dtype=dtype),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden, dtype=dtype),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def build_projector(model: ModelConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The projector `model.projector_type` names; raises ValueError for an unsupported one."""
    check_projector_type(model)
    return MlpDownsampleProjector(model.vision, model.llm.hidden_size, dtype)
