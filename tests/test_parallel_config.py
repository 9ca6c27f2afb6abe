"""`ParallelConfig.check_model`: the layouts a model can take, one clear error for the others."""

import pytest

from longvila_mcore.config import ParallelConfig, model_preset


@pytest.mark.parametrize("pp", [1, 2, 4, 7, 14, 28])
def test_pipeline_stages_that_divide_the_layers_are_accepted(pp):
    ParallelConfig(pp=pp).check_model(model_preset("longvila_7b"))  # 28 decoder layers


@pytest.mark.parametrize("name,pp", [("longvila_7b", 3), ("longvila_7b", 56), ("longvila_tiny", 3)])
def test_pipeline_stages_that_do_not_divide_the_layers_name_the_choices(name, pp):
    model = model_preset(name)
    layers = model.llm.num_layers
    choices = [d for d in range(1, layers + 1) if layers % d == 0]
    with pytest.raises(
        ValueError, match=rf"parallel.pp={pp} must divide the LLM's {layers} "
    ) as err:
        ParallelConfig(pp=pp).check_model(model)
    assert f"use one of {choices}" in str(err.value)
