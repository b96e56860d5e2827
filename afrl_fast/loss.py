"""Fused lm_head losses, chunked over rows so full logits never exist: the GRPO/SFT loss
(`fused_loss`). The teacher–student distillation loss is afrl_fast.distill_loss.

Equations (the float64 contract is `afrl_fast_kernels.reference.fused_loss_reference`).
For row i with hidden h_i, target y_i (−100 = ignored) and log p_i = log_softmax(z)[y_i]:

    SFT row:  z = h_i·Wᵀ            L_i = −log p_i        (expert tokens: no sampling temperature)
    RL row:   z = h_i·Wᵀ / τ        (τ: the temperature the rollouts were sampled at)
              r_i = exp(log p_i − old_i), or r_i ≡ 1 on-policy (old_logp None: old is log p itself)
              L_i = −min(r_i·A_i, clip(r_i, 1−ε_lo, 1+ε_hi)·A_i) + β·k3_i
              k3_i = exp(ref_i − log p_i) − (ref_i − log p_i) − 1        (0 when ref is None)

On-policy: when a rollout batch gets exactly one optimizer update, the policy that sampled it is the
one being trained, so old = log p (detached): r = 1 in value and dr/dlog p = 1, which is what a
separate forward of the old policy would give — without that forward.

    loss      = Σ_i scale_i·L_i           (scale_i = α_t/#RL tokens or γ_t/#SFT tokens: token-mean)
    entropy_i = −Σ_v p_v·log p_v          (a free by-product of the softmax sweep)
    clip_frac = mean over valid RL rows of [(A>0 and r>1+ε_hi) or (A<0 and r<1−ε_lo)]
    kl        = mean over valid RL rows of k3_i

Gradient. L_i depends on z only through log p_i, so dL_i/dz = c_i·(onehot(y_i) − softmax(z)) with
the scalar c_i = scale_i·dL_i/dlog p_i:
    SFT: c = −scale
    RL:  c = scale·(−A·r  [0 when clipped, where the clamp is flat]  + β·(1 − exp(ref − log p)))
and d/d(raw logits) = dL/dz / τ (SFT rows: τ = 1). Ignored rows get c = 0, so they add nothing to
dh or dW.

The chunk loop (one pass, no logits survive a chunk):

    for each chunk of C rows:  X = h_c·Wᵀ                (GEMM, fp32 output)
                               vocab_pass(X)             (row stats, loss; X ← dLoss/dX in place)
                               dh_c = X·W ;  dW += Xᵀ·h_c (the two gradient GEMMs)

Forward therefore already holds dh and dW; backward only multiplies them by grad_output. That is
three GEMMs per step, the floor for any lm_head loss, against four for recompute-in-backward designs.

Chunk size rule: one chunk of fp32 logits is at most LOGITS_BUDGET_BYTES (256 MiB), i.e.
    max_rows = max(1, 256 MiB // (4·V))
and the N rows are split into ceil(N / max_rows) chunks of equal size (the last one shorter), so
V = 151,936 gives chunks of ≤ 441 rows. Pass `chunk_rows` to override. Bigger chunks mean fewer
passes of the rank-C update dW += Xᵀ·h_c over the whole [V, H] gradient, which is memory bound on CPU.

Backends implement one function, the vocab pass over a chunk (`afrl_fast.vocab_pass` lists all of them,
`afrl_fast.backends` picks one; `vocab_pass_torch` is the plain-torch version of this contract):

    vocab_pass(logits [C,V] raw h·Wᵀ (fp32 or bf16, overwritten in place with dLoss/dlogits when
               with_grad; scratch otherwise), targets [C] int64, is_sft [C] bool, advantages [C] f32,
               old_logp [C] f32 or None (on-policy), ref_logp [C] f32 or None, scale [C] f32, beta,
               eps_low, eps_high, inv_temp (applied to RL rows), with_grad)
      -> (row_loss = scale·L [C] f32 (0 when ignored), logp [C] f32, entropy [C] f32,
          clipped [C] bool, k3 [C] f32)

    "torch"   fp32 math in row blocks, memory bounded by the chunk plus one small block.
              It also accepts float64 inputs (then all math is float64): an exact path for checks.
    "native"  C++ kernel in csrc/ (afrl_fast.vocab_pass.vocab_pass_native), CPU.
    "triton"  afrl_fast_kernels.vocab_pass.vocab_pass_triton, CUDA (or CPU under TRITON_INTERPRET=1).
    "auto"    CUDA → triton; CPU → native if it builds, else torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from afrl_fast_kernels.constants import IGNORE_INDEX

from .backends import resolve_backend
from .lm_head import (check_chunk_rows, check_head, check_number, check_row_tensor, check_targets_range,
                      default_chunk_rows, grad_gemms, hand_over_grads, logits_gemm, nvtx_range)


@dataclass
class FusedLossOutput:
    loss: torch.Tensor        # scalar fp32, differentiable w.r.t. hidden and weight
    logp: torch.Tensor        # [N] fp32, detached, 0 on ignored rows
    entropy: torch.Tensor     # [N] fp32, detached, 0 on ignored rows
    clip_frac: torch.Tensor   # scalar fp32, detached
    kl: torch.Tensor          # scalar fp32, detached


# ----------------------------------------------------------------------------------------------
# The GEMMs around the vocab pass


@dataclass
class LossRows:
    """The per-row inputs of the fused loss besides hidden states and targets, one value per row:

    is_sft      bool   True: an SFT row (L = −log p); False: an RL row (clipped ratio + k3)
    advantages  float  Â·w_t, the group advantage times the token's stepwise weight (RL rows)
    old_logp    float  log-prob under the policy that sampled the rollout (RL rows), or None:
                       on-policy, the ratio is exactly 1 (see the module docstring)
    ref_logp    float  log-prob under the frozen reference, or None for no KL term (RL rows)
    scale       float  the row's share of the batch loss: α_t·world/#RL tokens or γ_t·world/#SFT tokens

    Build them with `LossRows.rl(...)` / `LossRows.sft(...)` and join RL and SFT rows with `cat`."""
    is_sft: torch.Tensor
    advantages: torch.Tensor
    old_logp: Optional[torch.Tensor]
    ref_logp: Optional[torch.Tensor]
    scale: torch.Tensor

    @staticmethod
    def rl(advantages, old_logp, ref_logp, scale: float) -> "LossRows":
        adv = torch.as_tensor(advantages, dtype=torch.float32)
        n = adv.shape[0]
        return LossRows(torch.zeros(n, dtype=torch.bool), adv,
                        None if old_logp is None else torch.as_tensor(old_logp, dtype=torch.float32),
                        None if ref_logp is None else torch.as_tensor(ref_logp, dtype=torch.float32),
                        torch.full((n,), float(scale)))

    @staticmethod
    def sft(n: int, scale: float) -> "LossRows":
        zeros = torch.zeros(n)
        return LossRows(torch.ones(n, dtype=torch.bool), zeros, zeros, zeros, torch.full((n,), float(scale)))

    def __len__(self) -> int:
        return int(self.is_sft.shape[0])

    @staticmethod
    def cat(parts: list["LossRows"]) -> "LossRows":
        """Rows of several batches, in order. SFT rows (from `sft`) stand in for a missing reference
        with zeros, which they do not use; they do not hold an on-policy batch's old log-probs either."""
        def joined(name):
            present = [getattr(p, name) for p in parts if getattr(p, name) is not None and not p.is_sft.all()]
            if not present:
                return None
            return torch.cat([getattr(p, name) if getattr(p, name) is not None and not p.is_sft.all()
                              else torch.zeros(len(p)) for p in parts])
        return LossRows(torch.cat([p.is_sft for p in parts]), torch.cat([p.advantages for p in parts]),
                        joined("old_logp"), joined("ref_logp"), torch.cat([p.scale for p in parts]))

    def slice(self, lo: int, hi: int) -> "LossRows":
        cut = lambda t: None if t is None else t[lo:hi]
        return LossRows(self.is_sft[lo:hi], self.advantages[lo:hi], cut(self.old_logp), cut(self.ref_logp),
                        self.scale[lo:hi])

    def to(self, device=None, dtype=torch.float32) -> "LossRows":
        """On `device`, floats in `dtype` (what every backend expects), all contiguous."""
        f = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()
        return LossRows(self.is_sft.to(device).contiguous(), f(self.advantages), f(self.old_logp),
                        f(self.ref_logp), f(self.scale))

    def chunk(self, targets: torch.Tensor, r0: int, r1: int) -> tuple:
        """(targets, is_sft, advantages, old_logp, ref_logp, scale) of rows [r0, r1), the vocab pass's order."""
        cut = lambda t: None if t is None else t[r0:r1]
        return (targets[r0:r1], self.is_sft[r0:r1], self.advantages[r0:r1], cut(self.old_logp),
                cut(self.ref_logp), self.scale[r0:r1])


