"""Fused lm_head losses, chunked over rows so full logits never exist: the GRPO/SFT loss
(`fused_loss`) and the teacher–student distillation loss (`fused_distill_loss`, at the end).

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

Backends implement one function, the vocab pass over a chunk (`afrl_fast.backends` holds all of them
and the dispatch; `vocab_pass_torch` there is the plain-torch version of this contract):

    vocab_pass(logits [C,V] raw h·Wᵀ (fp32 or bf16, overwritten in place with dLoss/dlogits when
               with_grad; scratch otherwise), targets [C] int64, is_sft [C] bool, advantages [C] f32,
               old_logp [C] f32 or None (on-policy), ref_logp [C] f32 or None, scale [C] f32, beta,
               eps_low, eps_high, inv_temp (applied to RL rows), with_grad)
      -> (row_loss = scale·L [C] f32 (0 when ignored), logp [C] f32, entropy [C] f32,
          clipped [C] bool, k3 [C] f32)

    "torch"   fp32 math in row blocks, memory bounded by the chunk plus one small block.
              It also accepts float64 inputs (then all math is float64): an exact path for checks.
    "native"  C++ kernel in csrc/ (afrl_fast.backends.vocab_pass_native), CPU.
    "triton"  afrl_fast_kernels.vocab_pass.vocab_pass_triton, CUDA (or CPU under TRITON_INTERPRET=1).
    "auto"    CUDA → triton; CPU → native if it builds, else torch.

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

with "torch" (`afrl_fast.backends.distill_pass_torch`), "native" (csrc/distill_pass.cpp, in the same
extension as the vocab pass) and "triton" (`afrl_fast_kernels.distill_pass`, one program per row).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from afrl_fast_kernels.constants import DISTILL_KINDS, IGNORE_INDEX

from .backends import BACKENDS, resolve_backend, vocab_pass_torch  # noqa: F401  (re-exported)


# One chunk of fp32 logits is at most this many bytes (see the module docstring).
LOGITS_BUDGET_BYTES = 256 * 2**20
# Low-precision weights are upcast to fp32 in vocabulary tiles of this many rows (CPU has no
# bf16 GEMM with fp32 output), so the fp32 copy of W never exists in full.
UPCAST_TILE_ROWS = 8192


@dataclass
class FusedLossOutput:
    loss: torch.Tensor        # scalar fp32, differentiable w.r.t. hidden and weight
    logp: torch.Tensor        # [N] fp32, detached, 0 on ignored rows
    entropy: torch.Tensor     # [N] fp32, detached, 0 on ignored rows
    clip_frac: torch.Tensor   # scalar fp32, detached
    kl: torch.Tensor          # scalar fp32, detached


def default_chunk_rows(n_rows: int, vocab_size: int, budget_bytes: int = LOGITS_BUDGET_BYTES,
                       n_buffers: int = 1) -> int:
    """Balanced chunk size with n_buffers chunks of fp32 logits together ≤ budget_bytes (at least 1 row)."""
    max_rows = max(1, budget_bytes // (4 * vocab_size * n_buffers))
    n_chunks = max(1, math.ceil(n_rows / max_rows))
    return max(1, math.ceil(n_rows / n_chunks))


# ----------------------------------------------------------------------------------------------
# The GEMMs around the vocab pass


def _nvtx(name: str, on_cuda: bool):
    return torch.cuda.nvtx.range(name) if on_cuda else contextlib.nullcontext()


def _logits_gemm(h_c: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out [C,V] ← h_c·Wᵀ in out's dtype (fp32; float64 for float64 inputs)."""
    if weight.dtype == out.dtype:
        torch.mm(h_c, weight.t(), out=out)
        return
    h32 = h_c.to(out.dtype)
    for v0 in range(0, weight.shape[0], UPCAST_TILE_ROWS):
        w32 = weight[v0:v0 + UPCAST_TILE_ROWS].to(out.dtype)
        torch.mm(h32, w32.t(), out=out[:, v0:v0 + w32.shape[0]])


def _grad_gemms(grad: torch.Tensor, h_c: torch.Tensor, weight: torch.Tensor,
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
        with _nvtx("afrl.logits_gemm", on_cuda):
            _logits_gemm(h_c, weight, logits)
        with _nvtx("afrl.vocab_pass", on_cuda):
            row_loss, lp, ent, clipped, k3 = vocab_pass(logits, *rows.chunk(targets, r0, r1), beta, eps_low, eps_high,
                                                        inv_temp, with_grad)
        logp[r0:r1], entropy[r0:r1] = lp, ent
        loss += row_loss.sum(dtype=torch.float64)
        # Backends may leave clipped/k3 set on SFT or ignored rows; the metrics are over valid RL rows.
        rl_valid = (targets[r0:r1] != IGNORE_INDEX) & ~rows.is_sft[r0:r1]
        n_clipped += (clipped & rl_valid).sum()
        kl_sum += torch.where(rl_valid, k3, torch.zeros_like(k3)).sum(dtype=torch.float64)
        if with_grad:
            with _nvtx("afrl.grad_gemms", on_cuda):
                _grad_gemms(logits, h_c, weight, None if dh is None else dh[r0:r1], dw)
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
        return (*_hand_over_grads(ctx, grad_loss, "fused_loss"), None, None, None, None, None, None, None, None)


def _hand_over_grads(ctx, grad_loss, who):
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


# ----------------------------------------------------------------------------------------------
# Public API


def _check_row_tensor(name, t, n, dev, kind):
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


def _check_number(name, value, *, positive=False) -> float:
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


def _check_hyper(temperature, beta, eps_low, eps_high):
    """Scalars every backend must see the same: a NaN or negative ε/β used to give NaN on one
    backend, an error on another and a finite loss on the third."""
    _check_number("temperature", temperature, positive=True)
    for name, value in (("beta", beta), ("eps_low", eps_low), ("eps_high", eps_high)):
        _check_number(name, value)


def _check_head(hidden, weight, h_name="hidden", w_name="weight"):
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


def _check_chunk_rows(chunk_rows):
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or int(chunk_rows) != chunk_rows or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows}")


