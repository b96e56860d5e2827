"""Rerank: one query and CANDIDATES documents per request, through POST /v1/rerank.

Run: ``pytest benchmarks/bench_rerank.py --benchmark`` (about 6 minutes at the default 30 s per point;
AFRL_BENCH_SECONDS sets the seconds per point).

Handlers (each its own process, --threads 1, the model and prompt of bench_serve.py: the demo
architecture with random weights, ``--instructions full``):

* ours, two-level: ``python -m afrl_fast.serve`` — the system prefix's KV cached at start-up, the
  query's part of the prompt prefilled once per request on top of it, each candidate's document
  part prefilled against that, the candidates batched together;
* ours, one-level: the same with ``--no-query-prefix`` — only the system prefix shared, each
  candidate prefills query and document (the service before the rerank API, as /v1/score does);
* naive: benchmarks/_serve_baselines.py — one candidate at a time, the whole prompt prefilled, the
  full-vocabulary head.

Requests: query i of the demo's synthetic ``industry`` pairs with CANDIDATES documents drawn from the
whole pool (so the documents are the demo's, of every length), ``"return_documents": false``;
closed-loop clients on the lean load generator (benchmarks/_serve_load.py). A point lasts DURATION
seconds in ROUNDS rounds, the handlers taking turns; since a naive rerank takes seconds, every request
sent inside a window counts and the window lasts until its last answer. One more row: ours scoring
the same candidates as independent one-pair /v1/score requests from 32 clients (what a caller without
a rerank API would do), for the cost per candidate.

Columns: requests/s and candidates/s, latency per request, the handler process's CPU per candidate
(/proc), and the share of candidates scored on their query's prefix (the service's
afrl_query_prefix_candidates counter). In process, without HTTP: ms per candidate of a
CANDIDATES-candidate group, two-level (FirstTokenScorer.score_query) vs one-level (score_token_ids),
and the naive forward; the tokens prefilled per candidate either way; and two-level vs one-level for
a long (~50-token) query, where the second level saves more.

Quick mode (AFRL_BENCH_QUICK=1): the same handlers and tables with 12 candidates per request,
4 queries, one round of 0.5 s at one client, the in-process costs measured while the handlers start.
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

DURATION = float(os.environ.get("AFRL_BENCH_SECONDS", choose("30", "0.5")))
ROUNDS = choose(2, 1)
WARMUP_S = choose(1.0, 0.0)
CANDIDATES = choose(100, 12)
N_QUERIES = choose(16, 4)
CLIENTS = choose((1, 4), (1,))
SCORE_CLIENTS = choose(32, 8)
THREADS = 1


def rerank_requests(pairs):
    """[(query, documents)]: query i of the pairs with CANDIDATES documents from the whole pool."""
    queries = list(dict.fromkeys(q for q, _ in pairs))[:N_QUERIES]
    pool = [d for _, d in pairs]
    return [(q, [pool[(i * CANDIDATES + j) % len(pool)] for j in range(CANDIDATES)]) for i, q in enumerate(queries)]


def median_ms(fn, items) -> float:
    times = []
    for item in list(items) + list(items):
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[len(items):])


LONG_QUERY = ("which of these support articles explains how to move a subscription and its saved invoices to "
              "another company account without losing the discount negotiated last year, and what the billing "
              "contact has to confirm before the transfer is allowed to go through on the admin console")


def in_process_costs(model_dir, requests) -> dict:
    """Per candidate, no HTTP, THREADS threads: a whole group scored two-level and one-level (in
    forwards of the service's default rows on a CPU), the naive forward; tokens prefilled per
    candidate; and the same two-level / one-level comparison for a long (~50-token) query."""
    from afrl_fast.prompt_encoding import PromptPieces
    from afrl_fast.scoring import FirstTokenScorer, load_model
    from afrl_fast.format import load_tokenizer, resolve_prompt_settings
    from afrl_fast.serve.backends import forward_rows_default

    prompt = resolve_prompt_settings(model_dir, None, "full")
    model = load_model(str(model_dir), "auto")
    scorer = FirstTokenScorer(model, load_tokenizer(model_dir), prompt.rulebook, instructions=prompt.instructions,
                              progress=False, batch_size=forward_rows_default("cpu", 64))
    pieces = PromptPieces(scorer)
    groups = [(pieces.query_ids([q])[0], pieces.prompt_ids([q] * len(docs), docs)) for q, docs in requests[:2]]
    long = [(pieces.query_ids([LONG_QUERY])[0], pieces.prompt_ids([LONG_QUERY] * len(docs), docs))
            for _, docs in requests[:2]]
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.inference_mode():
            out = {name: median_ms(fn, g) / CANDIDATES for name, fn, g in (
                ("two", lambda g: scorer.score_query(*g), groups), ("one", lambda g: scorer.score_token_ids(g[1]), groups),
                ("long_two", lambda g: scorer.score_query(*g), long),
                ("long_one", lambda g: scorer.score_token_ids(g[1]), long))}
            out["naive"] = median_ms(lambda row: model(input_ids=torch.tensor([row]), logits_to_keep=1),
                                     groups[0][1][:8])
    finally:
        torch.set_num_threads(threads)
    query, ids = groups[0]
    return {**out, "prefix_len": len(scorer.prefix), "query_len": len(query) - len(scorer.prefix),
            "long_query_len": len(long[0][0]) - len(scorer.prefix),
            "two_tokens": statistics.median(len(row) - len(query) for row in ids),
            "one_tokens": statistics.median(len(row) - len(scorer.prefix) for row in ids)}


@pytest.mark.benchmark
def test_bench_rerank(tmp_path, capsys):
    trained = os.environ.get("AFRL_BENCH_MODEL")
    model_dir = Path(trained) if trained else export_demo_model(tmp_path / "demo_arch_random")
    pairs, _ = demo_pairs(256)
    requests = rerank_requests(pairs)
    bodies = [json.dumps({"query": q, "documents": docs, "return_documents": False}).encode() for q, docs in requests]
    singles = [json.dumps({"pairs": [{"query": q, "document": d}]}).encode() for q, docs in requests for d in docs]
    costs = None if QUICK else in_process_costs(model_dir, requests)

    py, model = sys.executable, ["--model", str(model_dir), "--instructions", "full", "--threads", str(THREADS)]
    commands = {"ours, two-level": [py, "-m", "afrl_fast.serve", *model],
                "ours, one-level": [py, "-m", "afrl_fast.serve", *model, "--no-query-prefix"],
                "naive": [py, "benchmarks/_serve_baselines.py", "naive", *model]}
    handlers, rows = {}, {}
    started, loads = time.strftime("%Y-%m-%d %H:%M"), [load_average()]
    try:
        for i, (name, cmd) in enumerate(commands.items()):
            handlers[name] = Handler(name, cmd, tmp_path / f"handler{i}.log")
        if costs is None:
            costs = in_process_costs(model_dir, requests)
        for h in handlers.values():
            h.wait_ready()
        seconds = DURATION / ROUNDS
        for c in CLIENTS:
            for _ in range(ROUNDS):
                for name, h in handlers.items():
                    window(h, "/v1/rerank", bodies, c, seconds, rows.setdefault((name, "/v1/rerank", c), Row(CANDIDATES)),
                           warmup=WARMUP_S, drain=True)
            loads.append(load_average())
        for _ in range(ROUNDS):
            window(handlers["ours, two-level"], "/v1/score", singles, SCORE_CLIENTS, seconds,
                   rows.setdefault(("ours", "/v1/score, 1 pair", SCORE_CLIENTS), Row()), warmup=WARMUP_S)
        loads.append(load_average())
    finally:
        for h in handlers.values():
            h.stop()

    lines = [f"rerank, {started}, {os.cpu_count()} CPU cores, load average (1/5/15 min) at the start and after each "
             f"point: {', '.join(loads)}; torch {torch.__version__}, {THREADS} torch thread per handler; model: "
             f"{'trained ' + trained if trained else 'demo architecture, random weights'}; --instructions full: system "
             f"prefix {costs['prefix_len']} tokens, the query's part {costs['query_len']} tokens (first query); "
             f"{CANDIDATES} candidates per request, {DURATION:g} s per point in {ROUNDS} round(s){quick_note()}",
             f"{'handler':<18}{'endpoint':<20}{'clients':>8}{'req/s':>8}{'cand/s':>9}{'p50 ms':>10}{'p95 ms':>10}"
             f"{'errors':>7}{'CPU ms/cand':>13}{'on query prefix':>17}"]
    for (name, endpoint, c), r in rows.items():
        reused, fallback = r.counters["reused"], r.counters["fallback"]
        share = f"{100 * reused / (reused + fallback):>16.0f}%" if reused + fallback else f"{'-':>17}"
        lines.append(f"{name:<18}{endpoint:<20}{c:>8}{fmt(r.answered / r.seconds if r.seconds else float('nan'), 8)}"
                     f"{r.pairs_s:>9.1f}{fmt(r.pct(50), 10, 1)}{fmt(r.pct(95), 10, 1)}{r.errors:>7}"
                     f"{fmt(r.per_pair_ms(r.server_cpu), 13, 3)}{share}")
    lines.append("(CPU ms/cand: the handler process's CPU per candidate answered; latency per request)")
    lines.append(f"in process, no HTTP, per candidate of a {CANDIDATES}-candidate group: two-level {costs['two']:.3f} ms "
                 f"(prefills {costs['two_tokens']:.0f} tokens: the document and the template's end), one-level "
                 f"{costs['one']:.3f} ms ({costs['one_tokens']:.0f} tokens: query and document), naive forward "
                 f"{costs['naive']:.2f} ms (the whole prompt); with a {costs['long_query_len']}-token query: two-level "
                 f"{costs['long_two']:.3f} ms, one-level {costs['long_one']:.3f} ms "
                 f"({costs['long_one'] / costs['long_two']:.2f}x)")
    two, one = rows[("ours, two-level", "/v1/rerank", CLIENTS[0])], rows[("ours, one-level", "/v1/rerank", CLIENTS[0])]
    naive, single = rows[("naive", "/v1/rerank", CLIENTS[0])], rows[("ours", "/v1/score, 1 pair", SCORE_CLIENTS)]
    lines.append(f"at 1 client, a {CANDIDATES}-candidate rerank: two-level p50 {two.pct(50):.1f} ms, one-level "
                 f"{one.pct(50):.1f} ms ({one.pct(50) / two.pct(50):.2f}x), naive {naive.pct(50):.1f} ms "
                 f"({naive.pct(50) / two.pct(50):.1f}x); server CPU per candidate {two.per_pair_ms(two.server_cpu):.3f} ms "
                 f"vs {single.per_pair_ms(single.server_cpu):.3f} ms as {SCORE_CLIENTS} clients' one-pair /v1/score "
                 f"requests ({single.per_pair_ms(single.server_cpu) / two.per_pair_ms(two.server_cpu):.1f}x)")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(r.errors == 0 for r in rows.values())
    assert two.counters["reused"] > 0 and one.counters["reused"] == 0
