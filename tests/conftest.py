import pytest
import torch

import longvila_mcore  # noqa: F401  (installs Megatron-Core's CPU support first)


@pytest.fixture(scope="session")
def single_rank():
    """A one-process gloo group with Megatron's model-parallel state (all sizes 1)."""
    from longvila_mcore.config import ParallelConfig
    from longvila_mcore.runtime import init_distributed, init_model_parallel

    init_distributed(torch.device("cpu"))
    init_model_parallel(ParallelConfig())
    yield


@pytest.fixture(scope="session")
def transformers4():
    """The python of a side environment with transformers 4.46 (NVlabs/VILA's), built once."""
    from tests.transformers4 import transformers4_python

    return transformers4_python()
