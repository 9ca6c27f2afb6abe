"""Where the code runs: device choice, process groups, CPU support for Megatron-Core."""

from longvila_mcore.runtime.device import (
    attention_backend,
    default_device,
    default_dtype,
    spec_backend,
)
from longvila_mcore.runtime.distributed import (
    destroy_model_parallel,
    init_distributed,
    init_model_parallel,
)

__all__ = [
    "attention_backend",
    "default_device",
    "default_dtype",
    "destroy_model_parallel",
    "init_distributed",
    "init_model_parallel",
    "spec_backend",
]
