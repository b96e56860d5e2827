"""Triton kernel of the fused distillation pass and its launcher.

One program handles one row of a chunk: the student's raw logits x_s = h_s·W_sᵀ (overwritten in
training mode with d loss/d x_s) and the teacher's x_t = h_t·W_tᵀ (only read), fp32, same shape.
With τ⁻¹ the inverse temperature, a = (x_t − m_t)·τ⁻¹ and b = (x_s − m_s)·τ⁻¹ (m: row maxima):

  sweep 1  streams over V once, both rows: online maxima, S_t = Σ e^a, S_s = Σ e^b and the cross sum
           F = Σ e^a·(a − b) (forward KL) or R = Σ e^b·(b − a) (reverse KL), rescaled as the maxima
           move (e^{δt}·(F + (δt − δs)·S_t)); then D = F/S_t − log S_t + log S_s or
           D = R/S_s − log S_s + log S_t. When τ ≠ 1 also S1 = Σ e^{x_s − m_s} for the CE at τ = 1.
  sweep 2  (jsd only) KL(P‖M) and KL(Q‖M) with log M per token: log M is not linear in the sums.
  sweep 3  (training mode) x_s ← coef·τ⁻¹·dD/du + ce_coef·(softmax(x_s) − onehot(y)).

CE = log S1 − (x_s[y] − m_s), read before sweep 3 overwrites the row. Probabilities of −inf logits
are masked with "e == 0" (not "e > 0"), so a NaN is never taken for a zero; a row whose D is NaN (a
NaN or +inf logit in either model) gets an all-NaN gradient row, as the float64 reference does.

The float64 contract is `reference.distill_pass_reference` / `fused_distill_loss_reference`; the
test is tests/test_distill_pass_triton.py and the register/spill check tests/test_kernel_compile.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from afrl_fast_kernels.constants import DISTILL_KINDS, IGNORE_INDEX
from afrl_fast_kernels.vocab_pass import launch_config   # one tile rule for both kernels

_IGNORE = tl.constexpr(IGNORE_INDEX)   # jit code may only read constexpr globals
_FORWARD_KL = tl.constexpr(DISTILL_KINDS.index("forward_kl"))
_REVERSE_KL = tl.constexpr(DISTILL_KINDS.index("reverse_kl"))
_FLT_MIN = tl.constexpr(1.1754943508222875e-38)   # smallest normal fp32


@triton.jit
def _pair_stats(s_ptr, t_ptr, V, inv_temp, KIND: tl.constexpr, SEPARATE_CE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Sweep 1: (m_s, m_t, S_s, S_t, cross, S1) of both rows (cross: F or R, 0 for jsd)."""
    offs = tl.arange(0, BLOCK_V)
    # A finite floor instead of −inf: the first rescale multiplies empty sums by a finite shift.
    ms = tl.full((), -1.0e30, tl.float32)
    mt = tl.full((), -1.0e30, tl.float32)
    ss = tl.zeros((), tl.float32)
    st = tl.zeros((), tl.float32)
    cross = tl.zeros((), tl.float32)
    s1 = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        mask = idx < V
        xs = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
        xt = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
        ms_new = tl.maximum(ms, tl.max(xs, axis=0))
        mt_new = tl.maximum(mt, tl.max(xt, axis=0))
        sh_s = (ms - ms_new) * inv_temp           # ≤ 0: moves the old sums to the new maxima
        sh_t = (mt - mt_new) * inv_temp
        b = (xs - ms_new) * inv_temp              # masked lanes: −inf
        a = (xt - mt_new) * inv_temp
        eb = tl.exp(b)
        ea = tl.exp(a)
        if KIND == _FORWARD_KL:
            # Σ e^{a+δt}(a + δt − b − δs) = e^{δt}(F + (δt − δs)·S_t); an empty S_t adds nothing
            old = tl.where(st == 0.0, 0.0, tl.exp(sh_t) * (cross + (sh_t - sh_s) * st))
            cross = old + tl.sum(tl.where(ea == 0.0, 0.0, ea * (a - b)), axis=0)
        elif KIND == _REVERSE_KL:
            old = tl.where(ss == 0.0, 0.0, tl.exp(sh_s) * (cross + (sh_s - sh_t) * ss))
            cross = old + tl.sum(tl.where(eb == 0.0, 0.0, eb * (b - a)), axis=0)
        if SEPARATE_CE:
            s1 = tl.exp(ms - ms_new) * s1 + tl.sum(tl.exp(xs - ms_new), axis=0)
        ss = tl.exp(sh_s) * ss + tl.sum(eb, axis=0)
        st = tl.exp(sh_t) * st + tl.sum(ea, axis=0)
        ms = ms_new
        mt = mt_new
    return ms, mt, ss, st, cross, s1


