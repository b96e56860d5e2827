"""Float64 torch references of the fused losses: the GRPO/SFT vocabulary-pass loss and the
teacher–student distillation loss.

These are the contracts every backend (Triton, native C++, chunked torch) is tested against. They
build the full logits, so they are only for tests and small shapes.

Per valid row i (targets[i] != IGNORE_INDEX), with log p = log_softmax(z)[y]:

    RL row:   z = h·Wᵀ / τ   (the sampling temperature)
              r = exp(log p − old), or r ≡ 1 on-policy (old_logp None: old is log p itself, detached)
              L = −min(r·A, clip(r, 1−ε_lo, 1+ε_hi)·A) + β·(exp(ref − log p) − (ref − log p) − 1)
    SFT row:  z = h·Wᵀ       (cross-entropy on expert tokens: no sampling temperature)
              L = −log p

    loss      = Σ_i scale_i · L_i                      (scale carries α_t/#RL or γ_t/#SFT tokens)
    entropy_i = −Σ_v p_v log p_v
    clip_frac = mean over valid RL rows of [(A > 0 and r > 1+ε_hi) or (A < 0 and r < 1−ε_lo)]
    kl        = mean over valid RL rows of the k3 term (0 when ref is None)

Ignored rows give logp = entropy = 0 and contribute nothing.

Non-finite values follow from the equations in float64 (the rule every backend must match): a NaN
or +inf logit makes the row's softmax NaN, hence its loss, log p, entropy and whole gradient row;
a NaN advantage, old or ref log-prob, or scale of an RL row makes its loss and gradient row NaN;
a −inf logit is a masked token (p = 0, entropy term 0·log 0 = 0). An SFT row depends only on its
logits and scale (advantages, old and ref are placeholders there), an ignored row on nothing.

Distillation (`fused_distill_loss_reference`, per chunk `distill_pass_reference`), P the teacher and
Q the student at temperature τ, M = β·P + (1−β)·Q:

    forward_kl  D = Σ P (log P − log Q)            reverse_kl  D = Σ Q (log Q − log P)
    jsd         D = β·KL(P‖M) + (1−β)·KL(Q‖M)      (0 < β < 1)
    CE_i = −log softmax(z_s)[y_i]   (τ = 1)
    loss = Σ_i m_i·w_i·D_i / den + hard_label_weight · Σ_i m_i·CE_i / den   (den = 0: loss 0)

A term with p = 0 adds nothing (0·log(0/q) = 0), so −inf logits are masked tokens, and the masks are
applied to the operands as well, so autograd never forms 0·inf; a NaN probability is not 0, so a NaN
or +inf logit of a kept row (teacher or student) makes its D and whole gradient row NaN (its CE only
when it is the student's). One-sided masks follow the equations: a student −inf under teacher mass
gives forward_kl D = +inf, a teacher −inf under student mass reverse_kl D = +inf. With
hard_label_weight = 0 the CE term is absent (CE is still reported), not 0·CE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from afrl_fast_kernels.constants import IGNORE_INDEX


@dataclass
class LossOutput:
    loss: torch.Tensor        # scalar
    logp: torch.Tensor        # [N]
    entropy: torch.Tensor     # [N]
    clip_frac: torch.Tensor   # scalar
    kl: torch.Tensor          # scalar


def rowwise_loss_reference(logp, is_sft, advantages, old_logp, ref_logp, beta, eps_low, eps_high):
    """Per-row loss L_i and the clipped / k3 indicators from per-row log-probs (any dtype).
    old_logp None is the on-policy case: the ratio is exp(log p − stop_grad(log p)) ≡ 1 in value,
    with the gradient of log p."""
    ratio = torch.exp(logp - (logp.detach() if old_logp is None else old_logp))
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    if ref_logp is not None:
        delta = ref_logp - logp
        k3 = torch.exp(delta) - delta - 1.0
    else:
        k3 = torch.zeros_like(logp)
    rl_loss = pg + beta * k3
    row_loss = torch.where(is_sft, -logp, rl_loss)
    is_clipped = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    return row_loss, is_clipped, k3


def contract_row_loss(logp, is_sft, advantages, old_logp, ref_logp, beta, eps_low, eps_high):
    """rowwise_loss_reference for autograd: an SFT row's loss is −log p alone, so its RL branch is
    fed a detached log p and its RL inputs (advantages, old, ref are placeholders there) cannot
    send 0·NaN or 0·inf into the gradient through the unused branch of the `where`."""
    f64 = torch.float64
    logp_rl = torch.where(is_sft, logp.detach(), logp)
    ref = None if ref_logp is None else ref_logp.to(f64)
    old = None if old_logp is None else old_logp.to(f64)
    rl_loss, clipped, k3 = rowwise_loss_reference(logp_rl, torch.zeros_like(is_sft), advantages.to(f64),
                                                  old, ref, beta, eps_low, eps_high)
    return torch.where(is_sft, -logp, rl_loss), clipped, k3


def entropy_from_logprobs(logprobs):
    """−Σ p·log p per row, with 0·log 0 = 0: a −inf logit (a masked token) adds nothing, while a
    NaN or +inf logit (NaN log-probs) still makes the entropy NaN."""
    probs = logprobs.exp()
    return -(probs * logprobs.masked_fill(probs == 0, 0.0)).sum(-1)


def row_inv_temp(is_sft, inv_temp, dtype=torch.float64):
    """[N, 1] per-row factor on the raw logits: 1/τ for RL rows, 1 for SFT rows."""
    return torch.where(is_sft, torch.ones((), dtype=dtype), torch.full((), inv_temp, dtype=dtype))[:, None]


def vocab_pass_reference(logits, targets, is_sft, advantages, old_logp, ref_logp, scale, *, beta, eps_low,
                         eps_high, inv_temp):
    """The per-chunk contract of a vocab pass in float64, from raw logits [C, V]:
    (row_loss = scale·L, logp, entropy, clipped, k3, d(Σ row_loss)/d(raw logits)).

    Ignored rows contribute nothing whatever their logits hold (their logits are masked before the
    softmax), so the gradient is the autograd of the contract, not of 0·NaN products."""
    valid = targets != IGNORE_INDEX
    x = logits.detach().to(torch.float64).requires_grad_(True)
    used = torch.where(valid[:, None], x, torch.zeros((), dtype=torch.float64))
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = torch.log_softmax(used * row_inv_temp(is_sft, inv_temp), dim=-1)
    logp = logprobs.gather(1, safe_t[:, None]).squeeze(1)
    row_loss, clipped, k3 = contract_row_loss(logp, is_sft, advantages, old_logp, ref_logp, beta, eps_low,
                                              eps_high)
    zero = torch.zeros((), dtype=torch.float64)
    row_loss = torch.where(valid, row_loss * scale.to(torch.float64), zero)
    grad, = torch.autograd.grad(row_loss.sum(), x)
    return (row_loss.detach(), torch.where(valid, logp, zero).detach(),
            torch.where(valid, entropy_from_logprobs(logprobs), zero).detach(), clipped & valid,
            torch.where(valid, k3, zero).detach(), grad)


def fused_loss_reference(hidden, weight, targets, *, is_sft, advantages, old_logp, ref_logp, scale,
                         beta=0.0, eps_low=0.2, eps_high=0.2, temperature=1.0) -> LossOutput:
    """Full-logits float64 reference. Differentiable w.r.t. hidden and weight (as float64 leaves
    if the caller passes float64 tensors with requires_grad)."""
    f64 = torch.float64
    h, w = hidden.to(f64), weight.to(f64)
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    zero = torch.zeros((), dtype=f64)
    # ignored rows' logits never enter the softmax (the contract: they contribute nothing)
    logits = torch.where(valid[:, None], (h @ w.T) * row_inv_temp(is_sft, 1.0 / temperature), zero)
    logprobs = torch.log_softmax(logits, dim=-1)
    logp_all = logprobs.gather(1, safe_t[:, None]).squeeze(1)
    entropy_all = entropy_from_logprobs(logprobs)
    row_loss, is_clipped, k3 = contract_row_loss(logp_all, is_sft, advantages, old_logp, ref_logp, beta, eps_low,
                                                 eps_high)
    loss = torch.where(valid, row_loss * scale.to(f64), zero).sum()
    rl_valid = valid & ~is_sft
    n_rl = rl_valid.sum().clamp(min=1).to(f64)
    return LossOutput(
        loss=loss,
        logp=torch.where(valid, logp_all, zero),
        entropy=torch.where(valid, entropy_all, zero),
        clip_frac=(is_clipped & rl_valid).sum().to(f64) / n_rl,
        kl=torch.where(rl_valid, k3, zero).sum() / n_rl,
    )


def token_logprobs_reference(hidden, weight, targets, *, temperature=1.0):
    """(logp [N], entropy [N]) in float64 at temperature τ (RL rows of zero scale); ignored rows give zeros."""
    n = targets.shape[0]
    zeros = torch.zeros(n, dtype=hidden.dtype)
    out = fused_loss_reference(hidden, weight, targets, is_sft=torch.zeros(n, dtype=torch.bool),
                               advantages=zeros, old_logp=zeros, ref_logp=None, scale=zeros,
                               temperature=temperature)
    return out.logp, out.entropy


# ----------------------------------------------------------------------------------------------
# Distillation


@dataclass
class DistillOutput:
    loss: torch.Tensor        # scalar
    per_row: torch.Tensor     # [N] D_i, 0 on ignored rows
    ce: torch.Tensor          # [N] the student's hard-label CE at τ = 1, 0 on ignored rows


def _kl_terms(p, log_p, log_q):
    """Σ_v p·(log p − log q) per row with 0·log(0/q) = 0. The mask is applied to the operands too,
    so the gradient of a masked term is 0 rather than 0·inf; NaN ≠ 0, so a NaN p is kept."""
    zero = p == 0
    z = torch.zeros((), dtype=p.dtype)
    return torch.where(zero, z, p * (torch.where(zero, z, log_p) - torch.where(zero, z, log_q))).sum(-1)


def divergence_reference(log_p, log_q, kind, beta=0.5):
    """D per row from the teacher's log P and the student's log Q [N, V] (see the module docstring)."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return _kl_terms(p, log_p, log_q)
    if kind == "reverse_kl":
        return _kl_terms(q, log_q, log_p)
    if kind == "jsd":
        # log M in log space (exact where β·P underflows); a token masked in both models has no M,
        # and its operands are masked so that logaddexp's gradient there is not (−inf) − (−inf)
        both = (p == 0) & (q == 0)
        z = torch.zeros((), dtype=log_p.dtype)
        log_m = torch.logaddexp(torch.where(both, z, log_p) + math.log(beta),
                                torch.where(both, z, log_q) + math.log1p(-beta))
        return beta * _kl_terms(p, log_p, log_m) + (1 - beta) * _kl_terms(q, log_q, log_m)
    raise ValueError(f"unknown kind {kind!r}")


