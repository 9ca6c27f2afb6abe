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


def _cpu_get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()  # a copy already, whatever `clone` asks


def _cpu_set_rng_state(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name: str, seed: int) -> None:
    """`CudaRNGStatesTracker.add` with the new state drawn from a CPU generator of its own,
    leaving the default generator untouched (as the original leaves the CUDA one)."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    self.states_[name] = torch.Generator().manual_seed(seed).get_state()


def redirect_cuda_rng_to_cpu() -> None:
    """Point Megatron's CUDA RNG state calls at the CPU generator (idempotent; a no-op with CUDA).

    Megatron's activation recomputation (tensor_parallel/random.py `CheckpointFunction`) saves
    the RNG states before a recomputed piece and restores them before recomputing it, so dropout
    draws the same masks twice; its RNG tracker (`fork`) swaps in the model-parallel stream. Both
    read and write the CUDA generator; on CPU dropout draws from the CPU one. Called by
    `runtime.init_model_parallel` (every Megatron model needs it) rather than at import, so that
    `import longvila_mcore` does not load Megatron.
    """
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random

    # 3. `_get_cuda_rng_state` (CheckpointFunction via `_get_all_rng_states`, tracker `fork`)
    #    calls `torch.cuda.random.get_rng_state`, which raises on a CPU build.
    random._get_cuda_rng_state = _cpu_get_rng_state
    # 4. `_set_cuda_rng_state` (restore before a recomputation, tracker `fork`) does not raise on
    #    a CPU build: it queues a lazy CUDA call that never runs, so nothing is restored and every
    #    call leaks its state tensor in `torch.cuda._queued_calls`.
    random._set_cuda_rng_state = _cpu_set_rng_state
    # 5. `CudaRNGStatesTracker.add` (model_parallel_cuda_manual_seed) reads the CUDA generator's
    #    state directly through `torch.cuda.get_rng_state`, which raises on a CPU build.
    random.CudaRNGStatesTracker.add = _cpu_tracker_add


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
