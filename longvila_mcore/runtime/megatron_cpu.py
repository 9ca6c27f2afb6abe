"""Let Megatron-Core run on a CPU-only torch build.

Megatron-Core is written for CUDA. On a CPU build, the few places below stop a forward/backward
pass that is otherwise device-agnostic. Each redirection names the Megatron code it fixes;
`tests/test_megatron_cpu.py` checks that these places still look the way we assume for the pinned
release, so an upgrade that moves them fails loudly instead of silently changing behaviour.

Nothing here runs when CUDA is available: on GPU, Megatron-Core is used unmodified.
"""

from __future__ import annotations

import copy
import importlib
import types
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


def _sequence_parallel_torch_norm(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
    """`WrappedTorchNorm` that also serves Megatron's sequence parallelism: the norm itself is
    per token, so it is built from a copy of `config` without the flag, and its parameters are
    marked `sequence_parallel` as TENorm marks its own, so that `finalize_model_grads` sums
    their gradients (each rank's holds only its 1/tp of the tokens) over the tensor-parallel
    ranks."""
    plain = copy.copy(config)
    plain.sequence_parallel = False
    norm = _torch_norm_new(cls, plain, hidden_size, eps, **kwargs)
    for param in norm.parameters():
        param.sequence_parallel = config.sequence_parallel
    return norm


_torch_norm_new = None


def allow_sequence_parallel_torch_norm() -> None:
    """Let Megatron's torch norm take `sequence_parallel` (idempotent; a no-op with CUDA).

    Without Transformer Engine, the layers' norms and the decoder's final norm (`LayerNormImpl`
    of transformer/transformer_block.py) are `WrappedTorchNorm`, which asserts
    `not config.sequence_parallel` (transformer/torch_norm.py:32): a limit of the wrapper, not
    of the torch norms. Its `__new__` is replaced, so every module that imported the class
    (backends.py, transformer_block.py) builds the wrapped norm. Called by
    `runtime.init_model_parallel`, for the same reason as `redirect_cuda_rng_to_cpu`.
    """
    global _torch_norm_new
    if _torch_norm_new is not None or torch.cuda.is_available():
        return
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    _torch_norm_new = WrappedTorchNorm.__new__
    WrappedTorchNorm.__new__ = _sequence_parallel_torch_norm


def gather_optimizer_state_with_gloo(optimizer) -> dict:
    """Metadata for the distributed optimizer's `sharded_state_dict` that gathers its
    `fully_reshardable` state over gloo data-parallel groups (none on GPU).

    Megatron's default gather (`DistributedOptimizer.get_parameter_state_dp_zero` without
    `use_gloo_comm`) moves each shard to CUDA; its memory-efficient variant gathers onto
    data-parallel rank 0 over `data_parallel_group_gloo`, which on a CPU run is the
    data-parallel group itself.
    """
    metadata = {}
    for inner in optimizer.chained_optimizers:
        group = getattr(inner, "data_parallel_group", None)
        if group is not None and torch.distributed.get_backend(group) == "gloo":
            inner.data_parallel_group_gloo = group
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = True
    return metadata


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


# --- the training step: optimizer, gradient clipping, schedules -------------------------------

# Functions of Megatron's training machinery (module, qualified name) that hard-code CUDA as
# string constants, with the constants each holds. `_redirect_training_cuda_literals` swaps them
# for their CPU counterparts in these functions only; tests/test_megatron_cpu.py checks that each
# function still holds exactly these constants.
TRAINING_CUDA_LITERALS = {
    # found_inf / overflow buffer / scale-one tensors made with device='cuda' (473, 481, 485)
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.__init__"): {"cuda"},
    # the FP32 optimizer's `_scale` tensor (907)
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__"): {"cuda"},
    # bf16 without the distributed optimizer: parameters sorted by CUDA tensor type (671, 690)
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"): {
        "torch.cuda.HalfTensor",
        "torch.cuda.BFloat16Tensor",
        "torch.cuda.FloatTensor",
    },
    # the distributed optimizer sorts its shards by CUDA tensor type (361, 420, 582)
    (
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer._build_model_and_main_param_groups",
    ): {"torch.cuda.HalfTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.FloatTensor"},
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"): {
        "torch.cuda.HalfTensor",
        "torch.cuda.BFloat16Tensor",
    },
    # the gradient norm's buffers (90, 103, 115) and, on every clipped step, the assertion that
    # gradients are torch.cuda.FloatTensor plus the scaling's overflow buffer (167, 174)
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"): {"cuda"},
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"): {
        "torch.cuda.FloatTensor",
        "cuda",
    },
    ("megatron.core.optimizer.clip_grads", "count_zeros_fp32"): {"cuda"},
    # the fallback of apex's multi_tensor_l2norm (no apex / TE) returns its result on 'cuda' (1207)
    ("megatron.core.utils", "local_multi_tensor_l2_norm"): {"cuda"},
    # the token counter of every schedule, pp = 1 included (596, 983, 2138)
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining"): {"cuda"},
    (
        "megatron.core.pipeline_parallel.schedules",
        "forward_backward_pipelining_with_interleaving",
    ): {"cuda"},
    (
        "megatron.core.pipeline_parallel.schedules",
        "forward_backward_pipelining_without_interleaving",
    ): {"cuda"},
}


