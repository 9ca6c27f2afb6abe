"""The CPU redirections of runtime/megatron_cpu.py still match the pinned Megatron-Core."""

import importlib
import inspect

import megatron.core
import pytest
import torch

from longvila_mcore.runtime import megatron_cpu

# (module, attribute path, source fragment we redirect): if an upgrade moves these, revisit the
# shim rather than trusting it.
ASSUMPTIONS = [
    (
        "megatron.core.tensor_parallel.mappings",
        "_gather_along_last_dim",
        "torch.cuda.current_device()",
    ),
    (
        "megatron.core.tensor_parallel.mappings",
        "_gather_along_first_dim",
        "torch.cuda.current_device()",
    ),
    (
        "megatron.core.tensor_parallel.mappings",
        "_reduce_scatter_along_first_dim",
        "torch.cuda.current_device()",
    ),
    (
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "RotaryEmbedding.get_emb",
        "torch.cuda.current_device()",
    ),
    (
        "megatron.core.distributed.param_and_grad_buffer",
        "_ParamAndGradBuffer.__init__",
        "torch.cuda.current_device()",
    ),
    (
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "FileSystemWriterAsync.preload_tensors",
        "torch.cuda.synchronize()",
    ),
]


def test_pinned_version():
    assert megatron.core.__version__ == megatron_cpu.PINNED_MEGATRON_CORE, (
        "megatron-core changed: re-check runtime/megatron_cpu.py and update the pin"
    )


@pytest.mark.parametrize("module,path,fragment", ASSUMPTIONS)
def test_redirected_call_sites_still_exist(module, path, fragment):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    assert fragment in inspect.getsource(obj)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inactive with CUDA")
def test_megatron_cuda_call_sites_run_on_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    assert rope.get_emb(4).device.type == "cpu"  # calls torch.cuda.current_device()
    torch.cuda.synchronize()  # called around checkpoint I/O; a no-op here
