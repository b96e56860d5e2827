"""Verifier throughput: the numba batch pass vs the plain-Python regex reference.

    pytest benchmarks/bench_verify.py --benchmark

~100k realistic responses (mostly valid AFRL traces with sentence-length reasons, some malformed)
in one Arrow string array. Rows: the reference (tests/reference_verifier.py), the compiled
verifier warm (best of several runs; compile time reported separately, cold and from the cache),
and a floor: a numba pass with the same per-response parallel loop that only counts newlines over
the same bytes, i.e. what reading the memory costs. "from a list of str" adds the conversion of
Python strings to one Arrow array (the path of a trainer holding decoded texts).

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): 2,000 responses, best of 2 (the
reference: 1); the compile times are still measured, each in a fresh process.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pytest
from numba import njit, prange

from afrl_fast.format import render_trace
from afrl_fast.rulebook import load_rulebook
from afrl_fast.verify import RewardConfig, arrow_string_views, verify_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reference_verifier import verify_all  # noqa: E402

from _quick import choose, quick_note  # noqa: E402

N_RESPONSES = choose(100_000, 2_000)
REPEATS_FAST, REPEATS_LIST, REPEATS_REF = choose((15, 5, 2), (2, 2, 1))
WORDS = ("the query asks for recent results about the product and the document covers its release "
         "schedule pricing history and several user reviews from independent sources 北京 東京 😀").split()


@njit(parallel=True, cache=True)
def count_newlines(data, offsets, out):
    """The floor: touch every byte once with the same parallel loop shape as the verifier."""
    for i in prange(out.shape[0]):
        n = 0
        for p in range(offsets[i], offsets[i + 1]):
            if data[p] == 10:
                n += 1
        out[i] = n


def realistic_responses(n, seed=0):
    rng = random.Random(seed)
    rb = load_rulebook()
    texts, labels = [], []
    for _ in range(n):
        values = {s.key: rng.choice(s.values) for s in rb.critical}
        label = rb.expected_label(values) if rng.random() < 0.8 else rng.randrange(5)
        reasons = {k: " ".join(rng.choices(WORDS, k=rng.randrange(8, 25))) for k in range(1, 10)}
        text = render_trace(rb, label, values, reasons=reasons)
        roll = rng.random()
        if roll < 0.05:
            text = text[:rng.randrange(len(text))]                     # cut off by max tokens
        elif roll < 0.08:
            text = text.replace("\\boxed{", "\\boxed{{", 1)           # broken box
        elif roll < 0.10:
            text = text + " and some trailing chatter"
        texts.append(text)
        labels.append(label if rng.random() < 0.7 else rng.randrange(5))
    return pa.array(texts, type=pa.string()), np.array(labels, dtype=np.int64)


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def compile_seconds() -> tuple[float, float]:
    """(cold compile, load from numba's cache) of the verifier, each in a fresh process."""
    code = ("import time; from afrl_fast.verify import verify_batch; t=time.perf_counter(); "
            "verify_batch(['0'], [0]); print(time.perf_counter()-t)")
    out = []
    with tempfile.TemporaryDirectory(prefix="afrl_bench_numba_cold_") as cold_dir:   # empty: a cold compile
        for cache_dir in (cold_dir, None):
            env = dict(os.environ)
            if cache_dir:
                env["NUMBA_CACHE_DIR"] = cache_dir
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out.append(float(res.stdout.strip().splitlines()[-1]))
    return out[0], out[1]


@pytest.mark.benchmark
def test_bench_verify(capsys):
    responses, labels = realistic_responses(N_RESPONSES)
    data, offsets, _ = arrow_string_views(responses)
    n_bytes = int(offsets[-1] - offsets[0])
    config = RewardConfig()

    verify_batch(responses[:10], labels[:10], config=config)            # warm (compile or cache load)
    # best of many: the machine is shared, the minimum is the least disturbed run
    t_numba = best_of(lambda: verify_batch(responses, labels, config=config), REPEATS_FAST)
    counts = np.zeros(len(responses), np.int64)
    count_newlines(data, offsets, counts)
    t_floor = best_of(lambda: count_newlines(data, offsets, counts), REPEATS_FAST)

    texts = responses.to_pylist()
    t_list = best_of(lambda: verify_batch(texts, labels, config=config), REPEATS_LIST)
    rb = load_rulebook()
    t_ref = best_of(lambda: verify_all(texts, labels, rb), REPEATS_REF)
    cold, cached = compile_seconds()

    res = verify_batch(responses, labels, config=config)
    rows = [("python regex reference", t_ref), ("numba verifier (warm)", t_numba),
            ("numba, from a list of str", t_list), ("floor: numba newline count", t_floor)]
    lines = [f"verifier benchmark: {len(responses):,} responses, {n_bytes / 1e6:.1f} MB, "
             f"{numba.get_num_threads()} numba threads, format pass {res.fmt.mean():.3f}, "
             f"mean reward {res.reward.mean():.3f}{quick_note()}",
             f"{'pass':<28}{'seconds':>10}{'responses/s':>14}{'MB/s':>10}{'vs reference':>14}"]
    for name, t in rows:
        lines.append(f"{name:<28}{t:>10.4f}{len(responses) / t:>14,.0f}{n_bytes / 1e6 / t:>10.1f}{t_ref / t:>13.1f}x")
    lines.append(f"numba compile: cold {cold:.1f} s, from cache {cached:.2f} s (first call in a fresh process)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
