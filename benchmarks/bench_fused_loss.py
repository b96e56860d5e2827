"""Fused loss, forward+backward, fp32 on CPU: ours vs full logits vs Liger vs the GEMM floor.

Run with `pytest benchmarks/bench_fused_loss.py --benchmark`. Each variant runs in a fresh
subprocess (benchmarks/_fused_loss_worker.py) so its peak memory is its own; the table shows the
median time over a few repeats and the peak resident set above the inputs (the VmHWM high-water
mark, reset once the inputs were built, minus the RSS then), plus that minus the returned grads (dh, dW).

Batch: every row an RL token (the configuration Liger's GRPO loss also expresses), β = 0.001,
ε = 0.2/0.28, per-sequence advantages over sequences of 256 tokens, token-mean ("dapo").
Liger runs with compiled=False at the big shape: torch.compile only covers its per-token loss math
(not its GEMMs) and costs ~40 s of compile per process here; the small shape shows both.

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): one shape, N=256 (one sequence, which
Liger's [B, 256] view needs) H=32 V=2,048, one run, no warm-up, every variant but liger_compiled
(its ~40 s compile), each still in its own worker process, two processes at a time.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _quick import QUICK, choose, quick_note

WORKER = Path(__file__).with_name("_fused_loss_worker.py")
ROOT = Path(__file__).resolve().parents[1]

# (N, H, V, repeats, warmup, variants)
SHAPES = choose([
    (512, 1024, 32_768, 3, 1,
     ["gemm_floor", "ours_auto", "ours_torch", "plain_torch", "liger", "liger_compiled"]),
    (2048, 1024, 151_936, 2, 0,
     ["gemm_floor", "ours_auto", "ours_torch", "plain_torch", "liger"]),
], [
    (256, 32, 2_048, 1, 0, ["gemm_floor", "ours_auto", "ours_torch", "plain_torch", "liger"]),
])


def run_variant(name, *args, worker=WORKER):
    """One variant in a fresh process (its own peak RSS); the worker prints one JSON line."""
    cmd = [sys.executable, str(worker), name, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        return dict(variant=name, error=proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_variants(names, *args, worker=WORKER):
    """Every variant, each in its own process (run_variant), one after the other; in quick mode two at
    a time, since there only the wall time of the run matters, not the numbers."""
    if not QUICK:
        return [run_variant(name, *args, worker=worker) for name in names]
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda name: run_variant(name, *args, worker=worker), names))


def format_table(head, rows):
    """`head`, then one line per variant: median time, × the gemm_floor row, peak RSS above inputs and
    above inputs + grads, every run's time."""
    floor = next((r["median_s"] for r in rows if r.get("variant") == "gemm_floor" and "median_s" in r), None)
    lines = [head, f"{'variant':<22}{'median s':>10}{'x floor':>9}{'RSS MiB':>10}{'- grads':>9}  runs"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<22}  error: {r['error']}")
            continue
        label = r["variant"] + (f" (={r['resolved']})" if "resolved" in r else "")
        ratio = f"{r['median_s'] / floor:.2f}" if floor else "-"
        runs = " ".join(f"{t:.2f}" for t in r["times"])
        lines.append(f"{label:<22}{r['median_s']:>10.2f}{ratio:>9}{r['peak_above_inputs'] / 2**20:>10.0f}"
                     f"{r['peak_above_grads'] / 2**20:>9.0f}  {runs}")
    return "\n".join(lines)


def machine_line():
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{datetime.date.today()}  cpus={os.cpu_count()}  load(1m)={load:.1f}{quick_note()}"


@pytest.mark.benchmark
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}_V{s[2]}")
def test_bench_fused_loss(shape, capsys):
    n, h, v, repeats, warmup, variants = shape
    repeats = int(os.environ.get("AFRL_BENCH_REPEATS", repeats))
    rows = run_variants(variants, n, h, v, repeats, warmup)
    from afrl_fast.loss import default_chunk_rows
    chunk_mib = default_chunk_rows(n, v) * v * 4 / 2**20
    table = format_table(f"N={n} H={h} V={v}  fp32 fwd+bwd  (one chunk of logits = {chunk_mib:.0f} MiB)", rows)
    with capsys.disabled():
        print(f"\n{machine_line()}\n{table}\n")
    assert all("error" not in r for r in rows if r["variant"] != "liger_compiled"), table
