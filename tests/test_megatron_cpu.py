"""The CPU redirections of runtime/megatron_cpu.py still match the pinned Megatron-Core."""

import ast
import importlib
import inspect
import textwrap
import types

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


# The RNG state calls redirected by `megatron_cpu.redirect_cuda_rng_to_cpu`, and the callers that
# rely on them. Read from the module's source, since the attributes themselves are ours once
# redirected.
RNG_ASSUMPTIONS = [
    ("_get_cuda_rng_state", "torch.cuda.random.get_rng_state(device=device)"),
    ("_set_cuda_rng_state", "_lazy_call(cb)"),
    ("CudaRNGStatesTracker.add", "torch.cuda.get_rng_state()"),
    ("CudaRNGStatesTracker.fork", "_set_cuda_rng_state(self.states_[name]"),
    ("_get_all_rng_states", "_get_cuda_rng_state("),
    ("_set_all_rng_states", "_set_cuda_rng_state("),
    ("CheckpointFunction.backward", "_set_all_rng_states(*ctx.rng_states)"),
]


def _megatron_source(module: str, path: str) -> str:
    """Source of a function or method as the module's file has it (not as redirected)."""
    text = inspect.getsource(importlib.import_module(module))
    node = ast.parse(text)
    for part in path.split("."):
        node = next(
            n
            for n in ast.iter_child_nodes(node)
            if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == part
        )
    return ast.get_source_segment(text, node)


@pytest.mark.parametrize("path,fragment", RNG_ASSUMPTIONS)
def test_rng_call_sites_still_exist(path, fragment):
    assert fragment in _megatron_source("megatron.core.tensor_parallel.random", path)


def test_tower_block_relies_on_the_layer_count_of_checkpointed_forward():
    """models/siglip.TowerBlock sets `num_layers_per_pipeline_rank` to the layers it runs."""
    source = _megatron_source(
        "megatron.core.transformer.transformer_block", "TransformerBlock._checkpointed_forward"
    )
    assert source.count("self.num_layers_per_pipeline_rank") == 2  # uniform and block


@pytest.fixture
def cpu_rng():
    if torch.cuda.is_available():
        pytest.skip("the redirections are inactive with CUDA")
    megatron_cpu.redirect_cuda_rng_to_cpu()
    from megatron.core.tensor_parallel import random

    return random


def test_rng_state_get_and_set_use_the_cpu_generator(cpu_rng):
    queued = len(torch.cuda._queued_calls)
    torch.manual_seed(5)
    state = cpu_rng._get_cuda_rng_state()
    assert torch.equal(state, torch.get_rng_state())
    first = torch.rand(4)
    cpu_rng._set_cuda_rng_state(state)
    assert torch.equal(torch.rand(4), first)  # restored, so drawn again
    assert len(torch.cuda._queued_calls) == queued  # nothing left waiting for a CUDA device


def test_rng_tracker_streams_on_cpu(cpu_rng):
    tracker = cpu_rng.CudaRNGStatesTracker()
    torch.manual_seed(5)
    expected_default = torch.rand(3)
    torch.manual_seed(5)
    tracker.add("stream", 11)  # leaves the default generator alone
    with tracker.fork("stream"):
        inside = torch.rand(3)
    assert torch.equal(inside, torch.rand(3, generator=torch.Generator().manual_seed(11)))
    assert torch.equal(torch.rand(3), expected_default)  # fork restored the default stream
    with tracker.fork("stream"):
        again = torch.rand(3)
    generator = torch.Generator().manual_seed(11)
    torch.rand(3, generator=generator)
    assert torch.equal(again, torch.rand(3, generator=generator))  # the stream continues


def test_checkpoint_redraws_the_same_dropout(cpu_rng):
    """Megatron's CheckpointFunction: the recomputed dropout mask is the forward's, so the
    gradient equals the one without recomputation."""
    from megatron.core import tensor_parallel

    x = torch.randn(64, requires_grad=True)

    def f(t):
        return torch.nn.functional.dropout(t * 3, p=0.5, training=True)

    torch.manual_seed(2)
    f(x).pow(2).sum().backward()
    direct, x.grad = x.grad, None
    torch.manual_seed(2)
    tensor_parallel.checkpoint(f, False, x).pow(2).sum().backward()
    assert torch.equal(x.grad, direct)


# --- the training step's redirections (optimizer, gradient clipping, schedules) ----------------


def _released_code(module: str, qualname: str):
    """The code object of `module.qualname` compiled afresh from the installed source, so the
    check sees Megatron's file whether or not the redirection already ran in this process."""
    fn = megatron_cpu.training_function(module, qualname)
    source = textwrap.dedent(inspect.getsource(fn))
    compiled = compile(source, inspect.getsourcefile(fn), "exec")
    return next(c for c in compiled.co_consts if isinstance(c, types.CodeType))


