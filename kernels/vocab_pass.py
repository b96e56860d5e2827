"""Triton kernel of the fused vocabulary pass and its launcher.

One program handles one row of a chunk of raw logits x = h·Wᵀ (not yet divided by τ):

  sweep 1  streams over V once, keeping an online max m (of raw x), the rescaled sum
           s = Σ exp((x − m)/τ) and the rescaled t = Σ exp((x − m)/τ)·(x − m)/τ, so that
           lse = m/τ + log s and entropy = log s − t/s. Working with x − m (not z − max z) keeps
           the subtraction exact at logits near ±1e4 and the entropy free of cancellation.
  scalars  the target logit (one scalar load, read before sweep 2 overwrites the row), log p,
           the RL/SFT loss, the clip indicator, k3 and c = scale·dL/dlog p.
  sweep 2  (training mode only) overwrites the row in place with c·(onehot(y) − softmax(z))/τ.

The float64 contract is `reference.rowwise_loss_reference` / `fused_loss_reference`; the test is
tests/test_vocab_pass_triton.py and the register/spill check tests/test_kernel_compile.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from afrl_fast_kernels.constants import IGNORE_INDEX
_IGNORE = tl.constexpr(IGNORE_INDEX)   # jit code may only read constexpr globals

# Production tile: 2048 fp32 lanes over 8 warps = 8 values per thread per sweep step, which keeps
# the per-thread footprint tiny (no spills) while each bf16 load is a 16-byte vector.
MAX_BLOCK_V = 2048
NUM_WARPS_LARGE = 8
NUM_WARPS_SMALL = 4


def launch_config(vocab_size: int, block_v: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary; `block_v` overrides the tile (tests use small ones)."""
    if block_v is None:
        block_v = min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab_size, 16)))
    if block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    return block_v, NUM_WARPS_LARGE if block_v >= 2048 else NUM_WARPS_SMALL


