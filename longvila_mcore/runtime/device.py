"""Where tensors live: CUDA when available, else the CPU; the matching compute dtype."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def default_device() -> torch.device:
    """This process's device: its local GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU for speed, fp32 on CPU where bf16 matmuls are slow and tests need exactness."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def retain_freed_host_memory() -> bool:
    """Keep freed CPU tensor memory in the process for reuse, as CUDA's caching allocator does
    on GPU. Returns whether the C library took the setting (glibc only).

    glibc returns blocks above its mmap threshold (dynamic, at most 32 MiB) to the kernel when
    they are freed, and trims the top of the heap. A training step frees its activations and
    allocates them again in the next step, so every step then faults all those pages back in,
    zero-filled, 4 KiB at a time: 5-10% of a CPU training step at 8k tokens
    (bench/model_throughput.py). With both thresholds raised the memory is reused; the resident
    size stays at the peak of a step, as it would on a GPU.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): keep the C library's defaults
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # A block over 1 GiB still gets a mapping of its own; the trim limit is mallopt's int maximum.
    return bool(
        libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)
    )


FLASH_ATTN_SUPPORTED = ">=2.7,<2.9"
"""flash-attn releases whose varlen interface `parallel/local_attention.FlashAttnKernel` calls:
2.7 renamed `window_size` to `window_size_left` / `window_size_right` and cut the forward's
return values from 8 to 4; 2.8 kept both. The `gpu` extra of pyproject.toml pins the same range
(tests/test_gpu_image.py)."""


@functools.cache
def check_flash_attn() -> str:
    """The installed flash-attn version; one clear RuntimeError if it is missing or outside
    FLASH_ATTN_SUPPORTED. Called at start-up on GPU (init_distributed) and by attention_backend."""
    from packaging.specifiers import SpecifierSet

    fix = (
        "use the NGC image of the Dockerfile, or install flash-attn "
        f"'{FLASH_ATTN_SUPPORTED}' built for this torch (`pip install 'longvila-mcore[gpu]'`)"
    )
    try:
        version = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"attention on GPU needs flash-attn, which is not installed: {fix}"
        ) from None
    if not SpecifierSet(FLASH_ATTN_SUPPORTED).contains(version, prereleases=True):
        raise RuntimeError(
            f"flash-attn {version} is installed, but the GPU attention calls the varlen "
            f"interface of flash-attn {FLASH_ATTN_SUPPORTED}: {fix}"
        )
    return version


TRANSFORMER_ENGINE_SUPPORTED = ">=2.9,<2.12"
"""Transformer Engine releases Megatron-Core 0.16.1 is tested with (its own `dev` extra); the
`gpu` extra pins the same range."""


def check_gpu_stack() -> dict[str, str]:
    """Versions of torch, Transformer Engine and flash-attn; raises naming the one outside the
    supported ranges. The Dockerfile runs it when it builds the image."""
    from packaging.specifiers import SpecifierSet

    versions = {"torch": torch.__version__, "flash-attn": check_flash_attn()}
    te = importlib.metadata.version("transformer-engine")
    if not SpecifierSet(TRANSFORMER_ENGINE_SUPPORTED).contains(te, prereleases=True):
        raise RuntimeError(
            f"Transformer Engine {te} is installed; Megatron-Core 0.16.1 needs "
            f"{TRANSFORMER_ENGINE_SUPPORTED}: choose an NGC PyTorch image that ships it"
        )
    return versions | {"transformer-engine": te}


def attention_backend(device: torch.device) -> str:
    """Which local attention kernel runs on `device`: "flash_attn" on GPU (after checking the
    installed release), "torch" elsewhere. `parallel/local_attention.py` maps the name to its
    kernel; returning a name keeps runtime/ free of imports from parallel/ (no import cycle)."""
    if device.type != "cuda":
        return "torch"
    check_flash_attn()
    return "flash_attn"


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


class _HostSyncs(TorchDispatchMode):
    """Records the operators that make the host wait for the device, or build a tensor from
    host data, while active (see `count_host_syncs`)."""

    # Always a sync: a value read back, or data-dependent output sizes.
    _ALWAYS = {"_local_scalar_dense", "nonzero", "masked_select", "lift_fresh", "lift_fresh_copy"}
    _ALWAYS |= {"unique_dim", "_unique", "_unique2", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        )
        implicit_size = name == "repeat_interleave" and kwargs.get("output_size") is None
        if (
            name in self._ALWAYS
            or bool_index
            or implicit_size
            and isinstance(args[0], torch.Tensor)
        ):
            self.calls.append(name)
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs() -> Iterator[list[str]]:
    """The names of the host syncs in the block, in order: `.item()` and other scalar reads,
    `.tolist()`, `nonzero`, boolean-mask indexing, `repeat_interleave` without `output_size`,
    tensors built from host data (`torch.tensor`). On CPU nothing waits, so this counts what would
    wait on a GPU; on a GPU, `torch.cuda.set_sync_debug_mode("error")` makes the real syncs raise.
    Tests and benchmarks only: it dispatches every operator through Python."""
    mode = _HostSyncs()
    tolist = torch.Tensor.tolist

    def counted_tolist(self, *args, **kwargs):
        mode.calls.append("tolist")
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counted_tolist
    try:
        with mode:
            yield mode.calls
    finally:
        torch.Tensor.tolist = tolist
