"""Registers / spills / shared memory of every Triton kernel for sm_80 and sm_90.

Run with `pytest benchmarks/ --benchmark -s`. Compiles without a GPU (see kernels/compile_check.py);
the assertions on spills live in tests/test_kernel_compile.py, this only measures and prints.

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): two variants instead of all of them —
the vocab pass's first fp32 training variant and the distill pass's jsd training variant with the
hard label, both at the production vocabulary — still for both targets, through the same
compile_all / format_table in a child interpreter without TRITON_INTERPRET (as run_isolated does).
"""
import json
import os
import subprocess
import sys

import pytest

from _quick import QUICK, quick_note
from afrl_fast_kernels import compile_check as cc

QUICK_CHILD = """
import json, sys
from dataclasses import asdict
from afrl_fast_kernels import compile_check as cc
vocab = next(v for v in cc.vocab_pass_variants(cc.PRODUCTION_VOCAB) if v.label.startswith("fp32 train"))
distill = cc.distill_pass_variants(cc.PRODUCTION_VOCAB, train_with_ce_only=True)[-1]
json.dump([asdict(r) for r in cc.compile_all(variants=[vocab, distill])], sys.stdout)
"""


def quick_records() -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", QUICK_CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"kernel compile check failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return [cc.CompileRecord(**r) for r in json.loads(proc.stdout)]


@pytest.mark.benchmark
def test_kernel_resource_table():
    records = quick_records() if QUICK else cc.run_isolated()["records"]
    print("\nTriton kernels: ptxas -v (regs, spills, stack, static smem), cuobjdump (cubin regs),")
    print(f"Triton metadata (dynamic smem reserved at launch), per kernel variant and target{quick_note()}\n")
    print(cc.format_table(records))
    assert records
