"""Load test of the scoring service against a naive handler and reason-first generation.

Run: ``pytest benchmarks/bench_serve.py --benchmark`` (about 11 minutes at the default 30 s per point;
AFRL_BENCH_SECONDS sets the seconds per point).

Model: the demo's architecture (configs/demo.yaml: hidden 128, 2 layers, 4 heads, 2 KV heads,
head_dim 32, intermediate 384, tied 151,936-row embedding) with random weights, exported like the
trainer exports a model, prompted with ``--instructions full`` (the whole rulebook: a long shared
prefix). A random model costs exactly what the trained demo model costs per token; set
AFRL_BENCH_MODEL to a trained ``final_model`` folder to measure that instead.

Traffic: the demo's own kind of pairs (synthetic ``industry`` split), one pair per request, from
`clients` closed-loop clients (benchmarks/_serve_load.py: the lean load generator, one keep-alive
connection each, only to 127.0.0.1). One more row sends MULTI pairs per request from 32 / MULTI
clients (a ranker scoring one query's candidates through /v1/score; bench_rerank.py measures
/v1/rerank). Every handler runs in its own process, all started first. Each point is measured in
ROUNDS windows of DURATION / ROUNDS seconds, and in each round the handlers take turns, so load
from other jobs on a shared machine falls on all of them alike. Every handler gets THREADS torch
threads (on a 2-core machine the other core carries the event loop, the tokenizer and the load
generator); the naive handler is also run with 2 threads at 32 clients. At 32 clients ours and the
naive handler are also measured with an httpx load generator, which costs ~20x more CPU per
request than the lean one (see _serve_load.py).

* ours: ``python -m afrl_fast.serve`` with its defaults (max batch 64, max wait 5 ms);
* naive / reason-first: benchmarks/_serve_baselines.py (the same app; see its docstring).

Floors: the HTTP floor is /health under the same clients; the latency floor is one forward over a
single pair's suffix after the cached prefix, in this process with THREADS threads (median over the
pairs). The one-client target compares ours' p50 with 1.5x (the /health p50 + tokenising one pair +
that forward).

Where the time goes. Per pair at 32 clients: the CPU of the handler's process (/proc), split by
the service's own counters into the inference thread, the tokenizer thread and the rest (event
loop: HTTP, validation, JSON, asyncio; and the tokenizer library's own threads), and the load
generator's CPU. At one client: the p50 split into the HTTP round trip (/health p50), tokenising
(the service's mean per call), inference (its mean per batch) and the rest (thread hand-offs,
validation, JSON). In process, without HTTP: tokenising a pair as the service did before
(template rendered, whole ~450-token prompt tokenised) and as it does now (PromptPieces).

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): the same handlers in their own processes
and the same tables, at 0.3 s per point (0.1 s warm-up, one round), 1 and 8 clients (the ranker and
httpx rows at 8), 32 distinct pairs, at most 8 reasoning tokens, and without the naive handler's
2-thread run (the same code with another thread count: one process fewer to start), the in-process
costs measured while the handlers start; AFRL_BENCH_SECONDS still sets the seconds per point.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from _quick import QUICK, choose, quick_note
from _serve_load import Handler, Row, demo_pairs, export_demo_model, fmt, load_average, window

DURATION = float(os.environ.get("AFRL_BENCH_SECONDS", choose("30", "0.3")))
ROUNDS = choose(3, 1)
FLOOR_DURATION = min(DURATION, 10.0)
WARMUP_S = choose(1.0, 0.1)
CLIENTS = choose((1, 8, 32), (1, 8))
TOP = CLIENTS[-1]                # the concurrency of the headline comparison, the ranker row, the 2-thread naive row
THREADS = 1
N_PAIRS = choose(256, 32)
MULTI = 8                        # pairs per request in the ranker-style row
MAX_REASON_TOKENS = choose(None, 8)     # quick mode: reason-first writes at most this many tokens


def median_ms(fn, items) -> float:
    """Median ms of fn(item) over the items, after one warm-up pass."""
    times = []
    for item in list(items) + list(items):
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[len(items):])


def in_process_costs(model_dir, pairs) -> dict:
    """Per-pair costs measured in this process with THREADS threads, no HTTP: tokenising one pair
    the way the service does (PromptPieces) and the way it did before (the template rendered, the
    whole prompt tokenised: PromptEncoder), one forward over a single pair's suffix after the cached
    prefix (the latency floor), ours per pair in batches of half the (at most 64) pairs, 32 in full
    mode, and the naive handler's forward (whole prompt, full-vocab head)."""
    from afrl_fast.prompt_encoding import PromptPieces
    from afrl_fast.scoring import FirstTokenScorer, load_model
    from afrl_fast.format import load_tokenizer, resolve_prompt_settings

    prompt = resolve_prompt_settings(model_dir, None, "full")
    model = load_model(str(model_dir), "auto")
    scorer = FirstTokenScorer(model, load_tokenizer(model_dir), prompt.rulebook, instructions=prompt.instructions,
                              progress=False, batch_size=32)
    pieces = PromptPieces(scorer)
    assert pieces.ok
    ids = scorer.prompt_ids(*zip(*pairs[:64]))
    suffixes = [row[len(scorer.prefix):] for row in ids]
    half = len(ids) // 2
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.inference_mode():
            return {"tokenize": median_ms(lambda p: pieces.prompt_ids([p[0]], [p[1]]), pairs[:64]),
                    "tokenize_whole": median_ms(lambda p: scorer.prompt_ids([p[0]], [p[1]]), pairs[:64]),
                    "suffix": median_ms(lambda s: scorer.suffix_label_logits([s]), suffixes),
                    "batched": median_ms(scorer.score_token_ids, [ids[:half], ids[half:]]) / half,
                    "naive": median_ms(lambda row: torch.softmax(model(input_ids=torch.tensor([row]), logits_to_keep=1)
                                                                 .logits[0, -1].double(), -1), ids[:half]),
                    "suffix_len": statistics.median(map(len, suffixes)), "prefix_len": len(scorer.prefix),
                    "prompt_len": statistics.median(map(len, ids)), "batch": half}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.benchmark