def distill_rows_reference(student_logits, teacher_logits, targets, *, kind, beta, inv_temp):
    """(D, CE) per row in float64 from raw logits [N, V]; ignored rows give 0 and their logits never
    enter a softmax. Differentiable w.r.t. student_logits."""
    f64 = torch.float64
    valid = targets != IGNORE_INDEX
    zero = torch.zeros((), dtype=f64)
    zs = torch.where(valid[:, None], student_logits.to(f64), zero)
    zt = torch.where(valid[:, None], teacher_logits.detach().to(f64), zero)
    d = divergence_reference(torch.log_softmax(zt * inv_temp, -1), torch.log_softmax(zs * inv_temp, -1), kind, beta)
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    ce = -torch.log_softmax(zs, -1).gather(1, safe_t[:, None]).squeeze(1)
    return torch.where(valid, d, zero), torch.where(valid, ce, zero)


def distill_pass_reference(student_logits, teacher_logits, targets, coef, ce_coef, *, kind, beta, inv_temp):
    """The per-chunk contract of a distill pass in float64: (D, CE, d(Σ coef·D + ce_coef·Σ CE)/d student_logits).
    coef [C] is the weight of each row's D in the loss (m·w/den), ce_coef the hard-label weight / den;
    ce_coef = 0 means no CE term (not 0·CE)."""
    x = student_logits.detach().to(torch.float64).requires_grad_(True)
    d, ce = distill_rows_reference(x, teacher_logits, targets, kind=kind, beta=beta, inv_temp=inv_temp)
    loss = (coef.to(torch.float64) * d).sum()
    if ce_coef:
        loss = loss + ce_coef * ce.sum()
    grad, = torch.autograd.grad(loss, x)
    return d.detach(), ce.detach(), grad


