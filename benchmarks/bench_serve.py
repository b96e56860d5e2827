"""Load test of the scoring service against a naive handler and reason-first generation.

Run: ``pytest benchmarks/bench_serve.py --benchmark`` (about 8 minutes at the default 30 s per point;
AFRL_BENCH_SECONDS sets the seconds per point).

Model: the demo's architecture (configs/demo.yaml: hidden 128, 2 layers, 4 heads, 2 KV heads,
head_dim 32, intermediate 384, tied 151,936-row embedding) with random weights, exported like the
trainer exports a model, prompted with ``--instructions full`` (the whole rulebook: a long shared
prefix). A random model costs exactly what the trained demo model costs per token; set
AFRL_BENCH_MODEL to a trained ``final_model`` folder to measure that instead.

Traffic: the demo's own kind of pairs (synthetic ``industry`` split), one pair per request, from
`clients` closed-loop clients (each sends its next request when its previous one is answered; one
HTTP connection each) for DURATION seconds per point, only to 127.0.0.1; requests answered after
the window are not counted, and the clients stop by themselves. One more row sends MULTI pairs per
request from 32 / MULTI clients (a ranker scoring one query's candidates at once). Every handler runs in its own
process, all started first; at each concurrency the handlers take turns, so load from other jobs
on a shared machine falls on all of them alike. Every handler gets THREADS torch threads (on a
2-core machine the other core carries the event loop, the tokenizer and the load generator); the
naive handler is also run with 2 threads at 32 clients.

* ours: ``python -m afrl_fast.serve`` with its defaults (max batch 64, max wait 5 ms);
* naive / reason-first: benchmarks/_serve_baselines.py (the same app; see its docstring).

Floors: the HTTP floor is /health under the same clients (the most requests/s this load generator
and uvicorn reach here); the latency floor is one forward over a single pair's suffix after the
cached prefix, in this process with THREADS threads (median over the pairs): the cost the p99
target refers to.

Quick mode (AFRL_BENCH_QUICK=1, see benchmarks/_quick.py): the same handlers in their own processes
and the same table, at 0.3 s per point (0.1 s warm-up), 1 and 8 clients (the ranker row at 8), 32
distinct pairs, at most 8 reasoning tokens, and without the naive handler's 2-thread run (the same
code with another thread count: one process fewer to start), the in-process costs measured while the
handlers start; AFRL_BENCH_SECONDS still sets the seconds per point.
"""
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from _quick import QUICK, choose, quick_note

ROOT = Path(__file__).resolve().parents[1]
DURATION = float(os.environ.get("AFRL_BENCH_SECONDS", choose("30", "0.3")))
FLOOR_DURATION = min(DURATION, 10.0)
WARMUP_S = choose(2.0, 0.1)
DRAIN_S = 120.0                  # the longest a point waits for requests still in flight after its window
MAX_REQUESTS = 200_000           # per point, whatever the duration
CLIENTS = choose((1, 8, 32), (1, 8))
TOP = CLIENTS[-1]                # the concurrency of the headline comparison, the ranker row, the 2-thread naive row
THREADS = 1
N_PAIRS = choose(256, 32)
MULTI = 8                        # pairs per request in the ranker-style row
MAX_REASON_TOKENS = choose(None, 8)     # quick mode: reason-first writes at most this many tokens
DEMO = dict(vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_demo_model(out: Path) -> Path:
    import transformers

    from afrl_fast.format import instructions_text, load_tokenizer, save_prompt_settings
    from afrl_fast.rulebook import load_rulebook

    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**DEMO)).save_pretrained(out)
    load_tokenizer().save_pretrained(out)
    rb = load_rulebook()
    save_prompt_settings(out, rb, instructions_text(rb, "short"))     # what the demo trains with
    return out


def demo_pairs(n):
    from afrl_fast.data import synthesize

    table = synthesize(n, seed=7, split="industry", reasons=False)
    return list(zip(table.column("query").to_pylist(), table.column("document").to_pylist())), \
        table.column("trace").to_pylist()


