"""Let Megatron-Core run on a CPU-only torch build.

Megatron-Core is written for CUDA. On a CPU build, the few places below stop a forward/backward
pass that is otherwise device-agnostic. Each redirection names the Megatron code it fixes;
`tests/test_megatron_cpu.py` checks that these places still look the way we assume for the pinned
release, so an upgrade that moves them fails loudly instead of silently changing behaviour.

Nothing here runs when CUDA is available: on GPU, Megatron-Core is used unmodified.
"""

from __future__ import annotations

import warnings

import torch

PINNED_MEGATRON_CORE = "0.16.1"

# Import-time notices that only say "Apex / Transformer Engine are not installed, falling back to
# torch": expected on CPU, and shown once per module import otherwise.
_FALLBACK_NOTICES = (
    r"Apex is not installed.*",
    r"Transformer Engine and Apex are not installed.*",
    r".*megatron.core.transformer.custom_layers.transformer_engine.*",
)

_enabled = False


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_op(*args, **kwargs) -> None:
    return None


def enable_cpu_support() -> None:
    """Install the redirections (idempotent). A no-op when CUDA is available."""
    global _enabled
    if _enabled or torch.cuda.is_available():
        return
    for pattern in _FALLBACK_NOTICES:
        warnings.filterwarnings("ignore", message=pattern)

    # 1. `torch.cuda.current_device()` is used as the device of new tensors:
    #    tensor_parallel/mappings.py (_gather_along_last_dim, _gather_along_first_dim and
    #    _reduce_scatter_along_first_dim allocate their output buffers with it),
    #    tensor_parallel/layers.py (LinearWithGradAccumulationAndAsyncCommunication buffers),
    #    models/common/embeddings/rotary_pos_embedding.py (RotaryEmbedding.get_emb moves inv_freq)
    #    and models/gpt/gpt_model.py. On a CPU build it raises "Torch not compiled with CUDA
    #    enabled"; answering the CPU device makes every one of those allocations land on the CPU.
    torch.cuda.current_device = _cpu_current_device

    # 2. `torch.cuda.synchronize()` is called before and after distributed checkpoint I/O
    #    (dist_checkpointing/strategies/filesystem_async.py, torch.py) to order CUDA streams.
    #    There are no streams on a CPU build, so waiting for them is a no-op.
    torch.cuda.synchronize = _no_op

    _enabled = True
