"""One fused-loss benchmark variant in a fresh process: prints one JSON line. `measure` (time and
peak RSS) is shared with benchmarks/_fused_distill_worker.py.

    python benchmarks/_fused_loss_worker.py VARIANT N H V REPEATS [WARMUP]

Time: median wall time of forward+backward over REPEATS runs (grads cleared between runs).
Memory: peak resident set minus the resident set right after the inputs were built. The peak is the
kernel's high-water mark VmHWM, reset once the inputs exist (/proc/self/clear_refs), so temporaries
of building the inputs do not count (ru_maxrss, the fallback without /proc, cannot be reset); a
fresh process per variant keeps one variant's allocations from hiding another's. `above_grads` also
subtracts the gradients every variant must return (dh, dW).
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch

BETA, EPS_LOW, EPS_HIGH, SEQ_LEN = 0.001, 0.2, 0.28, 256


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                  # resets VmHWM to the current RSS
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def make_inputs(n, h, v):
    """A GRPO batch all variants express: every row RL, per-sequence advantages, token mean."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).mul_(0.02).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    seq_adv = torch.randn(max(n // SEQ_LEN, 1), generator=g)
    adv = seq_adv.repeat_interleave(SEQ_LEN)[:n] if n >= SEQ_LEN else seq_adv.expand(n).clone()
    old = -torch.rand(n, generator=g) * 5 - 9       # ≈ log(1/V): ratios near 1
    ref = old + 0.1 * torch.randn(n, generator=g)
    return hidden, weight, targets, adv.contiguous(), old, ref


def run_ours(backend):
    from afrl_fast.loss import fused_loss, resolve_backend
    resolve_backend(backend, torch.device("cpu"))     # build/import the backend before timing

    def step(hidden, weight, targets, adv, old, ref):
        n = hidden.shape[0]
        out = fused_loss(hidden, weight, targets, is_sft=torch.zeros(n, dtype=torch.bool), advantages=adv,
                         old_logp=old, ref_logp=ref, scale=torch.full((n,), 1.0 / n), beta=BETA,
                         eps_low=EPS_LOW, eps_high=EPS_HIGH, backend=backend)
        out.loss.backward()
    return step


def plain_torch(hidden, weight, targets, adv, old, ref):
    """Full logits, autograd does the rest: the memory baseline."""
    logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    ratio = torch.exp(logp - old)
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * adv)
    delta = ref - logp
    loss = (pg + BETA * (torch.exp(delta) - delta - 1)).mean()
    loss.backward()


def liger(compiled):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    mod = LigerFusedLinearGRPOLoss(beta=BETA, compiled=compiled, use_ref_model=True, chunk_size=1,
                                   epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="dapo")

    def step(hidden, weight, targets, adv, old, ref):
        n, h = hidden.shape
        b = n // SEQ_LEN
        seq_adv = adv.view(b, SEQ_LEN)[:, 0].contiguous()
        loss, _ = mod(hidden.view(b, SEQ_LEN, h), weight, targets.view(b, SEQ_LEN), torch.ones(b, SEQ_LEN),
                      seq_adv, ref_per_token_logps=ref.view(b, SEQ_LEN), old_per_token_logps=old.view(b, SEQ_LEN))
        loss.backward()
    return step


def gemm_floor(hidden, weight, targets, adv, old, ref):
    """The three GEMMs of the chunked loop alone (same chunks, same buffers, no vocab pass)."""
    from afrl_fast.loss import default_chunk_rows
    n, v = hidden.shape[0], weight.shape[0]
    rows = default_chunk_rows(n, v)
    with torch.no_grad():
        buf = torch.empty(min(rows, n), v)
        dh = torch.empty_like(hidden)
        dw = torch.zeros_like(weight)
        for r0 in range(0, n, rows):
            h_c, z = hidden[r0:r0 + rows], buf[: min(rows, n - r0)]
            torch.mm(h_c, weight.T, out=z)
            torch.mm(z, weight, out=dh[r0:r0 + rows])
            dw.addmm_(z.T, h_c)
    hidden.grad, weight.grad = dh, dw


def variant_step(name):
    if name.startswith("ours_"):
        return run_ours(name[len("ours_"):])
    return {"plain_torch": plain_torch, "liger": liger(False), "liger_compiled": liger(True),
            "gemm_floor": gemm_floor}[name]


def measure(name, step, inputs, repeats, warmup, n_grads=2, **extra) -> dict:
    """Median time of `step(*inputs)` over `repeats` runs after `warmup`, and the peak resident set
    above the inputs (and above the grads of the first `n_grads` inputs, which every variant returns)."""
    reset_peak_rss()
    base = current_rss_bytes()
    times = []
    for i in range(warmup + repeats):
        for t in inputs[:n_grads]:
            t.grad = None
        t0 = time.perf_counter()
        step(*inputs)
        if i >= warmup:                                  # warmup: compile/caches, not timed
            times.append(time.perf_counter() - t0)
    grads = sum(t.grad.numel() * t.grad.element_size() for t in inputs[:n_grads] if t.grad is not None)
    peak = peak_rss_bytes() - base
    return dict(variant=name, times=times, median_s=statistics.median(times), peak_above_inputs=peak,
                peak_above_grads=peak - grads, **extra)


def main():
    name, n, h, v, repeats = sys.argv[1], *map(int, sys.argv[2:6])
    warmup = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    step = variant_step(name)
    inputs = make_inputs(n, h, v)
    extra = {}
    if name == "ours_auto":
        from afrl_fast.loss import resolve_backend
        extra["resolved"] = resolve_backend("auto", torch.device("cpu"))[0]
    print(json.dumps(measure(name, step, inputs, repeats, warmup, n=n, h=h, v=v, **extra)))


if __name__ == "__main__":
    main()