class Handler:
    """One server process on a free loopback port."""

    def __init__(self, name, cmd, log: Path):
        self.name, self.log = name, open(log, "w")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.log_path = log

    def wait_ready(self):
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not start:\n{self.log_path.read_text()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def load_point(url, path, bodies, clients, duration):
    """(latencies in s of the requests answered inside the window, number of non-200 answers).
    Each client has its own connection (one AsyncClient each: a shared pool's bookkeeping grows
    with the number of connections and would make the load generator the bottleneck)."""
    import httpx

    latencies, errors, sent = [], 0, 0
    headers = {"content-type": "application/json"}

    async def client(http, k, until, record):
        nonlocal errors, sent
        i = k
        while time.perf_counter() < until and sent < MAX_REQUESTS:
            sent += 1
            t0 = time.perf_counter()
            r = await (http.get(path) if bodies is None else
                       http.post(path, content=bodies[i % len(bodies)], headers=headers))
            t1 = time.perf_counter()
            i += clients
            if r.status_code != 200:
                errors += 1
            elif record and t1 <= until:
                latencies.append(t1 - t0)

    https = [httpx.AsyncClient(base_url=url, timeout=DRAIN_S + duration, limits=httpx.Limits(max_connections=1))
             for _ in range(clients)]
    try:
        warm = time.perf_counter() + WARMUP_S
        await asyncio.gather(*(client(h, k, warm, False) for k, h in enumerate(https)))
        sent = 0
        until = time.perf_counter() + duration
        await asyncio.wait_for(asyncio.gather(*(client(h, k, until, True) for k, h in enumerate(https))),
                               duration + DRAIN_S)
    finally:
        for h in https:
            await h.aclose()
    return latencies, errors


def summarize(latencies, duration, errors, pairs_per_request=1):
    ms = np.array(latencies) * 1e3
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
    return {"pairs_s": len(ms) * pairs_per_request / duration, "p50": pct(50), "p95": pct(95), "p99": pct(99), "errors": errors}


def batch_totals(url) -> tuple[float, float]:
    """(pairs scored, batches run) so far, from the service's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return values.get("afrl_batch_pairs_sum", 0.0), values.get("afrl_batch_pairs_count", 0.0)


def median_ms(fn, items) -> float:
    """Median ms of fn(item) over the items, after one warm-up pass."""
    times = []
    for item in list(items) + list(items):
        t0 = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[len(items):])


def in_process_costs(model_dir, pairs) -> dict:
    """Per-pair costs measured in this process with THREADS threads, no HTTP: tokenising one pair's
    prompt, one forward over a single pair's suffix after the cached prefix (the latency floor),
    ours per pair in batches of half the (at most 64) pairs, 32 in full mode, and the naive handler's
    forward (whole prompt, full-vocab head)."""
    from afrl_fast.evaluate import FirstTokenScorer, load_model
    from afrl_fast.format import load_tokenizer, resolve_prompt_settings

    prompt = resolve_prompt_settings(model_dir, None, "full")
    model = load_model(str(model_dir), "auto")
    scorer = FirstTokenScorer(model, load_tokenizer(model_dir), prompt.rulebook, instructions=prompt.instructions,
                              progress=False, batch_size=32)
    ids = scorer.prompt_ids(*zip(*pairs[:64]))
    suffixes = [row[len(scorer.prefix):] for row in ids]
    half = len(ids) // 2
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.inference_mode():
            return {"tokenize": median_ms(lambda p: scorer.prompt_ids([p[0]], [p[1]]), pairs[:64]),
                    "suffix": median_ms(lambda s: scorer.suffix_label_logits([s]), suffixes),
                    "batched": median_ms(scorer.score_token_ids, [ids[:half], ids[half:]]) / half,
                    "naive": median_ms(lambda row: torch.softmax(model(input_ids=torch.tensor([row]), logits_to_keep=1)
                                                                 .logits[0, -1].double(), -1), ids[:half]),
                    "suffix_len": statistics.median(map(len, suffixes)), "prefix_len": len(scorer.prefix),
                    "batch": half}
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
    rows, mean_batch = {}, {}
    try:
        for i, (name, cmd) in enumerate(commands.items()):
            handlers[name] = Handler(name, cmd, tmp_path / f"handler{i}.log")
        if costs is None:
            costs = in_process_costs(model_dir, pairs)
        for h in handlers.values():
            h.wait_ready()
        ours = handlers["ours"]
        for c in CLIENTS:
            lat, err = asyncio.run(load_point(ours.url, "/health", None, c, FLOOR_DURATION))
            rows[("HTTP floor (/health)", c)] = summarize(lat, FLOOR_DURATION, err)
            if c == TOP:
                lat, err = asyncio.run(load_point(ours.url, "/v1/score", multi, TOP // MULTI, DURATION))
                rows[(f"ours, {MULTI} pairs/request", TOP // MULTI)] = summarize(lat, DURATION, err, MULTI)
            for name, h in handlers.items():
                if name == "naive, 2 threads" and c != TOP:
                    continue
                before = batch_totals(h.url) if name == "ours" else None
                lat, err = asyncio.run(load_point(h.url, "/v1/score", bodies, c, DURATION))
                rows[(name, c)] = summarize(lat, DURATION, err)
                if before is not None:
                    after = batch_totals(h.url)
                    mean_batch[c] = (after[0] - before[0]) / max(after[1] - before[1], 1)
    finally:
        for h in handlers.values():
            h.stop()

    floor_ms = costs["suffix"]
    lines = [f"scoring service, {os.cpu_count()} CPU cores, torch {torch.__version__}, {THREADS} torch thread(s) per "
             f"handler; model: {'trained ' + trained if trained else 'demo architecture, random weights'}; "
             f"--instructions full: shared prefix {costs['prefix_len']} tokens, pair suffix median {costs['suffix_len']:.0f} tokens; "
             f"one pair per request, {DURATION:g} s per point ({FLOOR_DURATION:g} s for /health){quick_note()}",
             f"{'handler':<26}{'clients':>8}{'pairs/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}"
             f"{'batch':>7}"]
    for (name, c), r in rows.items():
        batch = f"{mean_batch[c]:>7.1f}" if name == "ours" else ""
        lines.append(f"{name:<26}{c:>8}{r['pairs_s']:>10.1f}{r['p50']:>9.2f}{r['p95']:>9.2f}{r['p99']:>9.2f}"
                     f"{r['errors']:>8}{batch}")
    lines.append(f"(batch: mean pairs per inference batch during the point; the {MULTI} pairs/request row: "
                 f"{TOP // MULTI} clients, so {TOP} pairs in flight as with {TOP} one-pair clients, "
                 f"latency per request)")
    lines.append(f"latency floor: one forward over a single pair's suffix after the cached prefix: {floor_ms:.2f} ms")
    lines.append(f"in process, no HTTP, per pair: tokenising the prompt {costs['tokenize']:.2f} ms; "
                 f"ours in batches of {costs['batch']} "
                 f"{costs['batched']:.2f} ms; naive forward {costs['naive']:.2f} ms "
                 f"({costs['naive'] / costs['batched']:.1f}x ours)")
    best_naive = max(rows[(name, TOP)]["pairs_s"] for name in ("naive", "naive, 2 threads") if (name, TOP) in rows)
    speedup = rows[("ours", TOP)]["pairs_s"] / max(best_naive, 1e-9)
    p99 = rows[("ours", 1)]["p99"]
    lines.append(f"ours at {TOP} clients: {speedup:.1f}x the naive handler's best pairs/s (target >= 10x: "
                 f"{'met' if speedup >= 10 else 'NOT met'})")
    lines.append(f"ours at 1 client: p99 {p99:.2f} ms = {p99 / floor_ms:.2f}x the suffix forward (target <= 1.5x: "
                 f"{'met' if p99 <= 1.5 * floor_ms else 'NOT met'})")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(r["errors"] == 0 for r in rows.values())