def _chunk_loop(hidden, weight, targets, rows: LossRows, beta, eps_low, eps_high, inv_temp, vocab_pass,
                chunk_rows, need_dh, need_dw):
    """Run the chunks. Returns (loss, logp, entropy, clip_frac, kl, dh or None, dW or None)."""
    n_rows, _ = hidden.shape
    dev = hidden.device
    f32 = torch.float64 if hidden.dtype == torch.float64 else torch.float32   # the accumulation dtype
    on_cuda = dev.type == "cuda"
    with_grad = need_dh or need_dw
    logits_buf = torch.empty(min(chunk_rows, n_rows), weight.shape[0], dtype=f32, device=dev)
    logp = torch.empty(n_rows, dtype=f32, device=dev)
    entropy = torch.empty(n_rows, dtype=f32, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    n_clipped = torch.zeros((), dtype=torch.float64, device=dev)
    kl_sum = torch.zeros((), dtype=torch.float64, device=dev)
    dh = torch.empty_like(hidden) if need_dh else None
    # dW accumulates across chunks: in fp32 when W is low precision, cast once at the end.
    dw = torch.zeros(weight.shape, dtype=f32, device=dev) if need_dw else None
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, n_rows)
        h_c, logits = hidden[r0:r1], logits_buf[: r1 - r0]
        with nvtx_range("afrl.logits_gemm", on_cuda):
            logits_gemm(h_c, weight, logits)
        with nvtx_range("afrl.vocab_pass", on_cuda):
            row_loss, lp, ent, clipped, k3 = vocab_pass(logits, *rows.chunk(targets, r0, r1), beta, eps_low, eps_high,
                                                        inv_temp, with_grad)
        logp[r0:r1], entropy[r0:r1] = lp, ent
        loss += row_loss.sum(dtype=torch.float64)
        # Backends may leave clipped/k3 set on SFT or ignored rows; the metrics are over valid RL rows.
        rl_valid = (targets[r0:r1] != IGNORE_INDEX) & ~rows.is_sft[r0:r1]
        n_clipped += (clipped & rl_valid).sum()
        kl_sum += torch.where(rl_valid, k3, torch.zeros_like(k3)).sum(dtype=torch.float64)
        if with_grad:
            with nvtx_range("afrl.grad_gemms", on_cuda):
                grad_gemms(logits, h_c, weight, None if dh is None else dh[r0:r1], dw)
    n_rl = ((targets != IGNORE_INDEX) & ~rows.is_sft).sum().clamp(min=1).to(torch.float64)
    if dw is not None and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return loss.to(f32), logp, entropy, (n_clipped / n_rl).to(f32), (kl_sum / n_rl).to(f32), dh, dw


