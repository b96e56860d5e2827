"""Quick mode of the benchmarks: ``AFRL_BENCH_QUICK=1 pytest benchmarks/ --benchmark``.

In quick mode every benchmark runs its own code path end to end (the same functions, subprocesses,
servers and table) at tiny shapes, with very few iterations and windows of a fraction of a second,
so the whole folder (but bench_vs_trl, see tests/test_benchmarks_quick.py) costs about 90 s of CPU
time, mostly the start-up of its ~20 processes, and a benchmark that no longer starts fails CI
(tests/test_benchmarks_quick.py). Its numbers mean nothing; the tables say so in their header.

A benchmark uses it as

    from _quick import QUICK, choose, quick_note

    N = choose(100_000, 2_000)        # the full size, or the quick one under AFRL_BENCH_QUICK=1

(pytest puts benchmarks/ on sys.path for bench_*.py; a worker script run by path from benchmarks/
has it there too).
"""
from __future__ import annotations

import os

ENV = "AFRL_BENCH_QUICK"
_OFF = ("", "0", "false", "no", "off")


def quick() -> bool:
    """True when AFRL_BENCH_QUICK is set to anything but empty, 0, false, no or off (any case)."""
    return os.environ.get(ENV, "").strip().lower() not in _OFF


QUICK = quick()     # read once, when the benchmark module is imported (module-level sizes use it)


def choose(full, quick_value):
    """`quick_value` in quick mode, else `full`."""
    return quick_value if QUICK else full


def quick_note() -> str:
    """A marker for a table's header line: empty normally, a warning in quick mode."""
    return f"  [QUICK MODE ({ENV}=1): tiny shapes, numbers not meaningful]" if QUICK else ""
