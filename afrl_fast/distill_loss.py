"""Fused teacher–student distillation loss over the lm_head, chunked over rows so full logits never
exist (`fused_distill_loss`); the RL/SFT loss is afrl_fast.loss, and both share afrl_fast.lm_head.

Distillation (`fused_distill_loss`; float64 contract `afrl_fast_kernels.reference.fused_distill_loss_reference`).
Teacher logits z_t = h_t·W_tᵀ, student logits z_s = h_s·W_sᵀ, both over the same vocabulary; at the
temperature τ, P = softmax(z_t/τ) (teacher), Q = softmax(z_s/τ) (student), u = z_s/τ:

    forward_kl  D = KL(P‖Q) = Σ P (log P − log Q)                dD/du_j = Q_j − P_j
    reverse_kl  D = KL(Q‖P) = Σ Q (log Q − log P)                dD/du_j = Q_j (log Q_j − log P_j − D)
    jsd         M = β P + (1−β) Q,  D = β·KL(P‖M) + (1−β)·KL(Q‖M),  0 < β < 1
                                                                dD/du_j = (1−β) Q_j (log Q_j − log M_j − KL(Q‖M))
    CE_i = −log softmax(z_s)[y_i]   (τ = 1: the hard label is the data's, not the teacher's)

    m_i = [y_i ≠ −100],  den = denominator if given else Σ_i m_i
    loss = Σ_i m_i·w_i·D_i / den + hard_label_weight · Σ_i m_i·CE_i / den        (den = 0: loss 0)
    d loss/d z_s,i = m_i·(w_i/den)·dD/du / τ + m_i·(hard_label_weight/den)·(softmax(z_s) − onehot(y_i))

The β convention is Liger-Kernel's generalized JSD with its P = teacher, Q = student
(`LigerFusedLinearJSD(jsd_beta=β)`, `LigerFusedLinearJSDLoss(beta=β)`): Liger's β = 0 is our
forward_kl, β = 1 our reverse_kl, 0 < β < 1 our jsd with jsd_beta = β. Neither side multiplies by τ².
Liger divides by the number of non-ignored rows: our default (row_weight None, denominator None);
LigerFusedLinearJSDLoss(weight_soft_loss=a, weight_hard_loss=b) is a·ours with hard_label_weight = b/a
(its CE is also at τ = 1). tests/test_fused_distill_loss.py runs both against ours.

Per chunk of C rows (the same chunk loop, two logits buffers, both fp32):

    Zt = h_t[c]·W_tᵀ (no grad),  Zs = h_s[c]·W_sᵀ
    distill_pass(Zs, Zt)      sweep 1: online max / Σexp of both rows, and the cross sums that give
                              forward/reverse KL from sweep 1 alone (and Σexp of z_s at τ = 1 for CE
                              when τ ≠ 1); jsd: a sweep for KL(P‖M), KL(Q‖M) (log M is not linear);
                              last sweep: Zs ← d loss/d z_s in place
    dh_s = Zs·W_s ;  dW_s += Zsᵀ·h_s

so forward again holds the gradients and backward only scales them: four GEMMs per step (the
teacher's logits and the student's three). Chunk rule: both fp32 buffers together ≤ 256 MiB
(`default_chunk_rows(n, V, n_buffers=2)`: ≤ 220 rows at V = 151,936); `chunk_rows` overrides.

The backends implement

    distill_pass(student_logits [C,V] raw (fp32; float64 on the torch path), overwritten with
                 d loss/d z_s when with_grad, teacher_logits [C,V] raw (only read), targets [C] int64,
                 coef [C] = m·w/den, ce_coef = hard_label_weight/den (0: no CE term), kind, beta,
                 inv_temp, with_grad) -> (div [C] = D, ce [C] = CE; 0 on ignored rows)

with "torch" (`afrl_fast.distill_pass.distill_pass_torch`), "native" (csrc/distill_pass.cpp, in the same
extension as the vocab pass) and "triton" (`afrl_fast_kernels.distill_pass`, one program per row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afrl_fast_kernels.constants import DISTILL_KINDS, IGNORE_INDEX

from .backends import resolve_backend
from .lm_head import (check_chunk_rows, check_head, check_number, check_row_tensor, check_targets_range,
                      default_chunk_rows, grad_gemms, hand_over_grads, logits_gemm, nvtx_range)


@dataclass
class DistillLossOutput:
    loss: torch.Tensor        # scalar fp32, differentiable w.r.t. student_hidden and student_weight only
    per_row: torch.Tensor     # [N] fp32, detached: D_i, 0 on ignored rows
    ce: torch.Tensor          # [N] fp32, detached: the student's hard-label CE at τ = 1, 0 on ignored rows


def _distill_chunk_loop(s_hidden, s_weight, t_hidden, t_weight, targets, coef, ce_coef, kind, beta, inv_temp,
                        distill_pass, chunk_rows, need_dh, need_dw):
    """Run the chunks. Returns (loss, per_row, ce, dh or None, dW or None)."""
    n_rows, vocab = s_hidden.shape[0], s_weight.shape[0]
    dev = s_hidden.device
    f32 = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32   # the accumulation dtype
    on_cuda = dev.type == "cuda"
    with_grad = need_dh or need_dw
    rows = min(chunk_rows, n_rows)
    student_buf = torch.empty(rows, vocab, dtype=f32, device=dev)
    teacher_buf = torch.empty(rows, vocab, dtype=f32, device=dev)
    per_row = torch.empty(n_rows, dtype=f32, device=dev)
    ce = torch.empty(n_rows, dtype=f32, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    dh = torch.empty_like(s_hidden) if need_dh else None
    dw = torch.zeros(s_weight.shape, dtype=f32, device=dev) if need_dw else None
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, n_rows)
        h_c, zs, zt = s_hidden[r0:r1], student_buf[: r1 - r0], teacher_buf[: r1 - r0]
        with nvtx_range("afrl.teacher_gemm", on_cuda):
            logits_gemm(t_hidden[r0:r1], t_weight, zt)
        with nvtx_range("afrl.logits_gemm", on_cuda):
            logits_gemm(h_c, s_weight, zs)
        with nvtx_range("afrl.distill_pass", on_cuda):
            div, row_ce = distill_pass(zs, zt, targets[r0:r1], coef[r0:r1], ce_coef, kind, beta, inv_temp, with_grad)
        per_row[r0:r1], ce[r0:r1] = div, row_ce
        # coef is 0 on ignored rows, where div is 0 too; a NaN D of a kept row keeps the loss NaN
        loss += (coef[r0:r1].to(torch.float64) * div.to(torch.float64)).sum()
        if ce_coef:
            loss += ce_coef * row_ce.sum(dtype=torch.float64)
        if with_grad:
            with nvtx_range("afrl.grad_gemms", on_cuda):
                grad_gemms(zs, h_c, s_weight, None if dh is None else dh[r0:r1], dw)
    if dw is not None and dw.dtype != s_weight.dtype:
        dw = dw.to(s_weight.dtype)
    return loss.to(f32), per_row, ce, dh, dw


class FusedDistillFunction(torch.autograd.Function):
    """Distillation forward that also computes d loss/d student_hidden and d loss/d student_weight."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, targets, coef, ce_coef, kind, beta, inv_temp,
                distill_pass, chunk_rows):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, per_row, ce, dh, dw = _distill_chunk_loop(
            s_hidden, s_weight, t_hidden, t_weight, targets, coef, ce_coef, kind, beta, inv_temp, distill_pass,
            chunk_rows, need_dh, need_dw)
        ctx.grads = (dh, dw)          # handed over in backward (see FusedLossFunction)
        ctx.mark_non_differentiable(per_row, ce)
        return loss, per_row, ce

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return (*hand_over_grads(ctx, grad_loss, "fused_distill_loss"), *([None] * 10))