class FusedLossFunction(torch.autograd.Function):
    """Loss forward that also computes dLoss/dhidden and dLoss/dweight (see module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, beta, eps_low, eps_high, inv_temp, vocab_pass, chunk_rows):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, logp, entropy, clip_frac, kl, dh, dw = _chunk_loop(
            hidden, weight, targets, rows, beta, eps_low, eps_high, inv_temp, vocab_pass, chunk_rows, need_dh, need_dw)
        # Plain attributes, not save_for_backward: backward hands the buffers over and drops its
        # reference, so autograd can adopt them as .grad without another [V, H] copy.
        ctx.grads = (dh, dw)
        ctx.mark_non_differentiable(logp, entropy, clip_frac, kl)
        return loss, logp, entropy, clip_frac, kl

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        return (*hand_over_grads(ctx, grad_loss, "fused_loss"), None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Public API


def _check_hyper(temperature, beta, eps_low, eps_high):
    """Scalars every backend must see the same: a NaN or negative ε/β used to give NaN on one
    backend, an error on another and a finite loss on the third."""
    check_number("temperature", temperature, positive=True)
    for name, value in (("beta", beta), ("eps_low", eps_low), ("eps_high", eps_high)):
        check_number(name, value)


def _check_inputs(hidden, weight, targets, is_sft, advantages, old_logp, ref_logp, scale,
                  temperature, beta, eps_low, eps_high, chunk_rows):
    check_head(hidden, weight)
    n, dev = hidden.shape[0], hidden.device
    check_row_tensor("targets", targets, n, dev, "int")
    check_row_tensor("is_sft", is_sft, n, dev, "bool")
    for name, t in (("advantages", advantages), ("scale", scale)):
        check_row_tensor(name, t, n, dev, "float")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None:
            check_row_tensor(name, t, n, dev, "float")
    _check_hyper(temperature, beta, eps_low, eps_high)
    check_chunk_rows(chunk_rows)
    check_targets_range(targets, weight.shape[0])


def fused_loss(hidden, weight, targets, *, is_sft, advantages, old_logp, ref_logp, scale,
               beta=0.0, eps_low=0.2, eps_high=0.2, temperature=1.0, backend="auto",
               chunk_rows=None) -> FusedLossOutput:
    """The mixed GRPO + SFT loss over the valid rows, without materialising full logits.

    hidden [N, H] and weight [V, H] (fp32 or bf16; weight may be a tied embedding) are the only
    differentiable inputs. Per row: targets [N] (−100 = ignored), is_sft [N] bool, advantages [N]
    (already times the token weight), old_logp [N] or None (on-policy: ratio ≡ 1), ref_logp [N] or
    None, scale [N]. RL rows see `temperature`, SFT rows do not. See the module docstring for the
    equations, backends and the chunk-size rule.

    NaN and ±inf in the inputs propagate exactly as in the float64 reference, on every backend
    (afrl_fast_kernels.reference states the rule): a NaN logit, weight row or hidden row gives a
    NaN loss and NaN gradients, never a finite-looking result. temperature, beta, eps_low and
    eps_high must be finite and ≥ 0 (temperature > 0): ValueError otherwise.
    """
    _check_inputs(hidden, weight, targets, is_sft, advantages, old_logp, ref_logp, scale,
                  temperature, beta, eps_low, eps_high, chunk_rows)
    name, vocab_pass = resolve_backend(backend, hidden.device)
    exact = hidden.dtype == torch.float64
    if exact and name != "torch":
        raise ValueError(f"float64 inputs run on the torch backend only (a checking path), not {name!r}")
    rows = LossRows(is_sft, advantages, old_logp, ref_logp, scale).to(dtype=torch.float64 if exact else torch.float32)
    targets = targets.to(torch.int64).contiguous()
    chunk = int(chunk_rows) if chunk_rows else default_chunk_rows(hidden.shape[0], weight.shape[0])
    hidden, weight_c = hidden.contiguous(), weight.contiguous()
    args = (targets, rows, float(beta), float(eps_low), float(eps_high), 1.0 / float(temperature), vocab_pass, chunk)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        out = FusedLossFunction.apply(hidden, weight_c, *args)
    else:
        out = _chunk_loop(hidden, weight_c, *args, need_dh=False, need_dw=False)[:5]
    return FusedLossOutput(*out)


@torch.no_grad()
def token_logprobs(hidden, weight, targets, *, temperature=1.0, backend="auto", chunk_rows=None):
    """(logp [N], entropy [N]) in fp32 at `temperature` for the old-policy / reference passes:
    forward only, no gradient buffers, memory bounded by one chunk of logits. Ignored rows give zeros."""
    n, dev = hidden.shape[0], hidden.device
    zeros = torch.zeros(n, dtype=torch.float32, device=dev)   # RL rows of zero scale: only logp/entropy count
    rl = torch.zeros(n, dtype=torch.bool, device=dev)
    out = fused_loss(hidden, weight, targets, is_sft=rl, advantages=zeros, old_logp=zeros, ref_logp=None,
                     scale=zeros, temperature=temperature, backend=backend, chunk_rows=chunk_rows)
    return out.logp, out.entropy


# ----------------------------------------------------------------------------------------------
# Distillation (see the module docstring)


