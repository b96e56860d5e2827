"""SFT cold start (paper §4.1): cross-entropy on expert AFRL trajectories, the fused loss in SFT-only mode.

Each example is (prompt tokens, trace tokens + EOS); the loss is the token mean over the global
batch: every row's scale is world / (response tokens in the global batch), so after FSDP averages
gradients over ranks the sum is exactly the global token mean.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import dist as D
from .policy import loss_backward


def sft_rows_scale(n_local_tokens: int, info, device) -> float:
    n_global = D.all_reduce_sum([float(n_local_tokens)], device)[0]
    return info.world / max(n_global, 1.0)


def sft_loss_backward(policy, examples: list[tuple[list[int], list[int]]], *, pad_id: int, info,
                      micro_batch: int = 0) -> dict:
    """Token-mean cross-entropy over the global batch, backward included; returns summed stats."""
    n = sum(len(e[1]) for e in examples)
    scale = sft_rows_scale(n, info, info.device)
    rows = {"is_sft": torch.ones(n, dtype=torch.bool), "advantages": torch.zeros(n),
            "old_logp": torch.zeros(n), "ref_logp": torch.zeros(n), "scale": torch.full((n,), scale)}
    return loss_backward(policy, [e[0] for e in examples], [e[1] for e in examples], rows, pad_id=pad_id,
                         device=info.device, micro_batch=micro_batch)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees
    exactly the batches the uninterrupted run would have seen."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def sft_batches(n_examples: int, batch_size: int, epochs: float, seed: int):
    """Global batches of example indices for the whole SFT phase, as a list."""
    if epochs <= 0 or n_examples == 0:
        return []
    per_epoch = max(1, n_examples // batch_size)
    total = max(1, int(math.ceil(per_epoch * epochs)))
    out = []
    for s in range(total):
        epoch, k = divmod(s, per_epoch)
        order = epoch_order(n_examples, seed, epoch)
        out.append(order[k * batch_size:(k + 1) * batch_size].tolist())
    return out


def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_step(module, optimizer, grad_clip: float) -> float:
    """Clip the global gradient norm (FSDP2-aware through DTensor), step, zero; returns the norm."""
    params = [p for p in module.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)
