"""The teacher–student pass of the fused distillation loss (afrl_fast.distill_loss) over one chunk of
student and teacher logits: every implementation, side by side, and the one contract they keep (the
distillation loss module's docstring states it).

    torch      `distill_pass_torch` below: plain torch in row blocks, any device; float64 inputs give
               the exact checking path.
    C++        `csrc/distill_pass.cpp` (OpenMP, CPU; in the same extension as the vocabulary pass),
               built by afrl_fast.native_build and called through `distill_pass_native` below.
    Triton     `afrl_fast_kernels.distill_pass.distill_pass_triton` (kernels/distill_pass.py), CUDA, one
               program per row.
    float64    `afrl_fast_kernels.reference.distill_pass_reference` (kernels/reference.py).
    reference

afrl_fast.backends picks one per device ("auto": CUDA → Triton; CPU → C++ if it builds, else torch).
"""
from __future__ import annotations

import math

import torch

from afrl_fast_kernels.constants import DISTILL_KINDS, IGNORE_INDEX

from .lm_head import block_rows
from .native_build import native_module, row_vector

TRITON = "afrl_fast_kernels.distill_pass"


def _check_kind(kind, beta):
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(DISTILL_KINDS)}, got {kind!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta!r}")


def _log_softmax_into(x, inv_temp, log_out, p_out):
    """log_out ← log_softmax(x·inv_temp), p_out ← its softmax, in the given buffers (no temporaries
    of the block's size): shift by the row max, exponentiate, subtract the log of the row sum."""
    torch.mul(x, inv_temp, out=log_out)
    log_out.sub_(log_out.amax(dim=1, keepdim=True))
    torch.exp(log_out, out=p_out)
    total = p_out.sum(dim=1, keepdim=True)
    log_out.sub_(total.log())
    p_out.div_(total)


def _masked_kl(p, log_p, log_q, scratch):
    """Σ p·(log p − log q) per row with 0·log(0/q) = 0; "p == 0" rather than "p > 0" so NaN stays."""
    torch.sub(log_p, log_q, out=scratch).mul_(p)
    return scratch.masked_fill_(p == 0, 0.0).sum(1)


def distill_pass_torch(student_logits, teacher_logits, targets, coef, ce_coef, kind, beta, inv_temp, with_grad):
    """Distill pass in plain torch (fp32 math; float64 inputs: float64). Contract: afrl_fast.loss.

    Per row block: log Q = log_softmax(z_s·τ⁻¹), log P = log_softmax(z_t·τ⁻¹), D from them (jsd:
    log M = logaddexp(log β + log P, log(1−β) + log Q), exact where β·P underflows), CE from
    log_softmax(z_s); then z_s ← coef·τ⁻¹·dD/du + ce_coef·(softmax(z_s) − onehot(y)). A row whose D is
    NaN (a NaN or +inf logit) gets an all-NaN gradient row, as in the float64 reference; ignored rows
    get zeros whatever their logits hold. teacher_logits is only read. Six block buffers are
    allocated once and reused by every block (fresh per-block temporaries of several MB each stay
    resident in the allocator's heap and showed as 2× the chunk's memory).
    """
    _check_kind(kind, beta)
    n_rows, n_cols = student_logits.shape
    dev = student_logits.device
    f32 = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    div = torch.zeros(n_rows, dtype=f32, device=dev)
    ce = torch.zeros(n_rows, dtype=f32, device=dev)
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))[:, None]
    zero = torch.zeros((), dtype=f32, device=dev)
    coef = coef.to(f32)
    # Six buffers of a quarter of the vocab pass's block: 1.5 of its blocks in all.
    rows = min(max(1, block_rows(n_cols, dev) // 4), n_rows)
    bufs = torch.empty(6, rows, n_cols, dtype=f32, device=dev)
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        x = student_logits[r0:r1]
        v = valid[r0:r1]
        log_q, log_p, q, p, e, f = (b[: r1 - r0] for b in bufs)
        _log_softmax_into(x, inv_temp, log_q, q)
        _log_softmax_into(teacher_logits[r0:r1], inv_temp, log_p, p)
        if kind == "forward_kl":
            d = _masked_kl(p, log_p, log_q, e)
            du = torch.sub(q, p, out=e)
        elif kind == "reverse_kl":
            d = _masked_kl(q, log_q, log_p, e)
            du = torch.sub(log_q, log_p, out=e).sub_(d[:, None]).mul_(q).masked_fill_(q == 0, 0.0)
        else:
            log_m = torch.logaddexp(torch.add(log_p, math.log(beta), out=e), torch.add(log_q, math.log1p(-beta), out=f),
                                    out=e)
            kl_q = _masked_kl(q, log_q, log_m, f)
            d = beta * _masked_kl(p, log_p, log_m, f) + (1 - beta) * kl_q
            du = torch.sub(log_q, log_m, out=f).sub_(kl_q[:, None]).mul_(q).mul_(1 - beta).masked_fill_(q == 0, 0.0)
        if inv_temp == 1.0:
            log_q1, q1 = log_q, q
        else:                                       # the CE at τ = 1, in the teacher's spent buffers
            log_q1, q1 = log_p, p
            _log_softmax_into(x, 1.0, log_q1, q1)
        div[r0:r1] = torch.where(v, d, zero)
        ce[r0:r1] = torch.where(v, -log_q1.gather(1, safe_t[r0:r1]).squeeze(1), zero)
        if with_grad:
            g = du.mul_((coef[r0:r1] * inv_temp)[:, None])
            if ce_coef:
                g.add_(q1, alpha=ce_coef).scatter_add_(
                    1, safe_t[r0:r1], torch.full((r1 - r0, 1), -float(ce_coef), dtype=f32, device=dev))
            g.masked_fill_(d.isnan()[:, None], float("nan"))
            g.masked_fill_(~v[:, None], 0.0)
            x.copy_(g)
    return div, ce


def distill_pass_native(student_logits, teacher_logits, targets, coef, ce_coef, kind, beta, inv_temp, with_grad):
    """(div [C] f32, ce [C] f32) for a chunk of raw student and teacher logits [C, V] (the contract of
    `distill_pass_torch`). float32 contiguous CPU student logits are processed in place; any other
    student dtype or layout goes through a float32 copy whose gradient is copied back (when
    with_grad); the teacher's are read from a float32 contiguous view or copy. Raises RuntimeError
    when the extension is unavailable."""
    mod = native_module()
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"distill_pass_native: {name} must be a 2-D tensor [C, V]")
    _check_kind(kind, beta)
    c = student_logits.shape[0]
    direct = (student_logits.dtype == torch.float32 and student_logits.is_contiguous()
              and student_logits.device.type == "cpu")
    work = student_logits.detach() if direct else student_logits.detach().to("cpu", torch.float32).contiguous()
    teacher = teacher_logits.detach().to("cpu", torch.float32).contiguous()
    out = mod.distill_pass(work, teacher, row_vector(targets, torch.int64, c, "targets"),
                           row_vector(coef, torch.float32, c, "coef"), float(ce_coef), DISTILL_KINDS.index(kind),
                           float(beta), float(inv_temp), bool(with_grad))
    if with_grad and not direct:
        with torch.no_grad():
            student_logits.copy_(work)
    return out
