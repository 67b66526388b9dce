"""AdamW with CLIP's weight-decay exclusions, and the warmup-then-cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig

# Parameters that are not weight matrices but carry these names still get no decay: learned embeddings and the
# temperature (OpenCLIP's exclusion list; CLIP paper, appendix).
_NO_DECAY_NAMES = ("pos_embed", "token_embed", "class_token", "positional_embedding", "token_embedding",
                   "class_embedding", "logit_scale", "logit_bias")  # fmt: skip


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies: only to weight matrices, never to gains, biases, embeddings or temperature."""
    if param.ndim < 2:
        return False
    return not any(part in _NO_DECAY_NAMES for part in name.split("."))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, decayed and not; frozen parameters (a locked tower) are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters: both towers are locked (model.lock_image and model.lock_text)")
    # The fused kernel updates every tensor in one pass (on the CPU ~6x less optimiser time than the per-tensor
    # loop); FSDP's sharded DTensor parameters take the default implementation.
    from torch.distributed.tensor import DTensor

    fused = not any(isinstance(p, DTensor) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


class WarmupCosine:
    """The learning-rate factor at a step: linear warmup to 1, then cosine decay to 0 (or constant).

    A callable object rather than a closure so that `LambdaLR.state_dict()` holds plain numbers.
    """

    def __init__(self, warmup_steps: int, total_steps: int, schedule: str = "cosine"):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """A `LambdaLR` stepping once per optimiser step over `total_steps`."""
    factor = WarmupCosine(cfg.warmup_steps, total_steps, cfg.schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def follow_config(scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig, total_steps: int) -> None:
    """Make a scheduler restored from a checkpoint follow this run's schedule from its current step.

    `LambdaLR.load_state_dict` brings back the saved factor's fields, so a run resumed with a larger
    `--run.steps` would keep the old schedule (a learning rate of 0 past the old end). The schedule is
    recomputed from the current warmup, total and kind instead (the cosine stretches from here on, as
    OpenCLIP's resume does); with an unchanged config nothing changes.
    """
    factor = WarmupCosine(cfg.warmup_steps, total_steps, cfg.schedule)
    scheduler.lr_lambdas = [factor] * len(scheduler.optimizer.param_groups)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
