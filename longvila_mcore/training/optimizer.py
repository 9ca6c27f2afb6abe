"""AdamW over Megatron's DDP gradient buffers, with global-norm clipping and sharded state.

Megatron-Core 0.16's own optimizer classes allocate on `device="cuda"` unconditionally, so they
cannot run on CPU. This wrapper keeps their contract on both: gradients come from DDP's
`param.main_grad` (already reduced over data- and sequence-parallel ranks), the norm is taken over
the whole model (tensor- and pipeline-parallel shards counted once), low-precision parameters
are stepped through fp32 master copies, and the state is saved as sharded tensors that mirror the
parameters, so it reshards with them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import param_is_not_shared


def _unstacked(sharded):
    """A layer's own ShardedTensor instead of its slot in the stack of all layers.

    Megatron saves the same tensor of every layer as one stacked tensor (a prepended layer
    axis). When only some layers learn (the tower's unused layers stay frozen), the optimizer
    holds state for part of the stack, which is not a valid sharding; per-layer keys are.
    """
    if not isinstance(sharded, ShardedTensor) or sharded.prepend_axis_num == 0:
        return sharded
    n = sharded.prepend_axis_num
    layer = ".".join(str(i) for i in sharded.global_offset[:n])
    return dataclasses.replace(
        sharded,
        key=f"{sharded.key}.layer{layer}",
        global_shape=sharded.global_shape[n:],
        global_offset=sharded.global_offset[n:],
        axis_fragmentations=sharded.axis_fragmentations[n:],
        prepend_axis_num=0,
    )


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norms and embeddings of position are not decayed (1-D tensors)."""
    return param.ndim < 2 or name.endswith(".bias")


class Optimizer:
    def __init__(
        self,
        model: torch.nn.Module,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        clip_grad: float = 1.0,
    ):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters: check stage.trainable")
        self.params = [p for _, p in named]
        # fp32 master weights for low-precision parameters; fp32 parameters are their own master.
        self.masters = [
            p if p.dtype == torch.float32 else p.detach().float().requires_grad_()
            for p in self.params
        ]
        decay = [
            m for (n, p), m in zip(named, self.masters, strict=True) if not _no_weight_decay(n, p)
        ]
        no_decay = [
            m for (n, p), m in zip(named, self.masters, strict=True) if _no_weight_decay(n, p)
        ]
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        self.inner = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
        # (parameter, master) in the optimizer's own order, which numbers its state entries.
        param_of = {id(m): p for p, m in zip(self.params, self.masters, strict=True)}
        self._ordered = [(param_of[id(m)], m) for g in groups for m in g["params"]]
        self.clip_grad = clip_grad
        # Parameters counted in the norm: each tensor-parallel shard once, shared ones once.
        self._for_norm = [
            param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p)
            for p in self.params
        ]

    def set_lr(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        for m in self.masters:
            m.grad = None

    def grad_norm(self) -> float:
        local = torch.zeros((), dtype=torch.float32)
        for p, counted in zip(self.params, self._for_norm, strict=True):
            if counted:
                local += p.main_grad.float().pow(2).sum().cpu()
        local = local.to(self.params[0].main_grad.device)
        torch.distributed.all_reduce(local, group=parallel_state.get_model_parallel_group())
        return math.sqrt(local.item())

    @torch.no_grad()
    def step(self) -> float:
        """Clip to `clip_grad` by global norm, then step; returns the norm before clipping."""
        norm = self.grad_norm()
        scale = 1.0
        if self.clip_grad and norm > self.clip_grad:
            scale = self.clip_grad / (norm + 1e-6)
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = p.main_grad.float() * scale if scale != 1.0 else p.main_grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters, strict=True):
            if m is not p:
                p.copy_(m)
        return norm

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        """The AdamW state as sharded tensors keyed like the parameters they belong to."""
        if is_loading and not self.inner.state:
            self._init_state()
        state = self.inner.state_dict()
        id_to_sharded = {
            i: _unstacked(sharded)
            for i, sharded in get_param_id_to_sharded_param_map(
                model_sharded_state_dict, (p for p, _ in self._ordered)
            ).items()
        }
        step = next((s["step"] for s in state["state"].values() if "step" in s), None)
        optim_state_to_sharding_state(state, id_to_sharded, exclude_keys=("step",))
        if step is not None:
            state["state"]["common_step"] = step
        masters = {
            i: make_sharded_optimizer_tensor(id_to_sharded[i], m, "optimizer.state.fp32_param")
            for i, (p, m) in enumerate(self._ordered)
            if m is not p
        }
        return {"adamw": state, "fp32_params": masters}

    def load_state_dict(self, state: dict) -> None:
        adamw = state["adamw"]
        step = adamw["state"].pop("common_step", None)
        if step is not None:
            for s in adamw["state"].values():
                s["step"] = step.clone() if torch.is_tensor(step) else step
        self.inner.load_state_dict(adamw)
        with torch.no_grad():
            for i, master in state["fp32_params"].items():
                param, own_master = self._ordered[i]
                own_master.copy_(master)
                param.copy_(master)

    def _init_state(self) -> None:
        """Allocate empty AdamW state so a checkpoint has tensors to load into."""
        for group in self.inner.param_groups:
            for m in group["params"]:
                self.inner.state[m] = {
                    "step": torch.zeros((), dtype=torch.float32),
                    "exp_avg": torch.zeros_like(m),
                    "exp_avg_sq": torch.zeros_like(m),
                }
