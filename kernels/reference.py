"""Float64 torch reference of the fused vocabulary-pass loss.

This is the contract every backend (Triton, native C++, chunked torch) is tested against. It builds
the full logits, so it is only for tests and small shapes.

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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from afrl_fast_kernels import IGNORE_INDEX


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