def _check_distill_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, kind, jsd_beta,
                          temperature, row_weight, hard_label_weight, denominator, chunk_rows):
    """Validate everything; returns (beta, inv_temp, hard_label_weight, denominator or None) as floats."""
    check_head(student_hidden, student_weight, "student_hidden", "student_weight")
    check_head(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight")
    n, dev = student_hidden.shape[0], student_hidden.device
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher_hidden must have one row per student_hidden row ({n}), "
                         f"got shape {list(teacher_hidden.shape)}")
    if teacher_hidden.device != dev:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {dev}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"student_weight {list(student_weight.shape)} and teacher_weight "
                         f"{list(teacher_weight.shape)} must have the same vocabulary size V (dim 0)")
    check_row_tensor("targets", targets, n, dev, "int")
    if row_weight is not None:
        check_row_tensor("row_weight", row_weight, n, dev, "float")
        finite = torch.isfinite(row_weight)
        if n and not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            raise ValueError(f"row_weight must be finite; row_weight[{i}] = {row_weight[i].item()}")
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, DISTILL_KINDS))}, got {kind!r}")
    beta = 0.0
    if kind == "jsd":
        beta = check_number("jsd_beta", jsd_beta)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1) for kind='jsd' (β = 0 is forward_kl, β = 1 "
                             f"reverse_kl), got {jsd_beta!r}")
    inv_temp = 1.0 / check_number("temperature", temperature, positive=True)
    hard = check_number("hard_label_weight", hard_label_weight)
    den = None if denominator is None else check_number("denominator", denominator)
    check_chunk_rows(chunk_rows)
    check_targets_range(targets, student_weight.shape[0])
    return beta, inv_temp, hard, den