def fused_distill_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, *,
                                 kind="forward_kl", jsd_beta=0.5, temperature=1.0, row_weight=None,
                                 hard_label_weight=0.0, denominator=None) -> DistillOutput:
    """Full-logits float64 reference of afrl_fast.loss.fused_distill_loss. Differentiable w.r.t.
    student_hidden and student_weight (the teacher is detached)."""
    f64 = torch.float64
    zs = student_hidden.to(f64) @ student_weight.to(f64).T
    zt = (teacher_hidden.detach().to(f64) @ teacher_weight.detach().to(f64).T)
    valid = targets != IGNORE_INDEX
    den = float(valid.sum()) if denominator is None else float(denominator)
    inv_den = 1.0 / den if den > 0 else 0.0
    d, ce = distill_rows_reference(zs, zt, targets, kind=kind, beta=jsd_beta, inv_temp=1.0 / temperature)
    w = torch.ones(targets.shape, dtype=f64) if row_weight is None else row_weight.to(f64)
    loss = (torch.where(valid, w, torch.zeros((), dtype=f64)) * d).sum() * inv_den
    if hard_label_weight:
        loss = loss + hard_label_weight * ce.sum() * inv_den
    return DistillOutput(loss=loss, per_row=d.detach(), ce=ce.detach())
