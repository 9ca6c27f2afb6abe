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


def _runs(cu_q: Boundaries, cu_k: Boundaries):
    """Runs of consecutive non-empty samples with equal q and k lengths, as
    (q start, k start, samples, q length, k length): each run is one batched kernel call."""
    i, n = 0, len(cu_q) - 1
    while i < n:
        lq, lk = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        j = i + 1
        while j < n and cu_q[j + 1] - cu_q[j] == lq and cu_k[j + 1] - cu_k[j] == lk:
            j += 1
        if lq and lk:
            yield cu_q[i], cu_k[i], j - i, lq, lk
        i = j


def _one_run(runs: list[tuple[int, int, int, int, int]], tq: int, tk: int) -> bool:
    """Whether a single run covers every query and key row."""
    return len(runs) == 1 and runs[0][2] * runs[0][3] == tq and runs[0][2] * runs[0][4] == tk


def _bhsd(x: torch.Tensor, samples: int) -> torch.Tensor:
    """[samples * s, h, d] -> [samples, h, s, d] as a view."""
    t, h, d = x.shape
    return x.view(samples, t // samples, h, d).transpose(1, 2)


def _thd(x: torch.Tensor) -> torch.Tensor:
    """[samples, h, s, d] -> [samples * s, h, d]."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


class TorchKernel:
    """torch's fused flash-attention for CPU, one call per run of equal-length samples (all
    frames of the tower, or the rows of an unpacked batch, go in one call). The kernel handles
    grouped-query attention itself, so K/V are never expanded to the query heads. A run that
    covers the whole input (the common case) is returned as is, without a gather buffer."""

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, causal, scale):
        h = q.shape[1]
        runs = list(_runs(cu_q, cu_k))
        whole = _one_run(runs, q.shape[0], k.shape[0])
        if not whole:
            out = q.new_zeros(q.shape)
            lse_dtype = torch.promote_types(q.dtype, torch.float32)
            lse = q.new_full((h, q.shape[0]), float("-inf"), dtype=lse_dtype)
        for q0, k0, n, lq, lk in runs:
            qs, ks = slice(q0, q0 + n * lq), slice(k0, k0 + n * lk)
            o, block_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _bhsd(q[qs], n), _bhsd(k[ks], n), _bhsd(v[ks], n), 0.0, causal, scale=scale
            )
            block_lse = block_lse.transpose(0, 1).reshape(h, n * lq)
            if whole:
                return _thd(o), block_lse
            out[qs] = _thd(o)
            lse[:, qs] = block_lse
        return out, lse

    @staticmethod
    def backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        h = q.shape[1]
        runs = list(_runs(cu_q, cu_k))
        whole = _one_run(runs, q.shape[0], k.shape[0])
        if not whole:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for q0, k0, n, lq, lk in runs:
            qs, ks = slice(q0, q0 + n * lq), slice(k0, k0 + n * lk)
            grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                _bhsd(dout[qs], n),
                _bhsd(q[qs], n),
                _bhsd(k[ks], n),
                _bhsd(v[ks], n),
                _bhsd(out[qs], n),
                lse[:, qs].view(h, n, lq).transpose(0, 1),
                0.0,
                causal,
                scale=scale,
            )
            if whole:
                return tuple(_thd(g) for g in grads)
            dq[qs], dk[ks], dv[ks] = (_thd(g) for g in grads)
        return dq, dk, dv


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
