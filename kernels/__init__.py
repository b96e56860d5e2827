"""Triton kernels of afrl-fast, installed under the import name `afrl_fast_kernels`.

Each kernel has a float64 torch reference beside it (`reference.py`), a test in tests/ and a
benchmark in benchmarks/ under the same name.
"""
