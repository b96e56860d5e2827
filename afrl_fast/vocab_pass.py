"""The vocabulary pass of the fused RL/SFT loss (afrl_fast.loss) over one chunk of logits: every
implementation, side by side, and the one contract they keep (the loss module's docstring states it).

    torch      `vocab_pass_torch` below: fp32 math in row blocks, any device; float64 inputs give the
               exact checking path.
    C++        `csrc/vocab_pass.cpp` (OpenMP, CPU), built by afrl_fast.native_build and called through
               `vocab_pass_native` below.
    Triton     `afrl_fast_kernels.vocab_pass.vocab_pass_triton` (kernels/vocab_pass.py), CUDA, or CPU
               under TRITON_INTERPRET=1.
    float64    `afrl_fast_kernels.reference.vocab_pass_reference` (kernels/reference.py): full logits,
    reference  what the tests hold every implementation to.

afrl_fast.backends picks one per device ("auto": CUDA → Triton; CPU → C++ if it builds, else torch).
"""
from __future__ import annotations

import torch

from afrl_fast_kernels.constants import IGNORE_INDEX

from .lm_head import block_rows
from .native_build import NATIVE_DTYPES, native_module, row_vector

TRITON = "afrl_fast_kernels.vocab_pass"


def rowwise_terms(logp, valid, is_sft, advantages, old_logp, ref_logp, scale, beta, eps_low, eps_high):
    """(scale·L, c = scale·dL/dlog p, clipped, k3) for a block of rows, fp32.

    clipped and k3 are False/0 outside valid RL rows; row_loss and c are 0 on ignored rows. old_logp
    None is on-policy: old is log p itself, so the ratio is exactly 1 (its slope stays that of log p)."""
    ratio = torch.ones_like(logp) if old_logp is None else torch.exp(logp - old_logp)
    adv = advantages
    pg = -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    # The clamped branch is the min exactly when the ratio left the trust region on the side the
    # advantage pushes towards; there the clamp is flat, so the policy-gradient term has slope 0.
    clipped = ((adv > 0) & (ratio > 1.0 + eps_high)) | ((adv < 0) & (ratio < 1.0 - eps_low))
    dpg = torch.where(clipped, torch.zeros_like(ratio), -adv * ratio)
    if ref_logp is not None:
        delta = ref_logp - logp
        exp_delta = torch.exp(delta)
        k3 = exp_delta - delta - 1.0
        dk3 = 1.0 - exp_delta                     # d k3 / d log p
        rl_loss, drl = pg + beta * k3, dpg + beta * dk3
    else:
        k3 = torch.zeros_like(logp)
        rl_loss, drl = pg, dpg
    loss = torch.where(is_sft, -logp, rl_loss)
    dloss = torch.where(is_sft, torch.full_like(logp, -1.0), drl)
    zero = torch.zeros_like(logp)
    rl_valid = valid & ~is_sft
    return (torch.where(valid, scale * loss, zero), torch.where(valid, scale * dloss, zero),
            clipped & rl_valid, torch.where(rl_valid, k3, zero))


