"""Triton kernels of afrl-fast and their float64 torch references, installed as `afrl_fast_kernels`.

Each kernel has a float64 torch reference (`reference.py`), a test in tests/ and a benchmark in
benchmarks/ under the same name: `vocab_pass` → tests/test_vocab_pass_triton.py,
benchmarks/bench_vocab_pass.py. The dispatch between these kernels, the native C++ ones (csrc/) and
plain torch lives in `afrl_fast.backends`.

IGNORE_INDEX is defined here, the lowest layer, once for the whole project: a target row with this
value contributes nothing (no loss, zero gradient, zero log-prob and entropy).
"""
IGNORE_INDEX = -100