def test_bench_serve(tmp_path, capsys):
    from afrl_fast.format import load_tokenizer

    trained = os.environ.get("AFRL_BENCH_MODEL")
    model_dir = Path(trained) if trained else export_demo_model(tmp_path / "demo_arch_random")
    pairs, traces = demo_pairs(N_PAIRS)
    tokenizer = load_tokenizer(model_dir)
    reason_tokens = int(statistics.median(len(tokenizer.encode(t, add_special_tokens=False)) for t in traces))
    if MAX_REASON_TOKENS is not None:
        reason_tokens = min(reason_tokens, MAX_REASON_TOKENS)
    bodies = [json.dumps({"pairs": [{"query": q, "document": d}]}).encode() for q, d in pairs]
    # a ranker scoring one query's candidates sends them together
    multi = [json.dumps({"pairs": [{"query": q, "document": d} for q, d in pairs[i:i + MULTI]]}).encode()
             for i in range(0, len(pairs), MULTI)]
    # measured while nothing else of ours runs; in quick mode while the handlers start (saves their start-up)
    costs = None if QUICK else in_process_costs(model_dir, pairs)

    py, model = sys.executable, ["--model", str(model_dir), "--instructions", "full"]
    baseline = [py, "benchmarks/_serve_baselines.py"]
    commands = {
        "ours": [py, "-m", "afrl_fast.serve", *model, "--threads", str(THREADS)],
        "naive": [*baseline, "naive", *model, "--threads", str(THREADS)],
        f"reason-first ({reason_tokens} tok)": [*baseline, "reason-first", *model, "--threads", str(THREADS),
                                                "--reason-tokens", str(reason_tokens)],
        "naive, 2 threads": [*baseline, "naive", *model, "--threads", "2"],
    }
    if QUICK:                    # the naive handler's code runs above; one process fewer to start
        del commands["naive, 2 threads"]
    handlers = {}
    rows: dict[tuple[str, int], Row] = {}
    started = time.strftime("%Y-%m-%d %H:%M")
    loads = [load_average()]
    try:
        for i, (name, cmd) in enumerate(commands.items()):
            handlers[name] = Handler(name, cmd, tmp_path / f"handler{i}.log")
        if costs is None:
            costs = in_process_costs(model_dir, pairs)
        for h in handlers.values():
            h.wait_ready()
        ours, naive = handlers["ours"], handlers["naive"]
        seconds = DURATION / ROUNDS
        for c in CLIENTS:
            for rnd in range(ROUNDS):
                warmup = WARMUP_S if rnd == 0 else 0.0
                window(ours, "/health", None, c, min(seconds, FLOOR_DURATION / ROUNDS),
                       rows.setdefault(("HTTP floor (/health)", c), Row()), warmup=warmup, metrics=False)
                if c == TOP:
                    window(ours, "/v1/score", multi, TOP // MULTI, seconds,
                           rows.setdefault((f"ours, {MULTI} pairs/request", TOP // MULTI), Row(MULTI)), warmup=warmup)
                for name, h in handlers.items():
                    if name == "naive, 2 threads" and c != TOP:
                        continue
                    if name.startswith("reason-first"):
                        # seconds per request: one window of the whole duration (with several, each
                        # would wait for its last requests), in the last round
                        if rnd == ROUNDS - 1:
                            window(h, "/v1/score", bodies, c, DURATION, rows.setdefault((name, c), Row()), warmup=0.0)
                        continue
                    window(h, "/v1/score", bodies, c, seconds, rows.setdefault((name, c), Row()), warmup=warmup)
                if c == TOP:
                    for name, h in (("ours", ours), ("naive", naive)):
                        window(h, "/v1/score", bodies, c, seconds, rows.setdefault((f"{name}, httpx client", c), Row()),
                               warmup=warmup, client="httpx")
            loads.append(load_average())
    finally:
        for h in handlers.values():
            h.stop()

    print_tables(rows, costs, trained, started, loads, capsys)
    assert all(r.errors == 0 for r in rows.values())


def print_tables(rows, costs, trained, started, loads, capsys):
    floor_ms = costs["suffix"]
    lines = [f"scoring service, {started}, {os.cpu_count()} CPU cores, load average (1/5/15 min) at the start and "
             f"after each concurrency: {', '.join(loads)}; torch {torch.__version__}, {THREADS} torch thread(s) per "
             f"handler; model: {'trained ' + trained if trained else 'demo architecture, random weights'}; "
             f"--instructions full: shared prefix {costs['prefix_len']} tokens, prompt median {costs['prompt_len']:.0f}, "
             f"pair suffix median {costs['suffix_len']:.0f} tokens; one pair per request; {DURATION:g} s per point in "
             f"{ROUNDS} round(s), handlers taking turns ({min(DURATION, FLOOR_DURATION):g} s for /health); "
             f"lean load generator unless stated{quick_note()}",
             f"{'handler':<28}{'clients':>8}{'pairs/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"
             f"{'batch':>7}{'server CPU ms/pair':>20}{'client CPU ms/pair':>20}"]
    order = ["HTTP floor (/health)", f"ours, {MULTI} pairs/request", "ours", "naive", "naive, 2 threads"]
    rank = lambda key: (key[1] if not key[0].startswith(f"ours, {MULTI}") else TOP,
                        order.index(key[0]) if key[0] in order else len(order) + ("httpx" in key[0]))
    for (name, c), r in sorted(rows.items(), key=lambda item: rank(item[0])):
        batch = fmt(r.mean_batch, 7, 1) if name.startswith("ours") else " " * 7
        lines.append(f"{name:<28}{c:>8}{r.pairs_s:>10.1f}{fmt(r.pct(50))}{fmt(r.pct(95))}{fmt(r.pct(99))}"
                     f"{r.errors:>8}{batch}{fmt(r.per_pair_ms(r.server_cpu), 20, 3)}{fmt(r.per_pair_ms(r.client_cpu), 20, 3)}")
    lines.append(f"(batch: mean pairs per inference batch; the {MULTI} pairs/request row: {TOP // MULTI} clients, so "
                 f"{TOP} pairs in flight as with {TOP} one-pair clients, latency per request; CPU ms/pair: the "
                 f"handler's process and the load generator, per pair answered in the windows)")

    lines.append(f"\nwhere each pair's CPU goes at {TOP} clients (ms per pair; the service's counters include "
                 f"its warm-up and drain requests)")
    lines.append(f"{'handler':<28}{'inference':>11}{'tokenizer':>11}{'rest':>9}{'server':>9}{'load gen':>10}"
                 f"{'total':>9}")
    for name in ("ours", "naive", "ours, httpx client", "naive, httpx client"):
        r = rows.get((name, TOP))
        if r is None:
            continue
        inf, tok = r.per_pair_ms(r.counters["inference_cpu"]), r.per_pair_ms(r.counters["tokenizer_cpu"])
        server, client = r.per_pair_ms(r.server_cpu), r.per_pair_ms(r.client_cpu)
        lines.append(f"{name:<28}{fmt(inf, 11, 3)}{fmt(tok, 11, 3)}{fmt(server - inf - tok, 9, 3)}"
                     f"{fmt(server, 9, 3)}{fmt(client, 10, 3)}{fmt(server + client, 9, 3)}")
    lines.append("(rest: the event loop (HTTP, validation, JSON, asyncio) and the tokenizer library's own threads)")

    one, health = rows[("ours", 1)], rows[("HTTP floor (/health)", 1)]
    tok_ms = one.counters["tokenize_seconds"] / one.counters["tokenize_calls"] * 1e3 \
        if one.counters["tokenize_calls"] else float("nan")
    inf_ms = one.counters["batch_seconds"] / one.counters["batches"] * 1e3 if one.counters["batches"] else float("nan")
    p50 = one.pct(50)
    lines.append(f"\nours at 1 client, p50 {p50:.2f} ms = HTTP round trip (/health p50) {health.pct(50):.2f} + "
                 f"tokenising (mean per call, in the service) {tok_ms:.2f} + inference (mean per batch) {inf_ms:.2f} "
                 f"+ the rest (thread hand-offs, validation, JSON) {p50 - health.pct(50) - tok_ms - inf_ms:.2f}")
    lines.append(f"in process, no HTTP, per pair: tokenising {costs['tokenize']:.3f} ms (before: the template rendered "
                 f"and the whole prompt tokenised, {costs['tokenize_whole']:.3f} ms); one forward over a single pair's "
                 f"suffix after the cached prefix {floor_ms:.2f} ms; ours in batches of {costs['batch']} "
                 f"{costs['batched']:.2f} ms; naive forward {costs['naive']:.2f} ms ({costs['naive'] / costs['batched']:.1f}x ours)")

    lines.append("")
    for label, suffix in (("lean load generator", ""), ("httpx load generator", ", httpx client")):
        if (f"ours{suffix}", TOP) not in rows:
            continue
        ours = rows[(f"ours{suffix}", TOP)].pairs_s
        naive_names = ("naive", "naive, 2 threads") if not suffix else ("naive, httpx client",)
        best = max(rows[(n, TOP)].pairs_s for n in naive_names if (n, TOP) in rows)
        speedup = ours / max(best, 1e-9)
        lines.append(f"ours at {TOP} clients, {label}: {ours:.1f} pairs/s = {speedup:.1f}x the naive handler's best "
                     f"{best:.1f} (target >= 10x: {'met' if speedup >= 10 else 'NOT met'})")
    budget = health.pct(50) + costs["tokenize"] + floor_ms
    lines.append(f"ours at 1 client: p50 {p50:.2f} ms vs 1.5 x (/health p50 {health.pct(50):.2f} + tokenising "
                 f"{costs['tokenize']:.2f} + suffix forward {floor_ms:.2f}) = {1.5 * budget:.2f} ms "
                 f"({p50 / budget:.2f}x; target <= 1.5x: {'met' if p50 <= 1.5 * budget else 'NOT met'})")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
