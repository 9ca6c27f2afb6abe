"""Attention on this rank's tensors, returning the log-sum-exp that ring attention merges with.

Layout is "thd": q `[tq, hq, d]`, k/v `[tk, hkv, d]` holding packed samples back to back, with
`cu_q` / `cu_k` the sample boundaries (lists of ints, n + 1 entries each; sample i of q attends only
to sample i of k). `hq` must be a multiple of `hkv` (grouped-query attention). `causal` requires
equal q and k lengths per sample (the mask is the usual lower triangle).

`out` has q's dtype; `lse` is `[hq, tq]` in float32 (float64 for float64 inputs). The backward takes the *final* `out` and `lse`
(after any ring merging), which is what makes per-block gradients add up to the exact gradient.

Two kernels with one interface; `runtime.attention_kernel` picks one per device. CPU: torch's fused
flash-attention for CPU (`_scaled_dot_product_flash_attention_for_cpu`, which returns the log-sum-exp
and has a matching backward). GPU: flash-attn's varlen kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from longvila_mcore.runtime.device import attention_kernel

Boundaries = Sequence[int]


def _check(q: torch.Tensor, k: torch.Tensor, cu_q: Boundaries, cu_k: Boundaries, causal: bool):
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if len(cu_q) != len(cu_k) or cu_q[-1] != q.shape[0] or cu_k[-1] != k.shape[0]:
        raise ValueError(
            f"sample boundaries {list(cu_q)} / {list(cu_k)} do not match q / k lengths "
            f"{q.shape[0]} / {k.shape[0]}"
        )
    if causal and any(
        (cu_q[i + 1] - cu_q[i]) != (cu_k[i + 1] - cu_k[i]) for i in range(len(cu_q) - 1)
    ):
        raise ValueError("causal attention needs equal query and key lengths in every sample")


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[t, hkv, d] -> [t, hkv * groups, d], each KV head repeated for its query heads."""
    if groups == 1:
        return x
    t, h, d = x.shape
    return x.unsqueeze(2).expand(t, h, groups, d).reshape(t, h * groups, d)


def _bhsd(x: torch.Tensor) -> torch.Tensor:
    """[s, h, d] -> [1, h, s, d] as a view."""
    return x.transpose(0, 1).unsqueeze(0)


class TorchKernel:
    """torch's fused flash-attention for CPU; packed samples run one after another."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, causal, scale):
        groups = q.shape[1] // k.shape[1]
        k, v = _expand_kv(k, groups), _expand_kv(v, groups)
        out = q.new_zeros(q.shape)
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=lse_dtype)
        for i in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            if qs.start == qs.stop or ks.start == ks.stop:
                continue
            o, block_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _bhsd(q[qs]), _bhsd(k[ks]), _bhsd(v[ks]), 0.0, causal, scale=scale
            )
            out[qs] = o[0].transpose(0, 1)
            lse[:, qs] = block_lse[0]
        return out, lse

    @staticmethod
    def backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        hkv = k.shape[1]
        groups = q.shape[1] // hkv
        ke, ve = _expand_kv(k, groups), _expand_kv(v, groups)
        dq = torch.zeros_like(q)
        dke = torch.zeros_like(ke)
        dve = torch.zeros_like(ve)
        for i in range(len(cu_q) - 1):
            qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            if qs.start == qs.stop or ks.start == ks.stop:
                continue
            g_q, g_k, g_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _bhsd(dout[qs]),
                _bhsd(q[qs]),
                _bhsd(ke[ks]),
                _bhsd(ve[ks]),
                _bhsd(out[qs]),
                lse[:, qs].unsqueeze(0),
                0.0,
                causal,
                scale=scale,
            )
            dq[qs] = g_q[0].transpose(0, 1)
            dke[ks] = g_k[0].transpose(0, 1)
            dve[ks] = g_v[0].transpose(0, 1)
        if groups > 1:
            t, _, d = k.shape
            dke = dke.view(t, hkv, groups, d).sum(2)
            dve = dve.view(t, hkv, groups, d).sum(2)
        return dq, dke, dve


class FlashAttnKernel:
    """flash-attn >= 2.7 varlen kernels (GPU, fp16/bf16); GQA is native, no K/V expansion."""

    @staticmethod
    def _args(q, k, cu_q, cu_k):
        def cu(b):
            return torch.tensor(b, dtype=torch.int32, device=q.device)

        def longest(b):
            return max(b[i + 1] - b[i] for i in range(len(b) - 1))

        return cu(cu_q), cu(cu_k), longest(cu_q), longest(cu_k)

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

        cq, ck, mq, mk = FlashAttnKernel._args(q, k, cu_q, cu_k)
        out, lse, _, _ = _flash_attn_varlen_forward(
            q, k, v, cq, ck, mq, mk, dropout_p=0.0, softmax_scale=scale, causal=causal
        )
        return out, lse

    @staticmethod
    def backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        cq, ck, mq, mk = FlashAttnKernel._args(q, k, cu_q, cu_k)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_attn_varlen_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            dq,
            dk,
            dv,
            cq,
            ck,
            mq,
            mk,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
            window_size_left=-1,
            window_size_right=-1,
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
        )
        return dq, dk, dv


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: Boundaries,
    cu_k: Boundaries,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each q sample over its k/v sample: `(out [tq, hq, d], lse [hq, tq])`."""
    _check(q, k, cu_q, cu_k, causal)
    return attention_kernel(q.device).forward(q, k, v, cu_q, cu_k, causal, scale)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_q: Boundaries,
    cu_k: Boundaries,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `attention_forward` given the final `out` / `lse` of each query row."""
    _check(q, k, cu_q, cu_k, causal)
    kernel = attention_kernel(q.device)
    return kernel.backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, causal, scale):
        out, lse = attention_forward(q, k, v, cu_q, cu_k, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cu_q, cu_k, causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: Boundaries | None = None,
    cu_k: Boundaries | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Autograd-aware attention over packed samples in thd layout; returns `[tq, hq, d]`."""
    cu_q = [0, q.shape[0]] if cu_q is None else list(cu_q)
    cu_k = cu_q if cu_k is None else list(cu_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _LocalAttention.apply(q, k, v, cu_q, cu_k, causal, scale)
