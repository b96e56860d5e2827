"""Registers / spills / shared memory of every Triton kernel for sm_80 and sm_90.

Run with `pytest benchmarks/ --benchmark -s`. Compiles without a GPU (see kernels/compile_check.py);
the assertions on spills live in tests/test_kernel_compile.py, this only measures and prints.
"""
import pytest

from afrl_fast_kernels import compile_check as cc


@pytest.mark.benchmark
def test_kernel_resource_table():
    data = cc.run_isolated()
    print("\nTriton kernels: ptxas -v (regs, spills, stack, static smem), cuobjdump (cubin regs),")
    print("Triton metadata (dynamic smem reserved at launch), per kernel variant and target\n")
    print(cc.format_table(data["records"]))