@pytest.mark.parametrize("site", sorted(megatron_cpu.TRAINING_CUDA_LITERALS))
def test_training_cuda_literals_are_where_we_redirect_them(site):
    """Each redirected function holds exactly the CUDA constants listed: an upgrade that adds,
    moves or removes one fails here instead of crashing or silently running elsewhere."""
    expected = megatron_cpu.TRAINING_CUDA_LITERALS[site]
    assert megatron_cpu.cuda_literals(_released_code(*site)) == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inactive with CUDA")
def test_training_redirections_run_on_cpu_and_stay_narrow():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
    from megatron.core.utils import local_multi_tensor_l2_norm

    megatron_cpu.enable_cpu_training_support()
    for site in megatron_cpu.TRAINING_CUDA_LITERALS:
        assert megatron_cpu.cuda_literals(megatron_cpu.training_function(*site).__code__) == set()

    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    norm, _ = local_multi_tensor_l2_norm(2048, None, [grads], False)  # returned on 'cuda' before
    assert norm.device.type == "cpu" and norm.item() == pytest.approx(5.0)

    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])  # asserted to be a 'torch.cuda.FloatTensor' before
    clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=5.0)
    assert torch.allclose(param.grad, torch.tensor([0.6, 0.8]), rtol=1e-5)

    # Only those functions changed: torch itself still names and places tensors as usual.
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")


@pytest.mark.parametrize("site", megatron_cpu.CUDA_TRANSFERS)
def test_cuda_transfers_are_where_we_redirect_them(site):
    """`cuda` is, in each redirected function, only the `.cuda()` of one tensor."""
    released = _released_code(*site)
    assert released.co_names.count("cuda") == 1
    assert ".data.cuda()" in inspect.getsource(megatron_cpu.training_function(*site))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inactive with CUDA")
@pytest.mark.parametrize("site", megatron_cpu.CUDA_TRANSFERS)
def test_cuda_transfers_run_on_cpu(site):
    megatron_cpu.enable_cpu_training_support()
    code = megatron_cpu.training_function(*site).__code__
    assert "cuda" not in code.co_names and "cpu" in code.co_names


# --- Megatron's sequence parallelism with the torch norm ---------------------------------------


def test_torch_norm_still_refuses_sequence_parallel_and_serves_every_norm():
    """The assertion `allow_sequence_parallel_torch_norm` lifts is still in the released
    `WrappedTorchNorm`, and without TE / apex the block's final norm is that class too."""
    from megatron.core.transformer import transformer_block

    source = _megatron_source("megatron.core.transformer.torch_norm", "WrappedTorchNorm.__new__")
    assert "assert not config.sequence_parallel" in source
    assert transformer_block.LayerNormImpl.__name__ == "WrappedTorchNorm"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is inactive with CUDA")
def test_sequence_parallel_torch_norm_marks_its_parameters():
    """The norm built under sequence parallelism is the plain torch norm, its parameters marked
    for `finalize_model_grads` to sum over tensor-parallel ranks; without the flag unmarked."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    megatron_cpu.allow_sequence_parallel_torch_norm()
    fields = dict(num_layers=1, hidden_size=8, num_attention_heads=2)
    config = TransformerConfig(
        **fields, normalization="RMSNorm", tensor_model_parallel_size=2, sequence_parallel=True
    )
    norm = WrappedTorchNorm(config, 8, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.eps == 1e-6
    assert norm.weight.sequence_parallel is True
    assert config.sequence_parallel  # the caller's config is left as it was
    plain = WrappedTorchNorm(TransformerConfig(**fields, normalization="LayerNorm"), 8)
    assert isinstance(plain, torch.nn.LayerNorm)
    assert not any(getattr(p, "sequence_parallel", False) for p in plain.parameters())


# --- the distributed optimizer's reshardable checkpoint state ------------------------------------


def test_optimizer_state_gather_needs_gloo_on_cpu(single_rank):
    """Megatron still moves each shard to CUDA to gather it unless told to use gloo, and the
    gloo path reads `data_parallel_group_gloo`, which the redirection points at a gloo
    data-parallel group (and leaves alone for any other backend)."""
    import torch.distributed as dist

    source = _megatron_source(
        "megatron.core.optimizer.distrib_optimizer",
        "DistributedOptimizer.get_parameter_state_dp_zero",
    )
    assert ".cuda()" in source and "data_parallel_group_gloo" in source

    class Inner:
        def __init__(self, group):
            self.data_parallel_group = group

    class Chained:
        def __init__(self, *inners):
            self.chained_optimizers = inners

    group = dist.new_group([0], backend="gloo")
    gloo, none = Inner(group), Inner(None)
    metadata = megatron_cpu.gather_optimizer_state_with_gloo(Chained(gloo, none))
    assert metadata == {"distrib_optim_fully_reshardable_mem_efficient": True}
    assert gloo.data_parallel_group_gloo is group and not hasattr(none, "data_parallel_group_gloo")
    assert megatron_cpu.gather_optimizer_state_with_gloo(Chained(none)) == {}
