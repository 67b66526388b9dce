"""Processes under torchrun: joining the group, wrapping the model for DDP or FSDP, and whole-model state.

DDP keeps a full copy of the model per process and all-reduces gradients. FSDP (PyTorch's `fully_shard`) shards
every transformer block and each tower's remaining parameters across processes, gathering a block's weights
only while it runs, so parameters, gradients and optimiser state take 1/world of the memory. The temperature
and bias are scalars, which `fully_shard` cannot shard: they stay replicated and their gradients are averaged
here. Checkpoints always hold whole (unsharded) state keyed by parameter name, so a run saved under one
layout resumes under another.

Several machines (`torchrun --nnodes M`) change nothing here: `RANK` orders the processes of all machines (the
global batch, the data shards, "main" = rank 0, which alone writes the run directory) and `LOCAL_RANK` picks the
GPU on this machine. Every rank reads the checkpoint it resumes from, so `run.out_dir` must be on a file system
all machines share (as OpenCLIP assumes too).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.layers import Block

__all__ = ["Distributed", "everywhere", "full_model_state", "full_optimizer_state", "load_full_state", "rank_world",
           "same_everywhere", "setup_distributed", "sync_replicated_grads", "wrap_model"]  # fmt: skip


def rank_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised default process group, or (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def everywhere(ok: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `ok` holds on every rank (just `ok` in one process): ranks that must take the same branch (skip a
    step, stop, read a cache) decide together, or one would wait in a collective the others never enter."""
    if rank_world()[1] == 1:
        return ok
    flag = torch.tensor([float(ok)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def same_everywhere(value: float, device: torch.device | str = "cpu") -> bool:
    """Whether `value` is the same on every rank (True in one process): for what each rank read on its own, such as
    the step a resumed run starts from, which differs when the machines do not share `run.out_dir`."""
    if rank_world()[1] == 1:
        return True
    bounds = torch.tensor([value, -value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
    return bounds[0].item() == -bounds[1].item()


@dataclass
class Distributed:
    """This process's place in the job: rank, world size, its device, and how the model is spread."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parallel: str = "ddp"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are split across processes (FSDP with more than one process)."""
        return self.parallel == "fsdp" and self.world_size > 1


def setup_distributed(device: str = "auto", parallel: str = "ddp") -> Distributed:
    """Join the torchrun process group when `WORLD_SIZE` > 1 (nccl on CUDA, gloo on CPU). The GPU is this machine's
    `LOCAL_RANK`-th, the rank the global `RANK`: they differ on every machine but the first."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world_size, dev, parallel)


def wrap_model(model: nn.Module, dist: Distributed) -> nn.Module:
    """The module to call for training: `model` itself (one process, or sharded in place by FSDP) or a DDP
    wrapper around it. `model` stays the object whose parameters the optimiser holds."""
    if dist.world_size == 1:
        return model
    if dist.sharded:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for module in model.modules():
            if isinstance(module, Block):
                fully_shard(module)
                register_fsdp_forward_method(module, "forward_one")  # the towers' pooled-position path
        for tower in (model.visual, model.text):
            fully_shard(tower)
        register_fsdp_forward_method(model.text, "forward_hidden")
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _replicated(model: nn.Module) -> list[nn.Parameter]:
    from torch.distributed.tensor import DTensor

    return [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]


def sync_replicated_grads(model: nn.Module, dist: Distributed) -> None:
    """Under FSDP, average the gradients of the parameters left unsharded (temperature, bias) over processes,
    as FSDP does for the sharded ones."""
    if not dist.sharded:
        return
    for p in _replicated(model):
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)


def _options(dist: Distributed):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=dist.sharded)


def full_model_state(model: nn.Module, dist: Distributed) -> dict[str, torch.Tensor]:
    """The whole model's state dict (collective under FSDP: call on every rank; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(dist))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, dist: Distributed) -> dict:
    """The optimiser's state keyed by parameter name (collective under FSDP; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(dist))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict,
                    dist: Distributed) -> None:  # fmt: skip
    """Load whole state saved by `full_model_state`/`full_optimizer_state` into a model of any layout."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
