"""The optimizer step and the learning-rate schedule shared by SFT, RL and distillation.

AdamW on the policy's parameters; one step clips the global gradient norm (FSDP2-aware: the norm of a
sharded model is a DTensor that is reduced over ranks), refuses to step on a non-finite loss or
gradient (a NaN step would silently poison every weight and every later checkpoint), steps and zeroes.
"""
from __future__ import annotations

import math

import torch

from .errors import NonFiniteError


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                             weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_step(module: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                   loss: float | None = None) -> float:
    """Clip the global gradient norm, step, zero; returns the norm before clipping.

    Raises NonFiniteError (after zeroing the gradients, without stepping) when `loss` — the global
    loss of the update, summed over ranks by the caller — or the gradient norm is NaN or infinite:
    every rank sees the same reduced values, so all ranks refuse together. The loss is checked on
    its own because a non-finite loss need not leave a non-finite gradient (a saturated softmax, a
    masked row), and a step taken from it is a step on garbage."""
    if loss is not None and not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite loss ({loss}); the weights were not updated")
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm = float(norm)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite gradient norm ({norm}); the weights were not updated")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
