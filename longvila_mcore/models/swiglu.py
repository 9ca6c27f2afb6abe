"""SwiGLU, `silu(gate) * up` over the two halves of the fused fc1 output, as one autograd function.

Megatron's unfused path (`glu` in `MLP.forward`) keeps `silu(gate)`, `gate` and `up` for the
backward and builds the gradient of the fc1 output by concatenating the two halves' gradients: a
copy of the layer's largest activation. Here the backward keeps only the fc1 output (recomputing
`silu(gate)`, as Megatron's fused GPU kernel does) and writes both halves' gradients straight into
one buffer. It fills the `activation_func` slot of Megatron's `MLPSubmodules`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_x


class SwiGLU(MegatronModule):
    """`[..., 2f]` -> `[..., f]`: the first half gates the second (Qwen2's gate / up order).
    A MegatronModule (with no parameters) because the MLP asks each child for its sharded state."""

    def __init__(self, config: TransformerConfig):
        super().__init__(config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(x)
