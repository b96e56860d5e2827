"""The distill pass alone (the per-chunk kernel of the fused distillation loss): native vs torch vs the floor.

Run with `pytest benchmarks/bench_distill_pass.py --benchmark`. One chunk of both models' fp32
logits at Qwen's vocabulary — the chunk fused_distill_loss uses (both buffers ≤ 256 MiB: 218 rows ×
151,936 each) — in training mode at τ = 2 with the hard label on (the most work: the student's
τ = 1 statistics ride along), for each kind. The floor is the memory traffic any such kernel needs:
one read sweep of both chunks (row maxima) plus one sweep that reads the teacher's chunk and
rewrites the student's in place (z_s += z_t). Triton is listed only where CUDA is present (the
interpreter is far too slow for this shape).

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): V = 4,096, 32 rows, the repeats of
bench_vocab_pass's quick mode (2).
"""
from __future__ import annotations

import statistics

import pytest
import torch

from afrl_fast.backends import resolve_backend
from afrl_fast.loss import default_chunk_rows
from afrl_fast_kernels.constants import DISTILL_KINDS

from _quick import choose
from bench_fused_loss import machine_line
from bench_vocab_pass import REPEATS, timed

V = choose(151_936, 4_096)
QUICK_ROWS = 32
TAU, BETA, CE_COEF = 2.0, 0.5, 0.5 / 2048


def make_chunk(rows: int, device):
    g = torch.Generator().manual_seed(0)
    zs = (torch.randn(rows, V, generator=g) * 2).to(device)
    zt = (zs.cpu() + torch.randn(rows, V, generator=g)).to(device)    # a teacher near the student
    targets = torch.randint(0, V, (rows,), generator=g).to(device)
    coef = torch.full((rows,), 1.0 / 2048, device=device)
    return zs, zt, targets, coef


@pytest.mark.benchmark
def test_bench_distill_pass(capsys):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = choose(default_chunk_rows(10_000, V, n_buffers=2), QUICK_ROWS)
    zs, zt, targets, coef = make_chunk(rows, device)
    variants = {"floor (read both + read-write sweep)": lambda x: (x.amax(dim=1), zt.amax(dim=1), x.add_(zt))}
    names = ["native", "torch"] if device.type == "cpu" else ["triton", "torch"]
    for name in names:
        resolved, fn = resolve_backend(name, device, kernel="distill_pass")
        for kind in DISTILL_KINDS:
            variants[f"ours ({resolved}) {kind}"] = (
                lambda x, fn=fn, kind=kind: fn(x, zt, targets, coef, CE_COEF, kind, BETA, 1.0 / TAU, True))
    results = {k: statistics.median(timed(f, zs, device)) for k, f in variants.items()}
    floor = results["floor (read both + read-write sweep)"]
    chunk_bytes = 2 * zs.numel() * zs.element_size()
    lines = [f"{machine_line()}  {device}  threads={torch.get_num_threads()}",
             f"distill pass, training mode, τ={TAU}, hard label on: {rows} rows x V={V} fp32 x 2 models "
             f"= {chunk_bytes / 2**20:.0f} MiB, median of {REPEATS}",
             f"{'variant':<38}{'ms':>9}{'x floor':>9}{'ns/token':>10}"]
    for k, t in results.items():
        lines.append(f"{k:<38}{t * 1e3:>9.1f}{t / floor:>9.2f}{t / zs.numel() * 1e9:>10.2f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines) + "\n")
    assert all(t > 0 for t in results.values())
