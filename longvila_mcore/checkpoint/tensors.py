"""Fill a (possibly tensor / pipeline parallel) model from full tensors, one tensor at a time."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from tqdm import tqdm

from longvila_mcore.checkpoint.mapping import Rule, tensor_parallel_slice
from longvila_mcore.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that does not have the layout or contents the model needs."""


_LAYER = re.compile(r"(.*\.layers\.)(\d+)(\..*)")


def global_parameter_names(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters keyed by their name in the unsplit model.

    On a pipeline stage, `decoder.layers.{j}` is the stage's j-th layer; Megatron's
    `layer_number` (1-based, global) gives its index in the whole model.
    """
    numbers = {
        name: module.layer_number - 1
        for name, module in model.named_modules()
        if hasattr(module, "layer_number") and _LAYER.fullmatch(name + ".x")
    }
    params = {}
    for name, param in model.named_parameters():
        m = _LAYER.fullmatch(name)
        if m and f"{m[1]}{m[2]}" in numbers:
            name = f"{m[1]}{numbers[m[1] + m[2]]}{m[3]}"
        params[name] = param
    return params


def fuse(rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    """`rule.fuse`, raising CheckpointError with the tensors' names when their shapes do not fit
    together (e.g. a k_proj of the wrong width cannot be interleaved with its q_proj)."""
    try:
        return rule.fuse(tensors)
    except RuntimeError as err:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(rule.hf, tensors))
        raise CheckpointError(
            f"{rule.component}/ tensors {shapes} do not combine into {rule.mcore}: the checkpoint "
            "and the model config disagree"
        ) from err


@torch.no_grad()
def load_full_tensors(
    model: torch.nn.Module,
    rules: list[Rule],
    read: Callable[[str, str], torch.Tensor],
    tp_rank: int = 0,
    tp_size: int = 1,
    prefix: str = "",
    progress: bool = False,
) -> None:
    """Copy every parameter of `model` from the HF tensors its rule names.

    `read(component, hf_name)` returns one full HF tensor. `prefix` is stripped from the rules'
    Megatron names when `model` is a part of LongVILAModel (e.g. `"llm."` for the decoder alone).
    Raises with the tensor's name on a missing rule or a shape mismatch. `progress` shows a
    progress bar over the parameters.
    """
    params = global_parameter_names(model)
    by_name = {r.mcore.removeprefix(prefix): r for r in rules if r.mcore.startswith(prefix)}
    for name, param in tqdm(params.items(), "tensors", disable=not progress, unit="tensor"):
        rule = by_name.get(name)
        if rule is None:
            raise CheckpointError(f"no checkpoint tensor maps to model parameter {prefix}{name}")
        full = fuse(rule, [read(rule.component, hf) for hf in rule.hf])
        local = tensor_parallel_slice(full, param, tp_rank, tp_size)
        if local.shape != param.shape:
            raise CheckpointError(
                f"{rule.component}/{', '.join(rule.hf)} has shape {tuple(full.shape)}, which does "
                f"not fit {prefix}{name} {tuple(param.shape)} (tp {tp_size}): the checkpoint and "
                "the model config disagree"
            )
        param.copy_(local)