def _check_targets_range(targets, vocab_size):
    bad = (targets >= vocab_size) | ((targets < 0) & (targets != IGNORE_INDEX))
    if targets.numel() and bool(bad.any()):
        raise ValueError(f"targets must be in [0, {vocab_size}) or {IGNORE_INDEX} (ignored); "
                         f"found {targets[bad][0].item()}")


def _check_inputs(hidden, weight, targets, is_sft, advantages, old_logp, ref_logp, scale,
                  temperature, beta, eps_low, eps_high, chunk_rows):
    _check_head(hidden, weight)
    n, dev = hidden.shape[0], hidden.device
    _check_row_tensor("targets", targets, n, dev, "int")
    _check_row_tensor("is_sft", is_sft, n, dev, "bool")
    for name, t in (("advantages", advantages), ("scale", scale)):
        _check_row_tensor(name, t, n, dev, "float")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None:
            _check_row_tensor(name, t, n, dev, "float")
    _check_hyper(temperature, beta, eps_low, eps_high)
    _check_chunk_rows(chunk_rows)
    _check_targets_range(targets, weight.shape[0])


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
        with _nvtx("afrl.teacher_gemm", on_cuda):
            _logits_gemm(t_hidden[r0:r1], t_weight, zt)
        with _nvtx("afrl.logits_gemm", on_cuda):
            _logits_gemm(h_c, s_weight, zs)
        with _nvtx("afrl.distill_pass", on_cuda):
            div, row_ce = distill_pass(zs, zt, targets[r0:r1], coef[r0:r1], ce_coef, kind, beta, inv_temp, with_grad)
        per_row[r0:r1], ce[r0:r1] = div, row_ce
        # coef is 0 on ignored rows, where div is 0 too; a NaN D of a kept row keeps the loss NaN
        loss += (coef[r0:r1].to(torch.float64) * div.to(torch.float64)).sum()
        if ce_coef:
            loss += ce_coef * row_ce.sum(dtype=torch.float64)
        if with_grad:
            with _nvtx("afrl.grad_gemms", on_cuda):
                _grad_gemms(zs, h_c, s_weight, None if dh is None else dh[r0:r1], dw)
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
        return (*_hand_over_grads(ctx, grad_loss, "fused_distill_loss"), *([None] * 10))


def _check_distill_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, targets, kind, jsd_beta,
                          temperature, row_weight, hard_label_weight, denominator, chunk_rows):
    """Validate everything; returns (beta, inv_temp, hard_label_weight, denominator or None) as floats."""
    _check_head(student_hidden, student_weight, "student_hidden", "student_weight")
    _check_head(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight")
    n, dev = student_hidden.shape[0], student_hidden.device
    if teacher_hidden.shape[0] != n:
        raise ValueError(f"teacher_hidden must have one row per student_hidden row ({n}), "
                         f"got shape {list(teacher_hidden.shape)}")
    if teacher_hidden.device != dev:
        raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on {dev}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"student_weight {list(student_weight.shape)} and teacher_weight "
                         f"{list(teacher_weight.shape)} must have the same vocabulary size V (dim 0)")
    _check_row_tensor("targets", targets, n, dev, "int")
    if row_weight is not None:
        _check_row_tensor("row_weight", row_weight, n, dev, "float")
        finite = torch.isfinite(row_weight)
        if n and not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            raise ValueError(f"row_weight must be finite; row_weight[{i}] = {row_weight[i].item()}")
    if kind not in DISTILL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, DISTILL_KINDS))}, got {kind!r}")
    beta = 0.0
    if kind == "jsd":
        beta = _check_number("jsd_beta", jsd_beta)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1) for kind='jsd' (β = 0 is forward_kl, β = 1 "
                             f"reverse_kl), got {jsd_beta!r}")
    inv_temp = 1.0 / _check_number("temperature", temperature, positive=True)
    hard = _check_number("hard_label_weight", hard_label_weight)
    den = None if denominator is None else _check_number("denominator", denominator)
    _check_chunk_rows(chunk_rows)
    _check_targets_range(targets, student_weight.shape[0])
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
