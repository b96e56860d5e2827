"""The vocabulary pass alone (the per-chunk kernel of the fused loss): native vs torch vs the floor.

Run with `pytest benchmarks/bench_vocab_pass.py --benchmark`. One chunk of fp32 logits at Qwen's
vocabulary — the chunk the fused loss uses (≤ 256 MiB: 441 rows × 151,936) — in training mode: one
sweep for the online log-sum-exp / entropy, the per-row RL/SFT terms, and a second sweep that writes
dLoss/dlogits over the logits in place. The floor is the memory traffic that any such kernel needs:
one read sweep (a row max) plus one read-write sweep (an in-place scale) of the same chunk. Triton is
listed only where CUDA is present (the interpreter is far too slow for this shape).

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): V = 4,096, 32 rows, 2 repeats.
"""
from __future__ import annotations

import datetime
import os
import statistics
import time

import pytest
import torch

from afrl_fast.backends import resolve_backend
from afrl_fast.loss import default_chunk_rows

from _quick import choose, quick_note

V = choose(151_936, 4_096)
REPEATS = choose(5, 2)
QUICK_ROWS = 32


def make_chunk(rows: int, device):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(rows, V, generator=g) * 2).to(device)
    targets = torch.randint(0, V, (rows,), generator=g).to(device)
    is_sft = (torch.arange(rows) % 4 == 0).to(device)
    adv = torch.randn(rows, generator=g).to(device)
    old = (-torch.rand(rows, generator=g) * 5 - 9).to(device)
    ref = (old + 0.01 * torch.randn(rows, generator=g)).to(device)
    scale = torch.full((rows,), 1.0 / rows, device=device)
    return logits, (targets, is_sft, adv, old, ref, scale)


def timed(fn, base, device) -> list[float]:
    times = []
    for _ in range(REPEATS):
        x = base.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


@pytest.mark.benchmark
def test_bench_vocab_pass(capsys):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = choose(default_chunk_rows(10_000, V), QUICK_ROWS)
    base, per_row = make_chunk(rows, device)
    variants = {"floor (read + read-write sweep)": lambda x: (x.amax(dim=1), x.mul_(0.5))}
    names = ["native", "torch"] if device.type == "cpu" else ["triton", "torch"]
    for name in names:
        resolved, fn = resolve_backend(name, device)
        variants[f"ours ({resolved})"] = lambda x, fn=fn: fn(x, *per_row, 0.001, 0.2, 0.28, 1.0, True)
    results = {k: statistics.median(timed(f, base, device)) for k, f in variants.items()}
    floor = results["floor (read + read-write sweep)"]
    chunk_bytes = base.numel() * base.element_size()
    lines = [f"{datetime.date.today()}  {device}  threads={torch.get_num_threads()}  "
             f"load(1m)={os.getloadavg()[0]:.1f}{quick_note()}",
             f"vocab pass, training mode: {rows} rows x V={V} fp32 = {chunk_bytes / 2**20:.0f} MiB, "
             f"median of {REPEATS}",
             f"{'variant':<34}{'ms':>9}{'x floor':>9}{'GB/s (3 sweeps)':>17}"]
    for k, t in results.items():
        lines.append(f"{k:<34}{t * 1e3:>9.1f}{t / floor:>9.2f}{3 * chunk_bytes / t / 1e9:>17.2f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines) + "\n")
    assert all(t > 0 for t in results.values())
