"""Where tensors live: CUDA when available, else the CPU; the matching compute dtype."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """This process's device: its local GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU for speed, fp32 on CPU where bf16 matmuls are slow and tests need exactness."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def attention_kernel(device: torch.device) -> type:
    """The local attention kernel for `device` (see parallel/local_attention.py)."""
    from longvila_mcore.parallel import local_attention

    if device.type != "cuda":
        return local_attention.TorchKernel
    try:
        import flash_attn  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "attention on GPU needs flash-attn >= 2.7: use the NGC image (Dockerfile) or "
            "`pip install 'longvila-mcore[gpu]'`"
        ) from e
    return local_attention.FlashAttnKernel


def spec_backend(device: torch.device):
    """Which Megatron modules fill the layer specs: Transformer Engine on GPU when installed,
    Megatron's local (pure torch) modules otherwise. Our own core attention is used with both."""
    if device.type == "cuda":
        try:
            import transformer_engine  # noqa: F401
            from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

            return TESpecProvider()
        except ImportError:
            pass
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider()