def fused_distill_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, *,
                       kind="forward_kl", jsd_beta=0.5, temperature=1.0, row_weight=None, hard_label_weight=0.0,
                       denominator=None, backend="auto", chunk_rows=None) -> DistillLossOutput:
    """Teacher–student distillation loss over the rows of a batch, without materialising either
    model's full logits (equations, β convention and chunk rule in the module docstring).

    student_hidden [N, Hs] and student_weight [V, Hs] are the only differentiable inputs;
    teacher_hidden [N, Ht] and teacher_weight [V, Ht] (any floating dtype, detached here) give the
    teacher's logits. targets [N] int (−100: an ignored row) are the hard labels of the CE term.
    kind: "forward_kl" | "reverse_kl" | "jsd" (jsd_beta in (0, 1)); temperature τ > 0 scales both
    models' logits in D (not in CE); row_weight [N] finite floats (default 1); hard_label_weight ≥ 0;
    denominator: the token count to divide by (default: this batch's kept rows), e.g. the global count
    across micro-batches and ranks; 0 only when no row is kept (then the loss is 0, zero gradients).

    Returns DistillLossOutput(loss, per_row = D_i, ce = CE_i), per_row and ce detached and 0 on
    ignored rows. NaN is never hidden: a NaN or +inf logit of a kept row (teacher or student) gives a
    NaN D, hence a NaN loss and NaN gradient rows, as the float64 reference does; −inf logits are
    masked tokens. Bad shapes, dtypes, devices or values: ValueError (TypeError for non-tensors)
    naming the argument.
    """
    beta, inv_temp, hard, den = _check_distill_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, targets, kind, jsd_beta, temperature,
        row_weight, hard_label_weight, denominator, chunk_rows)
    dev = student_hidden.device
    name, distill_pass = resolve_backend(backend, dev, kernel="distill_pass")
    exact = student_hidden.dtype == torch.float64
    if exact and name != "torch":
        raise ValueError(f"float64 inputs run on the torch backend only (a checking path), not {name!r}")
    acc = torch.float64 if exact else torch.float32
    targets = targets.to(torch.int64).contiguous()
    valid = targets != IGNORE_INDEX
    n_kept = int(valid.sum())
    if den is None:
        den = float(n_kept)
    elif den == 0 and n_kept:
        raise ValueError(f"denominator is 0 but {n_kept} rows are kept (targets != {IGNORE_INDEX})")
    inv_den = 1.0 / den if den > 0 else 0.0
    weight = torch.ones((), dtype=acc, device=dev) if row_weight is None else row_weight.to(acc)
    coef = torch.where(valid, weight * inv_den, torch.zeros((), dtype=acc, device=dev)).contiguous()
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    chunk = int(chunk_rows) if chunk_rows else default_chunk_rows(n, vocab, n_buffers=2)
    s_hidden, s_weight = student_hidden.contiguous(), student_weight.contiguous()
    args = (teacher_hidden.detach().contiguous(), teacher_weight.detach().contiguous(), targets, coef,
            hard * inv_den, kind, beta, inv_temp, distill_pass, chunk)
    if torch.is_grad_enabled() and (s_hidden.requires_grad or s_weight.requires_grad):
        out = FusedDistillFunction.apply(s_hidden, s_weight, *args)
    else:
        out = _distill_chunk_loop(s_hidden, s_weight, *args, need_dh=False, need_dw=False)[:3]
    return DistillLossOutput(*out)
