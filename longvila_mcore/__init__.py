"""LongVILA on Megatron-Core: long-context video-language training, conversion and inference."""

from longvila_mcore.runtime.megatron_cpu import enable_cpu_support

# Before any Megatron-Core module is imported or run: on a CPU-only torch this installs the few
# redirections Megatron-Core needs (see runtime/megatron_cpu.py); with CUDA it does nothing.
enable_cpu_support()