def _cpu_literal(value: object) -> object:
    """The CPU counterpart of a CUDA string constant: the device 'cuda' and the tensor type
    names 'torch.cuda.FloatTensor' etc. (what `Tensor.type()` answers); anything else as is."""
    if value == "cuda":
        return "cpu"
    if isinstance(value, str) and value.startswith("torch.cuda.") and value.endswith("Tensor"):
        return "torch." + value.removeprefix("torch.cuda.")
    if isinstance(value, tuple):  # `x in [a, b]` compiles to a tuple constant
        return tuple(_cpu_literal(v) for v in value)
    if isinstance(value, types.CodeType):  # comprehensions and nested functions
        return _cpu_code(value)
    return value


def _cpu_code(code: types.CodeType) -> types.CodeType:
    return code.replace(co_consts=tuple(_cpu_literal(c) for c in code.co_consts))


def cuda_literals(code: types.CodeType) -> set[str]:
    """The CUDA string constants `_cpu_literal` replaces in `code` (nested code included)."""
    found = set()
    for value in code.co_consts:
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, types.CodeType):
                found |= cuda_literals(v)
            elif isinstance(v, str) and _cpu_literal(v) != v:
                found.add(v)
    return found


def training_function(module: str, qualname: str) -> types.FunctionType:
    """The plain function behind `module.qualname` (a function, method or classmethod)."""
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return getattr(obj, "__func__", obj)


_training_enabled = False


def enable_cpu_training_support() -> None:
    """Install the redirections of the training step (idempotent; a no-op when CUDA is
    available). Separate from `enable_cpu_support` because it imports Megatron's optimizer and
    schedules, which `import longvila_mcore` must not (tools, data workers)."""
    global _training_enabled
    if _training_enabled or torch.cuda.is_available():
        return
    enable_cpu_support()
    _redirect_training_cuda_literals()
    _redirect_cuda_transfers()
    _training_enabled = True


def _redirect_training_cuda_literals() -> None:
    """Megatron's optimizer, gradient clipping and pipeline schedules allocate small tensors
    with `device='cuda'` and check parameter types against 'torch.cuda.*Tensor' names
    (TRAINING_CUDA_LITERALS). In exactly those functions, the constants become their CPU
    counterparts: the function objects stay the same (every module that imported them sees the
    change), and nothing else in torch or Megatron is touched."""
    for (module, qualname), expected in TRAINING_CUDA_LITERALS.items():
        fn = training_function(module, qualname)
        found = cuda_literals(fn.__code__)
        if found != expected:  # a different release: do not guess, fail where it is obvious
            raise RuntimeError(
                f"{module}.{qualname} holds the CUDA constants {sorted(found)}, not "
                f"{sorted(expected)}: megatron-core is not {PINNED_MEGATRON_CORE}; re-check "
                "runtime/megatron_cpu.py"
            )
        fn.__code__ = _cpu_code(fn.__code__)


# Functions that move a tensor to the GPU with `.cuda()`: (module, qualified name).
# `_redirect_cuda_transfers` makes the call `.cpu()` in these functions only (a CPU tensor's
# `.cpu()` is the tensor itself); tests/test_megatron_cpu.py checks that `cuda` is, in each, only
# ever the name of that method.
CUDA_TRANSFERS = (
    # With pp > 1 and tied input / output embeddings, the last stage's copy of the embedding is
    # filled from the first stage's by an all-reduce of `weight.data.cuda()` (language_module.py
    # 244), run while the model is built.
    (
        "megatron.core.models.common.language_module.language_module",
        "LanguageModule.setup_embeddings_and_output_layer",
    ),
)


def _redirect_cuda_transfers() -> None:
    for module, qualname in CUDA_TRANSFERS:
        fn = training_function(module, qualname)
        if fn.__code__.co_names.count("cuda") != 1:
            raise RuntimeError(
                f"{module}.{qualname} does not use the name `cuda` exactly once: megatron-core "
                f"is not {PINNED_MEGATRON_CORE}; re-check runtime/megatron_cpu.py"
            )
        names = tuple("cpu" if n == "cuda" else n for n in fn.__code__.co_names)
        fn.__code__ = fn.__code__.replace(co_names=names)
