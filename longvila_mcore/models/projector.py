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

from longvila_mcore.config import ModelConfig, VisionConfig, check_token_order
from longvila_mcore.errors import ConfigError

SUPPORTED_PROJECTORS = ("mlp_downsample",)


def check_projector_type(model: ModelConfig) -> None:
    if model.projector_type not in SUPPORTED_PROJECTORS:
        raise ConfigError(
            f"model.projector_type={model.projector_type!r} is not supported; set it to "
            f"{' or '.join(map(repr, SUPPORTED_PROJECTORS))} (the projector of the LongVILA releases)"
        )


class DownSample2x2(nn.Module):
    """`[f, P, C]` -> `[f, ceil(a / 2) ** 2, 4C]`: each 2x2 block of an a x a patch grid -> 1 token.

    Patches are a row-major raster (P = a * a). An odd grid gets one zero row at the bottom and
    one zero column at the right. With h = ceil(a / 2), the block of row pair r and column pair s
    concatenates patches (row, column) (2r, 2s), (2r, 2s + 1), (2r + 1, 2s), (2r + 1, 2s + 1); it
    is token `r * h + s` in the `raster` order and token `s * h + r` in the `legacy` (transposed)
    one (REFERENCE 1, `ModelConfig.token_order`).
    """

    def __init__(self, token_order: str = "raster"):
        super().__init__()
        check_token_order(token_order, "token_order")
        self.token_order = token_order

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f, p, c = features.shape
        side = math.isqrt(p)
        if side * side != p:
            raise ConfigError(
                f"{p} patches per frame do not form a square grid; the projector needs square "
                "frames (vision.image_size a multiple of vision.patch_size)"
            )
        grid = features.reshape(f, side, side, c)
        if side % 2:
            grid = F.pad(grid, (0, 0, 0, 1, 0, 1))
        half = (side + 1) // 2
        # [f, row pair r, row in pair, column pair s, column in pair, C]
        blocks = grid.reshape(f, half, 2, half, 2, c)
        if self.token_order == "raster":
            blocks = blocks.permute(0, 1, 3, 2, 4, 5)  # [f, r, s, row, column, C]
        else:
            blocks = blocks.permute(0, 3, 1, 2, 4, 5)  # [f, s, r, row, column, C]
        return blocks.reshape(f, half * half, 4 * c)

    def extra_repr(self) -> str:
        return f"token_order={self.token_order}"


class MlpDownsampleProjector(nn.Module):
    """Tower features `[f, P, C]` -> `[f, tokens_per_frame, llm_hidden]` (see ModelConfig)."""

    def __init__(
        self,
        vision: VisionConfig,
        llm_hidden: int,
        token_order: str = "raster",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        wide = 4 * vision.hidden_size
        self.layers = nn.Sequential(
            DownSample2x2(token_order),
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
    return MlpDownsampleProjector(model.vision, model.llm.hidden_size, model.token_order, dtype)
