"""Optimizer (no weight decay on norms, biases and timm's no-decay parameters) and the per-step LR schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from spartan.train.config import OptimConfig, ScheduleConfig


def peak_lr(config: OptimConfig, global_batch: int) -> float:
    """``optim.lr``, scaled linearly from ``optim.lr_reference_batch`` to ``global_batch`` when that is set."""
    if config.lr_reference_batch is None:
        return config.lr
    return config.lr * global_batch / config.lr_reference_batch


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()  # timm: pos_embed, ...
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = name.replace(".parametrizations.", ".").replace(".original", "")
        exempt = param.ndim <= 1 or plain in skip or plain.split(".")[-1] in skip
        (no_decay if exempt and not config.decay_norms_and_biases else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=config.betas, eps=config.eps)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based): linear warm-up, then decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def build_lr_schedule(
    optimizer: torch.optim.Optimizer, config: ScheduleConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A schedule stepped once per optimizer step."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.lr_schedule, config.min_lr_ratio)
    )