@triton.jit
def _jsd_terms(xs, xt, ms, mt, inv_temp, lss, lst, beta, log_beta, log_cbeta):
    """(log Q, log P, Q, P, log M) per lane. log M from M where M is a normal float; below that the
    larger log term (the weights P, Q are then < FLT_MIN/β, and log of a denormal is inexact or −inf)."""
    lq = (xs - ms) * inv_temp - lss
    lp = (xt - mt) * inv_temp - lst
    q = tl.exp(lq)
    p = tl.exp(lp)
    m = beta * p + (1.0 - beta) * q
    lm = tl.where(m < _FLT_MIN, tl.maximum(lp + log_beta, lq + log_cbeta), tl.log(m))
    return lq, lp, q, p, lm


@triton.jit
def _jsd_sums(s_ptr, t_ptr, V, ms, mt, inv_temp, lss, lst, beta, log_beta, log_cbeta, BLOCK_V: tl.constexpr):
    """Sweep 2: (KL(P‖M), KL(Q‖M))."""
    offs = tl.arange(0, BLOCK_V)
    klp = tl.zeros((), tl.float32)
    klq = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        mask = idx < V
        xs = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
        xt = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
        lq, lp, q, p, lm = _jsd_terms(xs, xt, ms, mt, inv_temp, lss, lst, beta, log_beta, log_cbeta)
        klp += tl.sum(tl.where(p == 0.0, 0.0, p * (lp - lm)), axis=0)
        klq += tl.sum(tl.where(q == 0.0, 0.0, q * (lq - lm)), axis=0)
    return klp, klq


@triton.jit
def _write_grad(s_ptr, t_ptr, V, y, ms, mt, inv_temp, lss, lst, ls1, d, shift, coef_u, ce_coef,
                beta, log_beta, log_cbeta, KIND: tl.constexpr, SEPARATE_CE: tl.constexpr, CE: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """Sweep 3: row ← coef_u·dD/du + ce_coef·(softmax(x_s) − onehot(y)), coef_u = coef·τ⁻¹.
    shift: D + log S_s − log S_t for reverse KL (so log Q − log P − D = b − a − shift), KL(Q‖M) for jsd.
    The onehot is a separate term, as the reference forms the gradient (inf − inf stays NaN)."""
    offs = tl.arange(0, BLOCK_V)
    nan_row = d != d
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        mask = idx < V
        xs = tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(t_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if KIND == _FORWARD_KL:
            q = tl.exp((xs - ms) * inv_temp - lss)
            g = coef_u * (q - tl.exp((xt - mt) * inv_temp - lst))
        elif KIND == _REVERSE_KL:
            b = (xs - ms) * inv_temp
            q = tl.exp(b - lss)
            g = tl.where(q == 0.0, 0.0, coef_u * q * (b - (xt - mt) * inv_temp - shift))
        else:
            lq, lp, q, p, lm = _jsd_terms(xs, xt, ms, mt, inv_temp, lss, lst, beta, log_beta, log_cbeta)
            g = tl.where(q == 0.0, 0.0, coef_u * (1.0 - beta) * q * (lq - lm - shift))
        if CE:
            if SEPARATE_CE:
                q1 = tl.exp(xs - ms - ls1)
            else:
                q1 = q
            g = g + ce_coef * q1 - tl.where(idx == y, ce_coef, 0.0)
        g = tl.where(nan_row, float("nan"), g)
        tl.store(s_ptr + idx, g, mask=mask)


@triton.jit
def _zero_row(row_ptr, V, BLOCK_V: tl.constexpr):
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        idx = start + offs
        tl.store(row_ptr + idx, tl.zeros((BLOCK_V,), tl.float32), mask=idx < V)


@triton.jit
def distill_pass_kernel(
    s_ptr, t_ptr, targets_ptr, coef_ptr, div_ptr, ce_ptr,
    V, stride_s, stride_t, inv_temp, beta, log_beta, log_cbeta, ce_coef,
    KIND: tl.constexpr, SEPARATE_CE: tl.constexpr, CE: tl.constexpr, WITH_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    srow = s_ptr + row * stride_s        # int64: C·V passes 2³¹ for large chunks
    trow = t_ptr + row * stride_t
    y = tl.load(targets_ptr + row)
    if y == _IGNORE:
        tl.store(div_ptr + row, 0.0)
        tl.store(ce_ptr + row, 0.0)
        if WITH_GRAD:
            _zero_row(srow, V, BLOCK_V)
    else:
        ms, mt, ss, st, cross, s1 = _pair_stats(srow, trow, V, inv_temp, KIND, SEPARATE_CE, BLOCK_V)
        lss = tl.log(ss)
        lst = tl.log(st)
        shift = 0.0
        if KIND == _FORWARD_KL:
            d = cross / st - lst + lss
        elif KIND == _REVERSE_KL:
            d = cross / ss - lss + lst
            shift = cross / ss
        else:
            klp, klq = _jsd_sums(srow, trow, V, ms, mt, inv_temp, lss, lst, beta, log_beta, log_cbeta, BLOCK_V)
            d = beta * klp + (1.0 - beta) * klq
            shift = klq
        # No softmax in either row (all −inf): NaN, as log_softmax gives
        d = tl.where((ss > 0.0) & (st > 0.0), d, float("nan"))
        x_y = tl.load(srow + y).to(tl.float32)
        if SEPARATE_CE:
            ls1 = tl.log(s1)
        else:
            ls1 = lss
        ce = tl.where(ss > 0.0, ls1 - (x_y - ms), float("nan"))   # τ = 1 when not SEPARATE_CE
        tl.store(div_ptr + row, d)
        tl.store(ce_ptr + row, ce)
        if WITH_GRAD:
            coef = tl.load(coef_ptr + row)
            _write_grad(srow, trow, V, y, ms, mt, inv_temp, lss, lst, ls1, d, shift, coef * inv_temp, ce_coef,
                        beta, log_beta, log_cbeta, KIND, SEPARATE_CE, CE, BLOCK_V)


def _check_inputs(student_logits, teacher_logits, targets, coef, kind, beta, inv_temp):
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [C, V] tensor")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
                         f"got {tuple(teacher_logits.shape)}")
    c = student_logits.shape[0]
    for name, ten, dtype in (("targets", targets, torch.int64), ("coef", coef, torch.float32)):
        if ten.shape != (c,) or ten.dtype != dtype or not ten.is_contiguous():
            raise ValueError(f"{name} must be a contiguous [{c}] {dtype} tensor, got {tuple(ten.shape)} {ten.dtype}")
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(DISTILL_KINDS)}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta!r}")
    if not (math.isfinite(inv_temp) and inv_temp > 0.0):
        raise ValueError("inv_temp must be finite and positive (the kernel tracks the max of the raw logits)")