def vocab_pass_torch(logits, targets, is_sft, advantages, old_logp, ref_logp, scale,
                     beta, eps_low, eps_high, inv_temp, with_grad):
    """Vocab pass in plain torch (fp32 math). See the module docstring for the contract.

    Per row block x (raw logits):  m = max x,  u = (x − m)·t,  e = exp(u),  S = Σ e
        log p = u_y − log S      entropy = log S − Σ e·u / S      (shift by m: exact at |x| ~ 1e4)
        grad  = c·t·(onehot(y) − e/S), written over x,
    with t = inv_temp on RL rows and 1 on SFT rows (SFT rows are plain cross-entropy).
    A NaN or +inf logit makes S NaN, so the row's outputs and gradient are NaN (as in the float64
    reference); ignored rows get a zero gradient row whatever their logits hold.
    """
    n_rows, n_cols = logits.shape
    dev = logits.device
    f32 = torch.float64 if logits.dtype == torch.float64 else torch.float32   # float64: the exact test path
    row_loss = torch.zeros(n_rows, dtype=f32, device=dev)
    logp = torch.zeros(n_rows, dtype=f32, device=dev)
    entropy = torch.zeros(n_rows, dtype=f32, device=dev)
    clipped = torch.zeros(n_rows, dtype=torch.bool, device=dev)
    k3 = torch.zeros(n_rows, dtype=f32, device=dev)
    valid = targets != IGNORE_INDEX
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))[:, None]
    # Ignored rows' gradient rows are zeroed explicitly: 0·exp(NaN logit) would be NaN.
    ignored = (~valid).nonzero().squeeze(1) if with_grad else None
    rows = min(block_rows(n_cols, dev), n_rows)
    exps = torch.empty(rows, n_cols, dtype=f32, device=dev)      # the one block-sized temporary
    for r0 in range(0, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        x = logits[r0:r1]
        u = x if x.dtype == f32 else x.float()                    # fp32 math for bf16 logits
        e = exps[: r1 - r0]
        u.sub_(u.amax(dim=1, keepdim=True))
        t = None
        if inv_temp != 1.0:
            t = torch.where(is_sft[r0:r1], torch.ones((), dtype=f32, device=dev),
                            torch.full((), inv_temp, dtype=f32, device=dev))
            u.mul_(t[:, None])
        u_y = u.gather(1, safe_t[r0:r1]).squeeze(1)
        torch.exp(u, out=e)
        sum_e = e.sum(dim=1)
        # u is not needed after Σ e·u (the gradient needs only e and S): multiply in place rather
        # than allocate a third [rows, V] array. nansum: a −inf logit gives (−inf)·0 = NaN where
        # its term is 0 (p log p → 0); any real NaN (a NaN or +inf logit) already made sum_e NaN.
        sum_eu = u.mul_(e).nansum(dim=1)
        log_s = torch.log(sum_e)
        v = valid[r0:r1]
        lp = torch.where(v, u_y - log_s, torch.zeros_like(log_s))
        logp[r0:r1] = lp
        entropy[r0:r1] = torch.where(v, log_s - sum_eu / sum_e, torch.zeros_like(log_s))
        rl, c, clp, kk = rowwise_terms(lp, v, is_sft[r0:r1], advantages[r0:r1],
                                       None if old_logp is None else old_logp[r0:r1],
                                       None if ref_logp is None else ref_logp[r0:r1],
                                       scale[r0:r1], beta, eps_low, eps_high)
        row_loss[r0:r1], clipped[r0:r1], k3[r0:r1] = rl, clp, kk
        if with_grad:
            c = c if t is None else c * t
            # x ← −c·p (p = e/S), then +c at the target; ignored rows have c = 0 → a zero row.
            torch.mul(e, (-c / sum_e)[:, None], out=u)
            u.scatter_add_(1, safe_t[r0:r1], c[:, None])
            if len(ignored):
                block = ignored[(ignored >= r0) & (ignored < r1)] - r0
                u.index_fill_(0, block, 0.0)
            if u is not x:
                x.copy_(u)
    return row_loss, logp, entropy, clipped, k3


def vocab_pass_native(logits, targets, is_sft, advantages, old_logp, ref_logp, scale,
                      beta, eps_low, eps_high, inv_temp, with_grad):
    """(row_loss, logp, entropy, clipped, k3) for a chunk of raw logits [C, V] (the contract above).

    float32 and bfloat16 logits are processed in place by the kernel; any other dtype, or
    non-contiguous logits, go through a float32 copy whose gradient is copied back (when
    with_grad). Per-row inputs are converted to the kernel's dtypes (scalars broadcast).
    Raises RuntimeError when the extension is unavailable.
    """
    mod = native_module()
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("vocab_pass_native: logits must be a 2-D tensor [C, V]")
    c = logits.shape[0]
    direct = logits.dtype in NATIVE_DTYPES and logits.is_contiguous() and logits.device.type == "cpu"
    work = logits.detach() if direct else logits.detach().to("cpu", torch.float32).contiguous()
    out = mod.vocab_pass(
        work, row_vector(targets, torch.int64, c, "targets"), row_vector(is_sft, torch.bool, c, "is_sft"),
        row_vector(advantages, torch.float32, c, "advantages"),
        None if old_logp is None else row_vector(old_logp, torch.float32, c, "old_logp"),
        None if ref_logp is None else row_vector(ref_logp, torch.float32, c, "ref_logp"),
        row_vector(scale, torch.float32, c, "scale"),
        float(beta), float(eps_low), float(eps_high), float(inv_temp), bool(with_grad))
    if with_grad and not direct:
        with torch.no_grad():
            logits.copy_(work)
    return out