@triton.jit
def _online_stats(row_ptr, V, inv_temp, BLOCK_V: tl.constexpr):
    """One sweep: (m, s, t) with m = max raw logit, s = Σ e, t = Σ e·(x − m)·inv_temp, e = exp((x − m)·inv_temp)."""
    offs = tl.arange(0, BLOCK_V)
    # A finite floor instead of −inf: the first rescale then multiplies s = t = 0 by a finite
    # shift and no 0·inf = NaN can appear.
    m = tl.full((), -1.0e30, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        x = tl.load(row_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        shift = (m - m_new) * inv_temp          # ≤ 0; rescales the old partial sums
        alpha = tl.exp(shift)
        d = (x - m_new) * inv_temp              # masked lanes: −inf
        e = tl.exp(d)                           # masked lanes: 0
        # Masked (or −inf) lanes have e = 0 and d = −inf: zero d there so e·d is 0, not NaN.
        t = alpha * (t + shift * s) + tl.sum(e * tl.where(e > 0.0, d, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    return m, s, t


@triton.jit
def _rl_terms(logp, adv, old, ref, beta, eps_low, eps_high, HAS_REF: tl.constexpr, ON_POLICY: tl.constexpr):
    """(L, dL/dlog p, clipped, k3) of the clipped-ratio policy-gradient row with the k3 KL term.
    ON_POLICY: old is log p itself, so the ratio is exactly 1 (its slope stays that of log p)."""
    if ON_POLICY:
        ratio = tl.full((), 1.0, tl.float32)
    else:
        ratio = tl.exp(logp - old)
    unclipped = ratio * adv
    # min/max default to dropping a NaN operand (GPU min.f32); the reference's clamp and min keep it
    keep_nan: tl.constexpr = tl.PropagateNan.ALL
    clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low, propagate_nan=keep_nan), 1.0 + eps_high,
                         propagate_nan=keep_nan) * adv
    # The unclipped branch carries the gradient when it is the minimum (ties: both branches have
    # the same slope, so the sum is the same). Tested as "not clipped < unclipped" so that a NaN
    # ratio or advantage gives a NaN slope (as the float64 reference does), not a silent 0.
    loss = -tl.minimum(unclipped, clipped, propagate_nan=keep_nan)
    dlogp = tl.where(clipped < unclipped, 0.0, -adv * ratio)
    is_clipped = ((adv > 0.0) & (ratio > 1.0 + eps_high)) | ((adv < 0.0) & (ratio < 1.0 - eps_low))
    k3 = tl.zeros((), tl.float32)
    if HAS_REF:
        delta = ref - logp
        exp_delta = tl.exp(delta)
        k3 = exp_delta - delta - 1.0
        loss = loss + beta * k3
        dlogp = dlogp + beta * (1.0 - exp_delta)
    return loss, dlogp, is_clipped, k3


@triton.jit
def _write_grad(row_ptr, V, y, m, log_s, coef, inv_temp, BLOCK_V: tl.constexpr):
    """Sweep 2: row ← coef·onehot(y) − coef·p with p = exp((x − m)·inv_temp − log s); coef = c/τ.
    Two terms, as the reference's gradient is formed: an infinite coef then gives the target
    entry inf − inf = NaN like the reference, not coef·(1 − p_y) = ±inf."""
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        mask = idx < V
        x = tl.load(row_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp((x - m) * inv_temp - log_s)
        g = tl.where(idx == y, coef, 0.0) - coef * p
        tl.store(row_ptr + idx, g.to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _zero_row(row_ptr, V, BLOCK_V: tl.constexpr):
    """Ignored rows get a zero gradient row (their logits must not leak into dh or dW)."""
    offs = tl.arange(0, BLOCK_V)
    zero = tl.zeros((BLOCK_V,), tl.float32).to(row_ptr.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        tl.store(row_ptr + idx, zero, mask=idx < V)


@triton.jit
def vocab_pass_kernel(
    logits_ptr, targets_ptr, is_sft_ptr, adv_ptr, old_ptr, ref_ptr, scale_ptr,
    loss_ptr, logp_ptr, entropy_ptr, clipped_ptr, k3_ptr,
    V, stride, rl_inv_temp, beta, eps_low, eps_high,
    HAS_REF: tl.constexpr, ON_POLICY: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride       # int64: C·V passes 2³¹ for large chunks
    y = tl.load(targets_ptr + row)
    if y == _IGNORE:
        tl.store(loss_ptr + row, 0.0)
        tl.store(logp_ptr + row, 0.0)
        tl.store(entropy_ptr + row, 0.0)
        tl.store(clipped_ptr + row, False)
        tl.store(k3_ptr + row, 0.0)
        if WITH_GRAD:
            _zero_row(row_ptr, V, BLOCK_V)
    else:
        sft = tl.load(is_sft_ptr + row)
        # RL rows see the sampling temperature; SFT rows are plain cross-entropy (τ = 1)
        inv_temp = tl.where(sft, 1.0, rl_inv_temp)
        m, s, t = _online_stats(row_ptr, V, inv_temp, BLOCK_V)
        log_s = tl.log(s)
        x_y = tl.load(row_ptr + y).to(tl.float32)
        logp = (x_y - m) * inv_temp - log_s   # = z_y − lse, without forming lse ≈ ±1e4
        ref = 0.0
        if HAS_REF:
            ref = tl.load(ref_ptr + row)
        old = 0.0
        if not ON_POLICY:
            old = tl.load(old_ptr + row)
        rl_loss, rl_dlogp, is_clipped, k3 = _rl_terms(
            logp, tl.load(adv_ptr + row), old, ref, beta, eps_low, eps_high, HAS_REF, ON_POLICY)
        scale = tl.load(scale_ptr + row)
        tl.store(loss_ptr + row, scale * tl.where(sft, -logp, rl_loss))
        tl.store(logp_ptr + row, logp)
        tl.store(entropy_ptr + row, log_s - t / s)
        tl.store(clipped_ptr + row, is_clipped)
        tl.store(k3_ptr + row, k3)
        if WITH_GRAD:
            c = scale * tl.where(sft, -1.0, rl_dlogp)
            _write_grad(row_ptr, V, y, m, log_s, c * inv_temp, inv_temp, BLOCK_V)


def _check_inputs(logits, targets, is_sft, advantages, old_logp, ref_logp, scale, inv_temp):
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError("logits must be a contiguous [C, V] tensor")
    if logits.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"logits must be float32 or bfloat16, got {logits.dtype}")
    c = logits.shape[0]
    for name, ten, dtype in (("targets", targets, torch.int64), ("is_sft", is_sft, torch.bool),
                             ("advantages", advantages, torch.float32), ("old_logp", old_logp, torch.float32),
                             ("scale", scale, torch.float32), ("ref_logp", ref_logp, torch.float32)):
        if ten is None:
            continue
        if ten.shape != (c,) or ten.dtype != dtype or not ten.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{c}] {dtype} tensor, got {tuple(ten.shape)} {ten.dtype}")
    if not inv_temp > 0.0:
        raise ValueError("inv_temp must be positive (the kernel tracks the max of the raw logits)")


def vocab_pass_triton(logits, targets, is_sft, advantages, old_logp, ref_logp, scale, beta, eps_low, eps_high,
                      inv_temp, with_grad, *, block_v=None):
    """Fused vocabulary pass over a chunk of rows.

    RL rows use inv_temp, SFT rows 1; old_logp None means on-policy (ratio ≡ 1).
    Returns (row_loss = scale·L [C] f32 with 0 for ignored rows, logp [C] f32, entropy [C] f32,
    clipped [C] bool, k3 [C] f32). `clipped` and `k3` follow `rowwise_loss_reference` for every
    valid row whatever its kind (callers average them over RL rows); ignored rows give zeros/False,
    and k3 is 0 when `ref_logp` is None. With `with_grad`, `logits` is overwritten in place by
    dLoss/d(raw logits) (zero rows for ignored targets); otherwise it is left untouched.
    Targets must lie in [0, V) or be IGNORE_INDEX: checking that here would cost a device sync per
    chunk, so the caller validates once per batch (afrl_fast.loss does). `block_v` overrides the
    tile size (a power of two; tests use small ones to get several tiles at small V).
    """
    _check_inputs(logits, targets, is_sft, advantages, old_logp, ref_logp, scale, inv_temp)
    n_rows, vocab = logits.shape
    f32 = dict(dtype=torch.float32, device=logits.device)
    row_loss, logp, entropy, k3 = (torch.empty(n_rows, **f32) for _ in range(4))
    clipped = torch.empty(n_rows, dtype=torch.bool, device=logits.device)
    if n_rows == 0:
        return row_loss, logp, entropy, clipped, k3
    block, num_warps = launch_config(vocab, block_v)
    has_ref, on_policy = ref_logp is not None, old_logp is None
    vocab_pass_kernel[(n_rows,)](
        logits, targets, is_sft, advantages, advantages if on_policy else old_logp,
        ref_logp if has_ref else advantages, scale,
        row_loss, logp, entropy, clipped, k3,
        vocab, logits.stride(0), float(inv_temp), float(beta), float(eps_low), float(eps_high),
        HAS_REF=has_ref, ON_POLICY=on_policy, WITH_GRAD=bool(with_grad), BLOCK_V=block, num_warps=num_warps,
    )
    return row_loss, logp, entropy, clipped, k3
