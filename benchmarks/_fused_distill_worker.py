"""One fused-distillation benchmark variant in a fresh process: prints one JSON line.

    python benchmarks/_fused_distill_worker.py VARIANT N H_STUDENT H_TEACHER V REPEATS [WARMUP]

Time and memory as in benchmarks/_fused_loss_worker.py (its `measure`): median wall time of
forward+backward, peak resident set above the inputs, and above inputs + the student's grads.

The loss every variant computes: generalized JSD at β = 0.5 and τ = 2 between the teacher's and the
student's softmax, plus 0.5 × the student's hard-label CE at τ = 1, both divided by the number of
rows — Liger's LigerFusedLinearJSDLoss(weight_soft_loss=1, weight_hard_loss=0.5, beta=0.5,
temperature=2) and our fused_distill_loss(kind="jsd", jsd_beta=0.5, temperature=2,
hard_label_weight=0.5).
"""
from __future__ import annotations

import json
import math
import sys

import torch

from _fused_loss_worker import measure

BETA, TAU, HARD = 0.5, 2.0, 0.5


def make_inputs(n, hs, ht, v):
    g = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(n, hs, generator=g).requires_grad_()
    s_weight = torch.randn(v, hs, generator=g).mul_(0.02).requires_grad_()
    t_hidden = torch.randn(n, ht, generator=g)
    t_weight = torch.randn(v, ht, generator=g).mul_(0.02)
    targets = torch.randint(0, v, (n,), generator=g)
    return s_hidden, s_weight, t_hidden, t_weight, targets


def run_ours(backend):
    from afrl_fast.backends import resolve_backend
    from afrl_fast.distill_loss import fused_distill_loss
    resolve_backend(backend, torch.device("cpu"), kernel="distill_pass")   # build/import before timing

    def step(sh, sw, th, tw, targets):
        out = fused_distill_loss(sh, sw, th, tw, targets, kind="jsd", jsd_beta=BETA, temperature=TAU,
                                 hard_label_weight=HARD, backend=backend)
        out.loss.backward()
    return step


def plain_torch(sh, sw, th, tw, targets):
    """Full logits of both models, autograd does the rest: the memory baseline."""
    with torch.no_grad():
        log_p = torch.log_softmax((th @ tw.T) / TAU, dim=-1)
    z = sh @ sw.T
    log_q = torch.log_softmax(z / TAU, dim=-1)
    log_m = torch.logaddexp(log_p + math.log(BETA), log_q + math.log1p(-BETA))
    jsd = BETA * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - BETA) * (log_q.exp() * (log_q - log_m)).sum(-1)
    ce = torch.nn.functional.cross_entropy(z, targets, reduction="none")
    (jsd + HARD * ce).mean().backward()


def liger(chunk_size):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    mod = LigerFusedLinearJSDLoss(weight_hard_loss=HARD, weight_soft_loss=1.0, beta=BETA, temperature=TAU,
                                  compiled=False, chunk_size=chunk_size)

    def step(sh, sw, th, tw, targets):
        mod(sh, sw, th, tw, targets).backward()
    return step


def gemm_floor(sh, sw, th, tw, targets):
    """The four GEMMs of the chunked loop alone (teacher logits, student logits, dh, dW), with the
    same chunks and buffers and no distill pass."""
    from afrl_fast.loss import default_chunk_rows
    n, v = sh.shape[0], sw.shape[0]
    rows = default_chunk_rows(n, v, n_buffers=2)
    with torch.no_grad():
        zs_buf, zt_buf = torch.empty(min(rows, n), v), torch.empty(min(rows, n), v)
        dh = torch.empty_like(sh)
        dw = torch.zeros_like(sw)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            h_c, zs, zt = sh[r0:r1], zs_buf[: r1 - r0], zt_buf[: r1 - r0]
            torch.mm(th[r0:r1], tw.T, out=zt)
            torch.mm(h_c, sw.T, out=zs)
            torch.mm(zs, sw, out=dh[r0:r1])
            dw.addmm_(zs.T, h_c)
    sh.grad, sw.grad = dh, dw


def variant_step(name):
    if name.startswith("ours_"):
        return run_ours(name[len("ours_"):])
    if name.startswith("liger_chunk"):
        return liger(int(name[len("liger_chunk"):]))
    return {"plain_torch": plain_torch, "gemm_floor": gemm_floor}[name]


def main():
    name, n, hs, ht, v, repeats = sys.argv[1], *map(int, sys.argv[2:7])
    warmup = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    step = variant_step(name)
    inputs = make_inputs(n, hs, ht, v)
    extra = {}
    if name == "ours_auto":
        from afrl_fast.loss import resolve_backend
        extra["resolved"] = resolve_backend("auto", torch.device("cpu"), kernel="distill_pass")[0]
    print(json.dumps(measure(name, step, inputs, repeats, warmup, n=n, hs=hs, ht=ht, v=v, **extra)))


if __name__ == "__main__":
    main()
