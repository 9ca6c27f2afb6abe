"""Attention on this rank's tensors, returning the log-sum-exp that ring attention merges with.

Layout is "thd": q `[tq, hq, d]`, k/v `[tk, hkv, d]` holding packed samples back to back, with
`cu_q` / `cu_k` the sample boundaries (n + 1 entries each; sample i of q attends only to sample i
of k), as `Segments` or as a sequence of ints. `hq` must be a multiple of `hkv` (grouped-query attention). `causal` requires
equal q and k lengths per sample (the mask is the usual lower triangle).

`out` has q's dtype; `lse` is `[hq, tq]` in float32 (float64 for float64 inputs). The backward takes the *final* `out` and `lse`
(after any ring merging), which is what makes per-block gradients add up to the exact gradient.

Two kernels with one interface; `runtime.attention_backend` names the one for a device. CPU: torch's fused
flash-attention for CPU (`_scaled_dot_product_flash_attention_for_cpu`, which returns the log-sum-exp
and has a matching backward). GPU: flash-attn's varlen kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from longvila_mcore.runtime.device import attention_backend


@dataclass(frozen=True, eq=False)
class Segments:
    """Sample boundaries in the two forms the kernels read: host ints (the CPU kernel slices with
    them) and an int32 tensor on the device with the longest sample (flash-attn's varlen
    arguments). `segments` builds one per set of boundaries and device and caches it, so every
    layer and ring step reuses it: no kernel call builds a tensor from host data."""

    bounds: tuple[int, ...]
    on_device: torch.Tensor
    longest: int


@functools.lru_cache(maxsize=256)
def segments(bounds: tuple[int, ...], device: torch.device) -> Segments:
    """The cached `Segments` of `bounds` (a tuple of ints, n + 1 entries) on `device`."""
    longest = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    on_device = torch.tensor(bounds, dtype=torch.int32, device=device)
    return Segments(bounds, on_device, longest)


Boundaries = Segments | Sequence[int]


def _segments(cu: Boundaries, device: torch.device) -> Segments:
    return cu if isinstance(cu, Segments) else segments(tuple(int(b) for b in cu), device)


@functools.lru_cache(maxsize=256)
def _plan(cu_q: tuple[int, ...], cu_k: tuple[int, ...], causal: bool):
    """Validated runs of consecutive non-empty samples with equal q and k lengths, as
    (q start, k start, samples, q length, k length): each run is one batched kernel call."""
    if len(cu_q) != len(cu_k):
        raise ValueError(f"sample boundaries {list(cu_q)} / {list(cu_k)} differ in length")
    lengths = [(cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]) for i in range(len(cu_q) - 1)]
    if causal and any(lq != lk for lq, lk in lengths):
        raise ValueError("causal attention needs equal query and key lengths in every sample")
    runs, i = [], 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        lq, lk = lengths[i]
        if lq and lk:
            runs.append((cu_q[i], cu_k[i], j - i, lq, lk))
        i = j
    return tuple(runs)


def _check(q: torch.Tensor, k: torch.Tensor, cu_q: Segments, cu_k: Segments, causal: bool):
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if cu_q.bounds[-1] != q.shape[0] or cu_k.bounds[-1] != k.shape[0]:
        raise ValueError(
            f"sample boundaries {list(cu_q.bounds)} / {list(cu_k.bounds)} do not match q / k "
            f"lengths {q.shape[0]} / {k.shape[0]}"
        )
    _plan(cu_q.bounds, cu_k.bounds, causal)


def _one_run(runs: tuple[tuple[int, int, int, int, int], ...], tq: int, tk: int) -> bool:
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
        runs = _plan(cu_q.bounds, cu_k.bounds, causal)
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
        runs = _plan(cu_q.bounds, cu_k.bounds, causal)
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
    def _args(cu_q: Segments, cu_k: Segments):
        return cu_q.on_device, cu_k.on_device, cu_q.longest, cu_k.longest

    @staticmethod
    def forward(q, k, v, cu_q, cu_k, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

        cq, ck, mq, mk = FlashAttnKernel._args(cu_q, cu_k)
        out, lse, _, _ = _flash_attn_varlen_forward(
            q, k, v, cq, ck, mq, mk, dropout_p=0.0, softmax_scale=scale, causal=causal
        )
        return out, lse

    @staticmethod
    def backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

        cq, ck, mq, mk = FlashAttnKernel._args(cu_q, cu_k)
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


_KERNELS = {"torch": TorchKernel, "flash_attn": FlashAttnKernel}


def _kernel(device: torch.device) -> type:
    return _KERNELS[attention_backend(device)]


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
    cu_q, cu_k = _segments(cu_q, q.device), _segments(cu_k, q.device)
    _check(q, k, cu_q, cu_k, causal)
    return _kernel(q.device).forward(q, k, v, cu_q, cu_k, causal, scale)


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
    cu_q, cu_k = _segments(cu_q, q.device), _segments(cu_k, q.device)
    _check(q, k, cu_q, cu_k, causal)
    kernel = _kernel(q.device)
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
    cu_q = _segments((0, q.shape[0]) if cu_q is None else cu_q, q.device)
    cu_k = cu_q if cu_k is None else _segments(cu_k, q.device)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _LocalAttention.apply(q, k, v, cu_q, cu_k, causal, scale)
