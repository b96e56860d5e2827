"""What bench_serve.py and bench_rerank.py share: the demo model, handler processes, the load
generators and what a load window measures.

Load generators. Clients are closed-loop (each sends its next request when its previous one is
answered), one HTTP/1.1 keep-alive connection each, only to 127.0.0.1; requests answered after the
window are not counted, and clients stop by themselves.

* ``lean`` (the default): requests written as prepared bytes on raw asyncio streams (uvloop when
  installed), the response read by its Content-Length. About 0.03 ms of CPU per request here.
* ``httpx``: one ``httpx.AsyncClient`` per client, as a Python user would write it. About 0.6-0.9 ms
  of CPU per request on this machine: on a 2-core machine the load generator then takes a share
  of the CPU comparable to the service's own per-request work (it ran alone before, and the
  service's numbers carried its cost; ``bench_serve`` still runs both handlers' headline point with
  it, for comparison).

A window also reads, from /proc, the CPU time the handler's process used and, from the
process's /metrics, its own accounting (inference and tokenizer thread CPU, batches, tokeniser
calls), so the tables can say where each pair's CPU went.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DRAIN_S = 120.0                  # the longest a window waits for requests still in flight after it
MAX_REQUESTS = 200_000           # per window, whatever the duration
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


def fmt(x, width=9, digits=2) -> str:
    # NaN (x != x) marks a point that was not measured: a dash keeps the columns aligned
    return f"{x:>{width}.{digits}f}" if x == x else f"{'-':>{width}}"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


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

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (Linux /proc; NaN elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    def metrics(self) -> dict:
        """{sample name with labels: value} from the process's /metrics."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(httpx.get(self.url + "/metrics", timeout=30).text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ----------------------------------------------------------------------------------------------
# load generators
# ----------------------------------------------------------------------------------------------

def http_request(path: str, body: bytes | None) -> bytes:
    if body is None:
        return f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n".encode()
    return (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


async def lean_window(port, path, bodies, clients, duration, drain=False):
    """(latencies in s of the requests answered inside the window, non-200 answers, seconds).
    With `drain`, every request sent inside the window counts and the window lasts until the last
    answer (for requests of seconds each, which a window edge would otherwise cut)."""
    requests = [http_request(path, None)] if bodies is None else [http_request(path, b) for b in bodies]
    latencies, errors, sent, last = [], 0, 0, 0.0

    async def exchange(reader, writer, data) -> int:
        writer.write(data)
        head = await reader.readuntil(b"\r\n\r\n")
        at = head.lower().find(b"content-length:")
        await reader.readexactly(int(head[at + 15:head.index(b"\r\n", at)]))
        return int(head[9:12])

    async def client(k, until, record):
        nonlocal errors, sent, last
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        try:
            while time.perf_counter() < until and sent < MAX_REQUESTS:
                sent += 1
                t0 = time.perf_counter()
                try:
                    status = await exchange(reader, writer, requests[i % len(requests)])
                except (asyncio.IncompleteReadError, ConnectionError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                t1 = time.perf_counter()
                last = max(last, t1)
                i += clients
                if status != 200:
                    errors += 1
                elif record and (drain or t1 <= until):
                    latencies.append(t1 - t0)
        finally:
            writer.close()

    start = time.perf_counter()
    until = start + duration
    await asyncio.wait_for(asyncio.gather(*(client(k, until, True) for k in range(clients))), duration + DRAIN_S)
    return latencies, errors, (last - start if drain else duration)


async def httpx_window(url, path, bodies, clients, duration):
    """The same with one httpx.AsyncClient per client (a shared pool's bookkeeping grows with the
    number of connections and would make the load generator the bottleneck)."""
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
        until = time.perf_counter() + duration
        await asyncio.wait_for(asyncio.gather(*(client(h, k, until, True) for k, h in enumerate(https))),
                               duration + DRAIN_S)
    finally:
        for h in https:
            await h.aclose()
    return latencies, errors, duration


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ----------------------------------------------------------------------------------------------
# what a window measures
# ----------------------------------------------------------------------------------------------

COUNTERS = {"inference_cpu": "afrl_thread_cpu_seconds_total{thread=inference}",
            "reused": "afrl_query_prefix_candidates_total{outcome=reused}",
            "fallback": "afrl_query_prefix_candidates_total{outcome=fallback}",
            "query_prefixes": "afrl_query_prefixes_total",
            "tokenizer_cpu": "afrl_thread_cpu_seconds_total{thread=tokenizer}",
            "batch_pairs": "afrl_batch_pairs_sum", "batches": "afrl_batch_pairs_count",
            "batch_seconds": "afrl_batch_seconds_sum", "tokenize_seconds": "afrl_tokenize_seconds_sum",
            "tokenize_calls": "afrl_tokenize_seconds_count", "scored": "afrl_pairs_scored_total"}


@dataclass
class Row:
    """One handler at one load, summed over its windows (a point may run in several rounds)."""
    per_request: int = 1             # pairs (candidates) per request
    latencies: list = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    client_cpu: float = 0.0
    counters: dict = field(default_factory=lambda: {k: 0.0 for k in COUNTERS})

    @property
    def answered(self) -> int:
        return len(self.latencies)

    @property
    def pairs(self) -> int:
        return self.answered * self.per_request

    @property
    def pairs_s(self) -> float:
        return self.pairs / self.seconds if self.seconds else float("nan")

    def pct(self, q) -> float:
        return float(np.percentile(np.array(self.latencies) * 1e3, q)) if self.latencies else float("nan")

    def per_pair_ms(self, seconds: float) -> float:
        """CPU (or wall) seconds of the window per pair answered in it, in ms. The service's own
        counters also cover requests of the warm-up and drain, so these are upper bounds."""
        return 1e3 * seconds / self.pairs if self.pairs else float("nan")

    @property
    def mean_batch(self) -> float:
        return self.counters["batch_pairs"] / self.counters["batches"] if self.counters["batches"] else float("nan")


def window(handler: Handler, path: str, bodies, clients: int, duration: float, row: Row, *, warmup: float,
           client: str = "lean", metrics: bool = True, drain: bool = False) -> Row:
    """Run one load window against `handler` (after `warmup` seconds of the same load, not
    counted) and add what it measured to `row` (`drain`: see lean_window)."""
    def load(seconds):
        if client == "lean":
            return run_async(lean_window(handler.port, path, bodies, clients, seconds, drain))
        return run_async(httpx_window(handler.url, path, bodies, clients, seconds))

    if warmup > 0:
        load(warmup)
    before = handler.metrics() if metrics else {}
    cpu, mine = handler.cpu_seconds(), time.process_time()
    latencies, errors, seconds = load(duration)
    row.client_cpu += time.process_time() - mine
    row.server_cpu += handler.cpu_seconds() - cpu
    row.latencies += latencies
    row.errors += errors
    row.seconds += seconds
    if metrics:
        after = handler.metrics()
        for key, name in COUNTERS.items():
            row.counters[key] += after.get(name, 0.0) - before.get(name, 0.0)
    return row
