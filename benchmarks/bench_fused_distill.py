"""Fused distillation loss, forward+backward, fp32 on CPU: ours vs full logits vs Liger vs the GEMM floor.

Run with `pytest benchmarks/bench_fused_distill.py --benchmark`. Each variant runs in a fresh
subprocess (benchmarks/_fused_distill_worker.py, which reuses _fused_loss_worker's measurement) so
its peak memory is its own; the table shows the median time over the repeats and the peak resident
set above the inputs (VmHWM, reset after the inputs were built, minus the RSS then), and that minus the
student's grads (dh, dW) every variant returns.

The loss: JSD at β = 0.5, τ = 2, plus 0.5 × the hard-label CE (see the worker). Peers: the GEMM
floor (teacher logits + the student's logits, dh and dW GEMMs, our chunks, no distill pass), plain
torch on full logits, and Liger-Kernel's LigerFusedLinearJSDLoss (liger_kernel.chunked_loss, its
torch path, compiled=False) at a chunk of 256 rows, about ours. Liger's LigerFusedLinearJSD is a
Triton kernel and needs CUDA: not measured here. Targets:
≤ 1.25× the floor, faster than Liger, RSS above inputs + grads ≤ 1.5× one chunk of both models' logits.

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): one shape, N=64 Hs=32 Ht=48 V=2,048, one
run, no warm-up, every variant, each still in its own worker process, two processes at a time.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from _quick import choose
from bench_fused_loss import format_table, machine_line, run_variants

WORKER = Path(__file__).with_name("_fused_distill_worker.py")

# (N, H_student, H_teacher, V, repeats, warmup, variants)
SHAPES = choose([
    (512, 1024, 2048, 32_768, 3, 1,
     ["gemm_floor", "ours_auto", "ours_torch", "plain_torch", "liger_chunk256"]),
    (2048, 1024, 2048, 151_936, 2, 0,
     ["gemm_floor", "ours_auto", "ours_torch", "plain_torch", "liger_chunk256"]),
], [
    (64, 32, 48, 2_048, 1, 0, ["gemm_floor", "ours_auto", "ours_torch", "plain_torch", "liger_chunk256"]),
])


@pytest.mark.benchmark
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}_V{s[3]}")
def test_bench_fused_distill(shape, capsys):
    from afrl_fast.loss import default_chunk_rows
    n, hs, ht, v, repeats, warmup, variants = shape
    repeats = int(os.environ.get("AFRL_BENCH_REPEATS", repeats))
    rows = run_variants(variants, n, hs, ht, v, repeats, warmup, worker=WORKER)
    chunk_rows = default_chunk_rows(n, v, n_buffers=2)
    chunk_mib = 2 * chunk_rows * v * 4 / 2**20
    table = format_table(f"N={n} Hs={hs} Ht={ht} V={v}  fp32 fwd+bwd, jsd β=0.5 τ=2 + 0.5·CE  "
                         f"(one chunk of both models' logits: {chunk_rows} rows = {chunk_mib:.0f} MiB)", rows)
    ours = next((r for r in rows if r["variant"] == "ours_auto" and "median_s" in r), None)
    floor = next((r for r in rows if r["variant"] == "gemm_floor" and "median_s" in r), None)
    peer = next((r for r in rows if r["variant"].startswith("liger") and "median_s" in r), None)
    if ours and floor:
        table += (f"\ntargets: ours/floor {ours['median_s'] / floor['median_s']:.2f} (≤ 1.25)"
                  + (f", ours/Liger {ours['median_s'] / peer['median_s']:.2f} (< 1)" if peer else "")
                  + f", RSS above inputs+grads / one chunk {ours['peak_above_grads'] / 2**20 / chunk_mib:.2f} (≤ 1.5)")
    with capsys.disabled():
        print(f"\n{machine_line()}\n{table}\n")
    assert all("error" not in r for r in rows), table
