"""Benchmarks cannot rot: every benchmark in benchmarks/ still runs end to end, in quick mode.

`AFRL_BENCH_QUICK=1 python -m pytest benchmarks/ --benchmark` (benchmarks/_quick.py) runs each
benchmark's own code path — its subprocesses, servers, trainer runs and table — at tiny shapes, for
about 90 s of CPU time (1.5-3 min of wall time on a shared 2-core machine). This test runs exactly
that in a child pytest and fails if any benchmark fails, errors, or is skipped other than the
documented GPU-only one, or if a bench_*.py file contributes no passing benchmark at all (EXCLUDED
below lists what the child run leaves out, and why). Times are never asserted.

It is a long end-to-end test, so it is in the slow tier (`python -m pytest -q --tier slow`, which
.ci/run runs).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# Benchmarks that may skip here, by file: they need hardware or software this machine lacks.
GPU_ONLY = {
    "bench_sglang_smoke.py": "a CUDA GPU, SGLang and AFRL_SGLANG_MODEL (a minutes-long smoke test on one H100)",
}
# Benchmarks left out of the child run (deselected with -k), by file, and why.
EXCLUDED: dict[str, str] = {}   # file -> why the child run leaves it out (none: every benchmark runs)
TIMEOUT_S = 1800


def summary_counts(output: str) -> dict[str, int]:
    """{"passed": n, "skipped": n, "failed": n, "error": n, ...} from pytest's final summary line,
    e.g. "10 passed, 1 skipped, 1 deselected in 61.02s (0:01:01)"."""
    lines = [line.strip("= ") for line in output.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    match = re.match(r"^(.*?) in [\d.]+s\b", last)
    assert match, f"no pytest summary line at the end of the output:\n{output[-3000:]}"
    counts: dict[str, int] = {}
    for n, word in re.findall(r"(\d+) (\w+)", match.group(1)):
        word = {"errors": "error", "warning": "warnings"}.get(word, word)
        counts[word] = counts.get(word, 0) + int(n)
    return counts


def quick_run_problems(returncode: int, stdout: str, files: list[str]) -> list[str]:
    """What is wrong with a child `pytest benchmarks/ --benchmark -q -rA` run over the bench_*.py
    `files` (empty: nothing). Fails: a non-zero exit, failures or errors, a skip outside GPU_ONLY,
    fewer passes than items minus the GPU-only ones, a benchmark file without a passing benchmark."""
    problems = []
    if returncode != 0:
        problems.append(f"exit code {returncode}")
    counts = summary_counts(stdout)
    if counts.get("failed", 0) or counts.get("error", 0):
        problems.append(f"{counts.get('failed', 0)} failed, {counts.get('error', 0)} errors")
    # Only the GPU-only benchmarks may skip (one test item each); anything else skipped is rot hiding.
    skipped = re.findall(r"^SKIPPED \[\d+\] benchmarks/(bench_\w+\.py)", stdout, re.M)
    if not set(skipped) <= set(GPU_ONLY):
        problems.append(f"skipped outside the GPU-only list: {sorted(set(skipped) - set(GPU_ONLY))}")
    items = sum(n for word, n in counts.items() if word not in ("deselected", "warnings"))
    if counts.get("passed", 0) < items - len(GPU_ONLY):
        problems.append(f"{counts.get('passed', 0)} passed of {items} benchmarks ({len(GPU_ONLY)} may skip)")
    passed_files = set(re.findall(r"^PASSED benchmarks/(bench_\w+\.py)::", stdout, re.M))
    missing = set(files) - set(GPU_ONLY) - set(EXCLUDED) - passed_files
    if missing:
        problems.append(f"no passing benchmark in {sorted(missing)}")
    return problems


def test_summary_counts_parses_pytest_summary_lines():
    out = "...\n=== 10 passed, 1 skipped, 1 deselected, 2 warnings in 61.02s (0:01:01) ===\n"
    assert summary_counts(out) == {"passed": 10, "skipped": 1, "deselected": 1, "warnings": 2}
    assert summary_counts("1 failed, 3 passed, 2 errors in 3.10s\n") == {"failed": 1, "passed": 3, "error": 2}
    with pytest.raises(AssertionError):
        summary_counts("Interrupted: 1 error during collection\n")


def test_quick_run_problems_catches_failures_errors_and_silent_skips():
    files = ["bench_a.py", "bench_b.py", "bench_sglang_smoke.py"]
    ok = ("PASSED benchmarks/bench_a.py::test_a[x]\nPASSED benchmarks/bench_a.py::test_a[y]\n"
          "PASSED benchmarks/bench_b.py::test_b\n"
          "SKIPPED [1] benchmarks/bench_sglang_smoke.py:30: needs a CUDA GPU\n"
          "3 passed, 1 skipped, 1 deselected in 60.00s (0:01:00)\n")
    assert quick_run_problems(0, ok, files) == []
    # the GPU-only benchmark may also run and pass (on a GPU machine)
    gpu = ok.replace("SKIPPED [1] benchmarks/bench_sglang_smoke.py:30: needs a CUDA GPU",
                     "PASSED benchmarks/bench_sglang_smoke.py::test_s").replace("3 passed, 1 skipped", "4 passed")
    assert quick_run_problems(0, gpu, files) == []
    failed = ok.replace("PASSED benchmarks/bench_b.py::test_b", "FAILED benchmarks/bench_b.py::test_b - boom")
    failed = failed.replace("3 passed,", "1 failed, 2 passed,")
    assert len(quick_run_problems(1, failed, files)) == 4     # exit code, the failure, too few passes, bench_b
    errored = ok.replace("3 passed,", "3 passed, 1 error,")
    assert quick_run_problems(1, errored, files)
    silently = ok.replace("PASSED benchmarks/bench_b.py::test_b",
                          "SKIPPED [1] benchmarks/bench_b.py:9: no model").replace("3 passed, 1 skipped",
                                                                                  "2 passed, 2 skipped")
    assert len(quick_run_problems(0, silently, files)) == 3   # a foreign skip, too few passes, bench_b
    gone = ok.replace("PASSED benchmarks/bench_b.py::test_b\n", "").replace("3 passed", "2 passed")
    assert quick_run_problems(0, gone, files) == ["no passing benchmark in ['bench_b.py']"]


@pytest.mark.slow
def test_every_benchmark_runs_in_quick_mode():
    files = sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))
    assert set(GPU_ONLY) | set(EXCLUDED) <= set(files), "a documented exception names a benchmark that is gone"
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "--benchmark", "-q", "-p", "no:cacheprovider", "-rA"]
    if EXCLUDED:
        cmd += ["-k", " and ".join(f"not {Path(name).stem}" for name in EXCLUDED)]
    env = {**os.environ, "AFRL_BENCH_QUICK": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    problems = quick_run_problems(proc.returncode, proc.stdout, files)
    assert not problems, "; ".join(problems) + "\n" + (proc.stdout + proc.stderr)[-8000:]
