"""What the two fused lm_head losses (afrl_fast.loss, afrl_fast.distill_loss) and their torch kernels
share: the chunk size rule, the row blocks of the torch kernels, the GEMMs around a kernel's pass
(low-precision weights upcast in tiles), the hand-over of the gradients computed in forward, and the
checks of their inputs.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from afrl_fast_kernels.constants import IGNORE_INDEX

# One chunk of fp32 logits is at most this many bytes (see the module docstring).
LOGITS_BUDGET_BYTES = 256 * 2**20


# Low-precision weights are upcast to fp32 in vocabulary tiles of this many rows (CPU has no
# bf16 GEMM with fp32 output), so the fp32 copy of W never exists in full.
UPCAST_TILE_ROWS = 8192


def default_chunk_rows(n_rows: int, vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES,
                       n_buffers: int = 1) -> int:
    """Balanced chunk size with n_buffers chunks of fp32 logits together ≤ budget_bytes (at least 1 row)."""
    max_rows = max(1, budget_bytes // (4 * vocab_size * n_buffers))
    n_chunks = max(1, math.ceil(n_rows / max_rows))
    return max(1, math.ceil(n_rows / n_chunks))


def nvtx_range(name: str, on_cuda: bool):
    return torch.cuda.nvtx.range(name) if on_cuda else contextlib.nullcontext()


def logits_gemm(h_c: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out [C,V] ← h_c·Wᵀ in out's dtype (fp32; float64 for float64 inputs)."""
    if weight.dtype == out.dtype:
        torch.mm(h_c, weight.t(), out=out)
        return
    h32 = h_c.to(out.dtype)
    for v0 in range(0, weight.shape[0], UPCAST_TILE_ROWS):
        w32 = weight[v0:v0 + UPCAST_TILE_ROWS].to(out.dtype)
        torch.mm(h32, w32.t(), out=out[:, v0:v0 + w32.shape[0]])


def grad_gemms(grad: torch.Tensor, h_c: torch.Tensor, weight: torch.Tensor,
                dh_out: Optional[torch.Tensor], dw_acc: Optional[torch.Tensor]) -> None:
    """dh_out ← G·W and dw_acc += Gᵀ·h_c for G = dLoss/dlogits [C,V] (fp32; float64 for float64 inputs)."""
    if weight.dtype == grad.dtype:
        if dh_out is not None:
            torch.mm(grad, weight, out=dh_out)
        if dw_acc is not None:
            dw_acc.addmm_(grad.t(), h_c)
        return
    h32 = h_c.float()
    dh32 = torch.zeros(h_c.shape, dtype=torch.float32, device=h_c.device) if dh_out is not None else None
    for v0 in range(0, weight.shape[0], UPCAST_TILE_ROWS):
        w32 = weight[v0:v0 + UPCAST_TILE_ROWS].float()
        g = grad[:, v0:v0 + w32.shape[0]]
        if dh32 is not None:
            dh32.addmm_(g, w32)
        if dw_acc is not None:
            dw_acc[v0:v0 + w32.shape[0]].addmm_(g.t(), h32)
    if dh_out is not None:
        dh_out.copy_(dh32)


def hand_over_grads(ctx, grad_loss, who):
    """(dh, dW) computed in forward, scaled by grad_output in place and handed over (the ctx drops its
    reference, so autograd adopts the buffers as .grad without another [V, H] copy)."""
    if ctx.grads is None:
        raise RuntimeError(f"{who}: backward can run only once per forward (its gradients are "
                           f"computed in forward and handed over); call {who} again")
    dh, dw = ctx.grads
    ctx.grads = None
    skip = grad_loss.device.type == "cpu" and grad_loss.item() == 1.0
    for g in (dh, dw):
        if g is not None and not skip:
            g.mul_(grad_loss.to(g.dtype))
    return dh, dw


def check_row_tensor(name, t, n, dev, kind):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape [{n}], got {type(t).__name__}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape [N] = [{n}] (one value per row of hidden), got {list(t.shape)}")
    if t.device != dev:
        raise ValueError(f"{name} is on {t.device} but hidden is on {dev}")
    if kind == "bool" and t.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor, got {t.dtype}")
    if kind == "int" and (t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex):
        raise ValueError(f"{name} must be an integer tensor of token ids, got {t.dtype}")
    if kind == "float" and not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_number(name, value, *, positive=False) -> float:
    """A finite number ≥ 0 (> 0 when positive), as a float."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return x


def check_head(hidden, weight, h_name="hidden", w_name="weight"):
    """hidden [N, H] and weight [V, H] of one lm_head: tensors of one floating dtype on one device."""
    for name, t in ((h_name, hidden), (w_name, weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"{h_name} must be [N, H] (valid rows only), got shape {list(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{w_name} must be [V, H] with H = {hidden.shape[1]} ({h_name}'s last dim), "
                         f"got shape {list(weight.shape)}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(f"{h_name} and {w_name} must share one floating dtype, got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{h_name} is on {hidden.device} but {w_name} is on {weight.device}")


def check_chunk_rows(chunk_rows):
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or int(chunk_rows) != chunk_rows or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows}")


def check_targets_range(targets, vocab_size):
    bad = (targets >= vocab_size) | ((targets < 0) & (targets != IGNORE_INDEX))
    if targets.numel() and bool(bad.any()):
        raise ValueError(f"targets must be in [0, {vocab_size}) or {IGNORE_INDEX} (ignored); "
                         f"found {targets[bad][0].item()}")


# The torch vocab pass walks a chunk in row blocks of this many fp32 bytes: its one [rows, V]
# temporary (the exponentials) stays 1/8 of a chunk, while blocks stay big enough that the ~10
# parallel ops per block amortise their thread barriers (8 MiB blocks measured 3x slower on 2 cores).
TORCH_BLOCK_BYTES = {"cpu": 32 * 2**20, "cuda": 64 * 2**20}


def block_rows(n_cols: int, device: torch.device) -> int:
    budget = TORCH_BLOCK_BYTES.get(device.type, TORCH_BLOCK_BYTES["cuda"])
    return max(1, budget // (4 * n_cols))