def distill_pass_triton(student_logits, teacher_logits, targets, coef, ce_coef, kind, beta, inv_temp, with_grad,
                        *, block_v=None):
    """Fused distillation pass over a chunk of rows (contract: afrl_fast.loss, `distill_pass`).

    Returns (div [C] f32 = D, ce [C] f32 = CE), 0 on ignored rows. With `with_grad`, `student_logits`
    is overwritten in place by d loss/d student_logits (zero rows for ignored targets); otherwise it
    is left untouched. `teacher_logits` is only read. ce_coef = 0 means no CE term in the gradient.
    Targets must lie in [0, V) or be IGNORE_INDEX: the caller validates them once per batch
    (afrl_fast.loss does), a check here would cost a device sync per chunk. `block_v` overrides the
    tile (a power of two; tests use small ones to get several tiles at small V).
    """
    _check_inputs(student_logits, teacher_logits, targets, coef, kind, beta, inv_temp)
    n_rows, vocab = student_logits.shape
    f32 = dict(dtype=torch.float32, device=student_logits.device)
    div, ce = torch.empty(n_rows, **f32), torch.empty(n_rows, **f32)
    if n_rows == 0:
        return div, ce
    block, num_warps = launch_config(vocab, block_v)
    is_jsd = kind == "jsd"
    distill_pass_kernel[(n_rows,)](
        student_logits, teacher_logits, targets, coef, div, ce,
        vocab, student_logits.stride(0), teacher_logits.stride(0), float(inv_temp), float(beta),
        math.log(beta) if is_jsd else 0.0, math.log1p(-beta) if is_jsd else 0.0, float(ce_coef),
        KIND=DISTILL_KINDS.index(kind), SEPARATE_CE=float(inv_temp) != 1.0, CE=float(ce_coef) != 0.0,
        WITH_GRAD=bool(with_grad), BLOCK_V=block, num_warps=num_warps,
    )
    return div, ce
