"""Online scoring service: first-token relevance scores over HTTP, a rerank API, and OpenAI-compatible
completions.

    python -m afrl_fast.serve --model DIR [--host 127.0.0.1] [--port 8000]
        [--instructions short|full|PATH] [--rulebook YAML] [--max-batch 64] [--max-wait-ms 5]
        [--max-queue 1024] [--max-rerank-documents 1000] [--device auto] [--backend embedded|sglang]
        [--truncate]

Endpoints (FastAPI on uvicorn):
  POST /v1/score        {"pairs": [{"query", "document", "id"?}], "explain": false}
                        -> per pair {"id", "grade", "probs": [p0..p4], "score": sum k*p_k, "truncated"};
                        with "explain": true also the AFRL trace generated greedily after the grade
                        token and the verifier's verdict on it
  POST /v1/rerank, /rerank
                        the rerank API of Cohere, Jina, vLLM and TEI: {"query", "documents": [text or
                        {"text"}], "top_n"?, "return_documents"? (default true), "return_grades"?, "model"?}
                        (TEI's "texts" / "return_text" accepted for documents / return_documents)
                        -> {"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"},
                        "grade"?, "probs"?}] sorted by relevance_score, "usage"}; relevance_score is the
                        expected grade over the five label probabilities divided by 4, in [0, 1]
  POST /v1/completions  the OpenAI completions API (prompt as text or token ids, n, temperature, top_p,
                        max_tokens, seed, stop, logprobs); the n samples of a prompt share its KV
  GET  /v1/models, GET /health, GET /metrics (Prometheus text format)

Why it is fast. In the AFRL format the grade is the first token, so a score is one prefill. The
prompt prefix every pair shares (system prompt and chat template up to the user's text) has its KV
computed once at start-up; a pair prefills only its own suffix, and only the five label rows of the
LM head are applied (`afrl_fast.evaluate.FirstTokenScorer`, the offline evaluator's code). A rerank
request's candidates share more: the query's part of the prompt is prefilled once on top of that
KV, and each candidate prefills only its document and the template's end (two-level prefix;
`FirstTokenScorer.score_query`). A prompt's ids are the cached ids of the template around the user
message plus the tokenisation of that message alone (`PromptPieces`); requests waiting together
are tokenised in one batch call in a tokenizer thread. Pairs from all clients go through one asyncio
queue; a batching task takes up to --max-batch of them, keeps filling the batch while the previous
one is still computing, then waits at most --max-wait-ms after its first pair arrived for requests
still being tokenised (not at all when there are none); inference runs in one worker thread, so the
event loop keeps accepting requests, and the next batch is handed to it before the previous one's
requests are answered. A full queue answers 503 with Retry-After instead of growing memory.

Bad input gets a JSON 4xx naming the field (and pair or document index): {"error": {"message",
"type", "param", "code"}}, the OpenAI error shape. SIGTERM stops accepting connections, finishes the
requests in flight, then exits (by that signal, as uvicorn re-raises it).
"""
# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations at run time,
# and the request models are local to request_models().
import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from .errors import ScoringError
from .prompt_encoding import PromptEncoder, PromptPieces
from .format import FormatError, resolve_prompt_settings
from .metrics import expected_score
from .rulebook import RulebookError
from .engines import RolloutGroup
from .serve_backends import BACKENDS, ServeError, load_backend, pick_device
from .verify import RewardConfig, verify_batch

log = logging.getLogger("afrl_fast.serve")

ENDPOINTS = ("/v1/score", "/v1/rerank", "/rerank", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass
class ServeConfig:
    """Limits and batching of one service; the CLI flags of the same names."""
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024            # pairs waiting to be scored, and rows waiting to be generated
    max_request_pairs: int = 256
    max_body_bytes: int = 8 << 20
    max_prompt_tokens: int | None = None    # default: the model's context length
    truncate: bool = False
    explain_max_tokens: int = 512
    max_completion_rows: int = 256  # prompts x n of one completions request
    max_rerank_documents: int = 1000    # candidates of one rerank request (at most max_queue count)
    query_prefix: bool = True       # rerank: prefill a query's part of the prompt once for its candidates
    retry_after_s: int = 1
    model_name: str = "afrl"

    @property
    def rerank_limit(self) -> int:
        """Candidates one rerank request may send: a request must fit the queue whole."""
        return min(self.max_rerank_documents, self.max_queue)

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_request_pairs", "max_body_bytes", "explain_max_tokens",
                     "max_completion_rows", "max_rerank_documents", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ServeError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ServeError(f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}")


# ----------------------------------------------------------------------------------------------
# Errors: one JSON shape for every 4xx/5xx
# ----------------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_value",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(message: str, param: str | None = None, code: str | None = None,
               kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def field_path(loc) -> str:
    """("body", "pairs", 3, "query") -> "pairs[3].query"."""
    out = ""
    for part in loc:
        if part == "body" and not out:
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def invalid(errors: list[dict]) -> ApiError:
    """The 422 for a request pydantic refused: its first problem, by field, and how many more."""
    param, message = validation_message(errors[0]) if errors else ("body", "invalid request")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ApiError(422, message, param, "invalid_value")


def validation_message(err: dict) -> tuple[str, str]:
    """(param, one-line message) for the first pydantic error of a request."""
    param = field_path(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        return "body", f"body: invalid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        msg = "required field missing"
    return param, f"{param}: {msg}"


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics of one service, in their own registry (several apps can live in one process)."""

    def __init__(self, queue_depth, generation_rows=lambda: 0):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("afrl_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("afrl_request_seconds", "request latency by endpoint", ["endpoint"], registry=r,
                                 buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60))
        self.pairs = Counter("afrl_pairs_scored", "pairs scored", registry=r)
        self.full_prefill = Gauge("afrl_full_prefill_pairs",
                                  "pairs scored with a full prefill because their tokens did not start with the "
                                  "cached prefix", registry=r)
        self.batch_pairs = Histogram("afrl_batch_pairs", "pairs per inference batch", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_seconds = Histogram("afrl_batch_seconds", "inference time per batch (in the inference thread)",
                                       registry=r,
                                       buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.queue = Gauge("afrl_queue_pairs", "pairs waiting in the batching queue", registry=r)
        self.queue.set_function(queue_depth)
        self.generation = Gauge("afrl_generation_rows", "completion and explain rows submitted to the inference "
                                "thread and not finished", registry=r)
        self.generation.set_function(generation_rows)
        self.rejected = Counter("afrl_rejected", "requests refused before inference, by reason", ["reason"],
                                registry=r)
        self.generated = Counter("afrl_generated_tokens", "tokens generated (completions and explain traces)",
                                 registry=r)
        self.generation_batch_requests = Histogram(
            "afrl_generation_batch_requests", "completion / explain requests decoded together in one engine call",
            registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        # rerank and its query-level prefix
        self.rerank_candidates = Histogram("afrl_rerank_candidates", "candidate documents per rerank request",
                                           registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
        self.query_prefixes = Counter("afrl_query_prefixes", "query prefixes prefilled (once per query and batch, "
                                      "on top of the cached system prefix)", registry=r)
        self.query_prefix_candidates = Counter(
            "afrl_query_prefix_candidates", "rerank candidates by whether they were scored on their query's "
            "prefix (reused) or not (fallback: a boundary merge, or a lone candidate; scored like /v1/score)",
            ["outcome"], registry=r)
        self.query_prefix_hit_ratio = Gauge("afrl_query_prefix_hit_ratio", "share of rerank candidates so far "
                                            "scored on their query's prefix", registry=r)
        self.query_prefix_hit_ratio.set_function(self.hit_ratio)
        # where the time goes (bench_serve's breakdown)
        self.tokenize_seconds = Histogram("afrl_tokenize_seconds", "time per tokenizer call (all requests "
                                          "waiting at that moment together)", registry=r,
                                          buckets=(.0001, .0002, .0005, .001, .002, .005, .01, .02, .05, .1, .5))
        self.tokenized_pairs = Counter("afrl_tokenized_pairs", "pairs tokenised", registry=r)
        self.thread_cpu = Counter("afrl_thread_cpu_seconds", "CPU time of the inference and tokenizer threads "
                                  "spent on their calls", ["thread"], registry=r)
        self.process_cpu = Gauge("afrl_process_cpu_seconds", "CPU time of the whole process so far", registry=r)
        self.process_cpu.set_function(time.process_time)

        self.candidates_reused = self.candidates_fallback = 0

    def count_query_prefix(self, reused: int, fallback: int, prefilled: int) -> None:
        self.query_prefix_candidates.labels("reused").inc(reused)
        self.query_prefix_candidates.labels("fallback").inc(fallback)
        self.query_prefixes.inc(prefilled)
        self.candidates_reused += reused
        self.candidates_fallback += fallback

    def hit_ratio(self) -> float:
        total = self.candidates_reused + self.candidates_fallback
        return self.candidates_reused / total if total else 0.0


class RequestMetrics:
    """ASGI middleware: count requests by endpoint and status, time them. Pure ASGI, not
    BaseHTTPMiddleware: it adds no task or body copy per request."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics
        self.counters, self.timers = {}, {}        # the labelled children, looked up once

    def count(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, status)
        counter = self.counters.get(key)
        if counter is None:
            counter = self.counters[key] = self.metrics.requests.labels(endpoint, str(status))
        timer = self.timers.get(endpoint)
        if timer is None:
            timer = self.timers[endpoint] = self.metrics.latency.labels(endpoint)
        counter.inc()
        timer.observe(seconds)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500
        start = time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.count(endpoint, status, time.perf_counter() - start)


class BodyLimit:
    """ASGI middleware: refuse a request body over `limit` bytes with 413, by its Content-Length or,
    for a chunked body, as soon as the bytes received pass the limit. In that case the app is told
    the client left (FastAPI would turn an exception raised while reading into a 400), and
    whatever it answers is dropped: the client has its 413."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def refuse(self, send):
        self.metrics.rejected.labels("body_too_large").inc()
        body = json.dumps(error_body(f"body: request body over the limit of {self.limit} bytes", "body",
                                     "body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self.refuse(send)
        received, refused, started = 0, False, False

        async def limited_receive():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit and not started:
                    refused = True
                    await self.refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


# ----------------------------------------------------------------------------------------------
# Dynamic batching
# ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    """Pairs scored together: one pair, or the candidates of one query sharing its prefix (`query`:
    the token ids they all start with; see FirstTokenScorer.score_query)."""
    ids: list[list[int]]
    future: asyncio.Future
    arrived: float
    query: list[int] | None = None

    @property
    def size(self) -> int:
        return len(self.ids)


class Overloaded(Exception):
    pass


def fail_all(jobs, error: Exception) -> None:
    """A failed engine call: every request of its batch still waiting gets the error."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(error)


class Batcher:
    """Pairs from every request go into one asyncio queue, bounded at max_queue pairs; `run` takes
    batches off it and scores them in the single inference thread with `score_fn(jobs)` -> one
    [n, 5] array per job.

    A batch closes when it holds max_batch pairs, or, once the previous batch has finished, when
    max_wait has passed since its first pair arrived or no request is on its way to the queue
    (`incoming`: admitted by a handler, still being tokenised). While the worker is busy nothing is
    lost by waiting, so the batch keeps filling and batches grow with the load by themselves; with
    nothing on its way, waiting would only add latency (a lone client never waits). A rerank
    request's candidates are one job, so a batch may pass max_batch pairs by its last job (the
    scorer splits it)."""

    def __init__(self, score_fn, worker: ThreadPoolExecutor, cfg: ServeConfig, metrics: Metrics | None = None):
        self.score_fn, self.worker, self.cfg = score_fn, worker, cfg
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.pending = 0            # pairs in the queue
        self.metrics = metrics
        self.max_wait = cfg.max_wait_ms / 1000.0
        self.incoming = 0

    def put(self, jobs: list[Job]) -> None:
        if self.cfg.max_queue - self.pending < sum(job.size for job in jobs):
            raise Overloaded
        for job in jobs:
            self.queue.put_nowait(job)
            self.pending += job.size

    def submit(self, all_ids: list[list[int]]) -> list[asyncio.Future]:
        """Enqueue every pair of one request, or none of them (Overloaded) if they do not all fit."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        jobs = [Job([ids], loop.create_future(), now) for ids in all_ids]
        self.put(jobs)
        return [job.future for job in jobs]

    def submit_query(self, query: list[int], all_ids: list[list[int]]) -> asyncio.Future:
        """Enqueue one query's candidates as one job (all or nothing)."""
        loop = asyncio.get_running_loop()
        job = Job(all_ids, loop.create_future(), loop.time(), query)
        self.put([job])
        return job.future

    def take(self, job: Job) -> Job:
        self.pending -= job.size
        return job

    async def run(self) -> None:
        """Collect a batch, hand it to the inference thread, and only then deliver the previous
        batch's results: answering its requests (JSON, HTTP) runs on the event loop while the
        inference thread already computes, instead of leaving it idle in between. A batch that
        filled up while the previous one still runs is handed over at once and waits in the
        executor's queue, so the thread goes from one to the next without a round trip."""
        loop = asyncio.get_running_loop()
        previous = None           # (jobs, the inference thread's future) of the batch handed over last
        while True:
            batch = await self.collect(previous[1] if previous else None)
            live = [job for job in batch if not job.future.done()]     # a client that went away is skipped
            current = (live, loop.run_in_executor(self.worker, self.timed, live)) if live else None
            if previous is not None:
                await self.deliver(*previous)
            previous = current

    def timed(self, jobs: list[Job]):
        """score_fn in the inference thread, and how long it took there."""
        start = time.perf_counter()
        return self.score_fn(jobs), time.perf_counter() - start

    async def collect(self, running: asyncio.Future | None) -> list[Job]:
        """The next batch; empty when the running batch finished before any job arrived (its
        results are then delivered)."""
        loop = asyncio.get_running_loop()
        if self.queue.empty() and running is not None:
            if running.done():
                return []
            getter = asyncio.ensure_future(self.queue.get())
            await asyncio.wait({getter, running}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return []
            batch = [self.take(getter.result())]
        else:
            batch = [self.take(await self.queue.get())]
        size = batch[0].size
        deadline = batch[0].arrived + self.max_wait
        while size < self.cfg.max_batch:
            while size < self.cfg.max_batch and not self.queue.empty():
                batch.append(self.take(self.queue.get_nowait()))
                size += batch[-1].size
            if size >= self.cfg.max_batch:
                break
            busy = running is not None and not running.done()
            remaining = deadline - loop.time()
            if not busy and (remaining <= 0 or self.incoming == 0):
                break
            getter = asyncio.ensure_future(self.queue.get())
            await asyncio.wait({getter, running} if busy else {getter},
                               timeout=None if busy else remaining, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                batch.append(self.take(getter.result()))
                size += batch[-1].size
            else:
                getter.cancel()
        return batch

    async def deliver(self, jobs: list[Job], future: asyncio.Future) -> None:
        try:
            probs, seconds = await future
        except Exception as e:     # every waiting request gets the error, the service goes on
            log.exception("scoring batch of %d pairs failed", sum(job.size for job in jobs))
            fail_all(jobs, e)
            return
        if self.metrics is not None:
            pairs = sum(job.size for job in jobs)
            self.metrics.batch_pairs.observe(pairs)
            self.metrics.batch_seconds.observe(seconds)
            self.metrics.pairs.inc(pairs)
        for job, p in zip(jobs, probs):
            if not job.future.done():
                job.future.set_result(p)


@dataclass
class EncodeJob:
    """One request's texts to tokenise: its pairs, and whether its query's own ids are wanted too
    (a rerank request whose candidates will share them)."""
    queries: list[str]
    documents: list[str]
    with_query: bool
    future: asyncio.Future


class TokenizeStage:
    """Requests are tokenised in the tokenizer thread, every request waiting at that moment in one
    call (`encode_fn(jobs)` -> per job its result or the exception to raise): one thread hand-off
    for all of them, and the fast tokenizer's batch encoding over all their texts. While one call
    runs, the requests arriving meanwhile gather for the next."""

    def __init__(self, encode_fn, pool: ThreadPoolExecutor):
        self.encode_fn, self.pool = encode_fn, pool
        self.waiting: list[EncodeJob] = []
        self.wake = asyncio.Event()

    async def encode(self, queries: list[str], documents: list[str], with_query: bool):
        job = EncodeJob(queries, documents, with_query, asyncio.get_running_loop().create_future())
        self.waiting.append(job)
        self.wake.set()
        return await job.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.waiting:
                jobs, self.waiting = [j for j in self.waiting if not j.future.done()], []
                if not jobs:
                    continue
                try:
                    results = await loop.run_in_executor(self.pool, self.encode_fn, jobs)
                except Exception as e:     # every request of the call gets the error, the service goes on
                    log.exception("tokenising %d requests failed", len(jobs))
                    fail_all(jobs, e)
                    continue
                for job, result in zip(jobs, results):
                    if job.future.done():
                        continue
                    if isinstance(result, Exception):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)


@dataclass
class GenJob:
    """One generation request: its prompts, sampling settings and one seed per prompt."""
    prompts: list[list[int]]
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seeds: list[int]
    top_logprobs: int
    future: asyncio.Future

    def key(self) -> tuple:
        """Requests with the same key decode together: one engine call, rows stopping on their own."""
        return (self.n, self.temperature, self.top_p, self.top_logprobs)


def cut_to(group: RolloutGroup, max_tokens: int) -> RolloutGroup:
    """A group decoded for a longer budget, as it would have come out with `max_tokens`: its rows
    draw from their prompt's own generator, so the first max_tokens tokens are the same."""
    return RolloutGroup(
        prompt_ids=group.prompt_ids, token_ids=[t[:max_tokens] for t in group.token_ids],
        logprobs=[lp[:max_tokens] for lp in group.logprobs],
        finished=[f and len(t) <= max_tokens for f, t in zip(group.finished, group.token_ids)],
        top_logprobs=None if group.top_logprobs is None else [t[:max_tokens] for t in group.top_logprobs])


class GenerationMerger:
    """Completion and explain requests decode in the single inference thread; while one batch runs,
    the requests that arrive wait, and when it ends all waiting requests with the same sampling
    settings (n, temperature, top-p, logprobs) go into the next engine call together, up to
    max_completion_rows rows: a weight read per decode step then serves every client at once. No
    request waits for a batch to fill (a lone client decodes at once). Each prompt samples from its
    own generator (seeded per prompt), so a request gets the same tokens whoever it shares a batch with."""

    def __init__(self, generate_fn, worker: ThreadPoolExecutor, cfg: ServeConfig, metrics=None):
        self.generate_fn, self.worker, self.cfg, self.metrics = generate_fn, worker, cfg, metrics
        self.waiting: list[GenJob] = []
        self.wake = asyncio.Event()

    def submit(self, job: GenJob) -> None:
        self.waiting.append(job)
        self.wake.set()

    def take_batch(self) -> list[GenJob]:
        first = self.waiting[0]
        batch, rows = [], 0
        for job in list(self.waiting):
            size = len(job.prompts) * job.n
            if job.key() == first.key() and (not batch or rows + size <= self.cfg.max_completion_rows):
                batch.append(job)
                rows += size
                self.waiting.remove(job)
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.waiting:
                batch = [j for j in self.take_batch() if not j.future.done()]   # a client that went away
                if not batch:
                    continue
                first = batch[0]
                prompts = [p for j in batch for p in j.prompts]
                seeds = [s for j in batch for s in j.seeds]
                budget = max(j.max_tokens for j in batch)
                try:
                    groups = await loop.run_in_executor(self.worker, lambda: self.generate_fn(
                        prompts, n=first.n, temperature=first.temperature, top_p=first.top_p, max_tokens=budget,
                        seeds=seeds, top_logprobs=first.top_logprobs))
                except Exception as e:     # every request of the batch gets the error, the service goes on
                    log.exception("generation batch of %d requests failed", len(batch))
                    fail_all(batch, e)
                    continue
                if self.metrics is not None:
                    self.metrics.generation_batch_requests.observe(len(batch))
                start = 0
                for j in batch:
                    mine = groups[start:start + len(j.prompts)]
                    start += len(j.prompts)
                    if not j.future.done():
                        j.future.set_result([cut_to(g, j.max_tokens) for g in mine])


def request_seeds(seed: int | None, n_prompts: int) -> list[int]:
    """One sampling seed per prompt of a request: fixed by (request seed, prompt index), or drawn
    from the OS for a request without a seed. Below 2^31, as SGLang keeps them."""
    if seed is None:
        return [int(x) for x in np.random.SeedSequence().generate_state(max(n_prompts, 1), np.uint32)[:n_prompts] >> 1]
    return [int(np.random.default_rng([int(seed), i]).integers(2**31)) for i in range(n_prompts)]


# ----------------------------------------------------------------------------------------------
# Request and response models
# ----------------------------------------------------------------------------------------------

def request_models():
    """The pydantic request models (built on first use, so importing this module needs no pydantic)."""
    from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt,
                          StrictStr, field_validator)

    Text = Annotated[StrictStr, Field(min_length=1)]

    def not_blank(value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    def document_text(value):
        """A document given as an object (Cohere v1, Jina): {"text": ...} -> its text."""
        if isinstance(value, dict):
            unknown = sorted(set(value) - {"text"})
            if unknown:
                raise ValueError(f'unknown field {unknown[0]!r} (a document object has only "text")')
            if "text" not in value:
                raise ValueError('a document object needs its "text"')
            return value["text"]
        return value

    NonBlank = Annotated[StrictStr, Field(min_length=1), AfterValidator(not_blank)]
    Document = Annotated[StrictStr, BeforeValidator(document_text), AfterValidator(not_blank)]
    Documents = Annotated[list[Document], Field(min_length=1)]

    class Pair(BaseModel):
        model_config = ConfigDict(extra="forbid")
        query: Text
        document: Text
        id: StrictStr | None = None

        @field_validator("query", "document")
        @classmethod
        def not_blank(cls, value: str) -> str:
            if not value.strip():
                raise ValueError("must not be blank")
            return value

    class ScoreRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        pairs: Annotated[list[Pair], Field(min_length=1)]
        explain: StrictBool = False

    class CompletionRequest(BaseModel):
        """The OpenAI completions request. Accepted but unsupported options must keep their
        default value; anything else is refused by name."""
        model_config = ConfigDict(extra="forbid")
        model: StrictStr | None = None
        prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
        n: StrictInt = Field(1, ge=1, le=128)
        max_tokens: StrictInt | None = Field(16, ge=1)
        temperature: float | None = Field(1.0, ge=0, le=2)
        top_p: float | None = Field(1.0, gt=0, le=1)
        seed: StrictInt | None = None
        stop: StrictStr | list[StrictStr] | None = None
        logprobs: StrictInt | None = Field(None, ge=0, le=20)
        echo: StrictBool = False
        stream: StrictBool = False
        best_of: StrictInt | None = None
        presence_penalty: float | None = 0.0
        frequency_penalty: float | None = 0.0
        logit_bias: dict | None = None
        suffix: StrictStr | None = None
        user: StrictStr | None = None
        return_tokens_as_token_ids: StrictBool = False      # as in vLLM: tokens written "token_id:<id>"

    class RerankRequest(BaseModel):
        """The rerank request of Cohere, Jina, vLLM and TEI (`texts` for `documents`, `return_text`
        for `return_documents`); `return_grades` is ours."""
        model_config = ConfigDict(extra="forbid")
        model: StrictStr | None = None
        query: NonBlank
        documents: Documents | None = None
        texts: Documents | None = None
        top_n: StrictInt | None = Field(None, ge=0)
        return_documents: StrictBool | None = None
        return_text: StrictBool | None = None
        return_grades: StrictBool = False

    return Pair, ScoreRequest, CompletionRequest, RerankRequest


# ----------------------------------------------------------------------------------------------
# The service
# ----------------------------------------------------------------------------------------------

@dataclass
class Service:
    """What the handlers share: the backend, its worker thread, the batcher, the prompt encoder."""
    backend: Any
    cfg: ServeConfig
    encoder: PromptEncoder
    worker: ThreadPoolExecutor
    tokenize_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "afrl-tokenize"))
    batcher: Batcher | None = None
    tokenizer_stage: TokenizeStage | None = None
    generator: GenerationMerger | None = None
    metrics: Metrics | None = None
    pending_rows: int = 0           # completion / explain rows submitted to the worker, not yet done
    pieces: PromptPieces | None = None

    def __post_init__(self):
        pieces = PromptPieces(self.encoder)
        if pieces.ok:
            self.pieces = pieces
        else:
            log.warning("the chat template cannot be cut around the user message with the same token ids; "
                        "every prompt is rendered and tokenised whole")

    @property
    def prompt_limit(self) -> int:
        return self.cfg.max_prompt_tokens or self.backend.context_tokens or 1 << 62

    @property
    def query_sharing(self) -> bool:
        """Whether rerank candidates share their query's prefix (two-level prefix)."""
        return (self.cfg.query_prefix and self.pieces is not None and self.pieces.query_ok
                and hasattr(self.backend, "score_query"))

    # --- tokenising (the tokenizer thread) -------------------------------------------------------

    def encode_jobs(self, jobs: list[EncodeJob]) -> list:
        """Per request (ids of each pair's prompt, the rows whose document was cut (only with
        --truncate), the query's own ids or None), or the ScoringError to raise. Runs in the
        tokenizer thread, the only one that uses the encoder: every request's texts in one batch
        encoding (PromptPieces: only the user message's piece of each prompt is tokenised)."""
        start, cpu = time.perf_counter(), time.thread_time()
        self.encoder.max_prompt_tokens = self.prompt_limit if self.cfg.truncate else None
        pieces, out = self.pieces, []
        if pieces is not None:
            texts = []
            for job in jobs:
                texts += map(pieces.segment, job.queries, job.documents)
                if job.with_query:
                    texts.append(pieces.query_segment(job.queries[0]))
            encoded, k = pieces.encode_batch(texts), 0
            head, tail = pieces.head, pieces.tail
        for job in jobs:
            try:
                if pieces is None:
                    ids = self.encoder.prompt_ids(job.queries, job.documents)
                    out.append((ids, list(self.encoder.truncated_rows), None))
                    continue
                n = len(job.queries)
                ids = [head + row + tail for row in encoded[k:k + n]]
                query = head + encoded[k + n] if job.with_query else None
                k += n + job.with_query
                out.append((ids, self.truncate(job, ids), query))
            except ScoringError as e:
                out.append(e)
        if self.metrics is not None:
            self.metrics.tokenize_seconds.observe(time.perf_counter() - start)
            self.metrics.tokenized_pairs.inc(sum(len(job.queries) for job in jobs))
            self.metrics.thread_cpu.labels("tokenizer").inc(time.thread_time() - cpu)
        return out

    def truncate(self, job: EncodeJob, ids: list[list[int]]) -> list[int]:
        """With --truncate, cut the document of each over-long prompt (in place); the rows cut."""
        if not self.cfg.truncate:
            return []
        limit, cut = self.prompt_limit, []
        for i, row in enumerate(ids):
            if len(row) > limit:
                try:
                    ids[i] = self.encoder.fit_document(job.queries[i], job.documents[i], row)
                except ScoringError as e:
                    e.row = i
                    raise
                cut.append(i)
        return cut

    async def encode(self, queries: list[str], documents: list[str], with_query: bool, doc_param, query_param):
        """(ids, truncated rows, query ids or None) of one request, tokenised with the others
        waiting; 400 naming the field for a prompt over the limit."""
        self.batcher.incoming += 1
        try:
            if self.tokenizer_stage is not None:
                ids, truncated, query = await self.tokenizer_stage.encode(queries, documents, with_query)
            else:      # a Service used outside the app
                [result] = await asyncio.get_running_loop().run_in_executor(
                    self.tokenize_pool, self.encode_jobs, [EncodeJob(queries, documents, with_query, None)])
                if isinstance(result, Exception):
                    raise result
                ids, truncated, query = result
            self.check_lengths(ids, doc_param)
        except ScoringError as e:      # --truncate, but the prompt is too long without its document
            param = query_param(getattr(e, "row", 0))
            raise ApiError(400, f"{param}: {e}", param, "context_length_exceeded") from None
        finally:
            self.batcher.incoming -= 1
        return ids, truncated, query

    def check_lengths(self, ids: list[list[int]], doc_param) -> None:
        limit = self.prompt_limit
        for i, row in enumerate(ids):
            if len(row) > limit:
                param = doc_param(i)
                raise ApiError(400, f"{param}: the prompt is {len(row)} tokens, more than the model's "
                                    f"limit of {limit} (start the service with --truncate to cut long documents)",
                               param, "context_length_exceeded")

    # --- scoring (the inference thread) ----------------------------------------------------------

    def score_jobs(self, jobs: list[Job]) -> list[np.ndarray]:
        """[n, 5] P(0..4) per job of one batch: the single pairs in one backend call, each query's
        candidates on its query's prefix (two-level; see FirstTokenScorer.score_query)."""
        cpu = time.thread_time()
        out: list = [None] * len(jobs)
        singles = [k for k, job in enumerate(jobs) if job.query is None]
        if singles:
            probs = self.backend.score([ids for k in singles for ids in jobs[k].ids])
            start = 0
            for k in singles:
                out[k] = probs[start:start + jobs[k].size]
                start += jobs[k].size
        for k, job in enumerate(jobs):
            if job.query is not None:
                out[k], reused = self.backend.score_query(job.query, job.ids)
                if self.metrics is not None:
                    self.metrics.count_query_prefix(reused, job.size - reused, int(reused > 0))
        if self.metrics is not None:
            self.metrics.thread_cpu.labels("inference").inc(time.thread_time() - cpu)
        return out

    def enqueue(self, submit, *args):
        try:
            return submit(*args)
        except Overloaded:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, f"the scoring queue is full ({self.cfg.max_queue} pairs); retry shortly", None,
                           "overloaded", {"Retry-After": str(self.cfg.retry_after_s)}) from None

    async def score(self, pairs) -> tuple[list[list[int]], np.ndarray, list[int]]:
        ids, truncated, _ = await self.encode([p.query for p in pairs], [p.document for p in pairs], False,
                                              lambda i: f"pairs[{i}].document", lambda i: f"pairs[{i}].query")
        futures = self.enqueue(self.batcher.submit, ids)
        probs = np.concatenate(await asyncio.gather(*futures))
        self.metrics.full_prefill.set(self.backend.full_prefill_pairs)
        return ids, probs, truncated

    async def rerank(self, query: str, documents: list[str], name: str):
        """(ids, [n, 5] probs, truncated rows) of one query's candidates; `name` is the request's
        field for them (documents or texts), for error messages."""
        n = len(documents)
        self.metrics.rerank_candidates.observe(n)
        share = self.query_sharing and n >= 2
        ids, truncated, query_ids = await self.encode([query] * n, documents, share, lambda i: f"{name}[{i}]",
                                                      lambda i: "query")
        if query_ids is not None:
            probs = await self.enqueue(self.batcher.submit_query, query_ids, ids)
        else:
            probs = np.concatenate(await asyncio.gather(*self.enqueue(self.batcher.submit, ids)))
            self.metrics.count_query_prefix(0, n, 0)
        self.metrics.full_prefill.set(self.backend.full_prefill_pairs)
        return ids, probs, truncated

    # --- generation ----------------------------------------------------------------------------

    async def run_generation(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float,
                             max_tokens: int, seed: int | None, top_logprobs: int = 0) -> list[RolloutGroup]:
        """Generate through the merger (one batch with the compatible requests waiting beside it),
        counting the rows against --max-queue."""
        rows = len(prompts) * n
        if self.pending_rows + rows > self.cfg.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, f"the generation queue is full ({self.cfg.max_queue} rows); retry shortly", None,
                           "overloaded", {"Retry-After": str(self.cfg.retry_after_s)})
        self.pending_rows += rows
        try:
            loop = asyncio.get_running_loop()
            job = GenJob(prompts, n, float(temperature), float(top_p), int(max_tokens),
                         request_seeds(seed, len(prompts)), int(top_logprobs), loop.create_future())
            if self.generator is None:     # a Service used outside the app (no merging task running)
                return await loop.run_in_executor(self.worker, lambda: self.backend.generate(
                    prompts, n=job.n, temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens,
                    seeds=job.seeds, top_logprobs=job.top_logprobs))
            self.generator.submit(job)
            return await job.future
        finally:
            self.pending_rows -= rows

    async def explain(self, ids: list[list[int]], grades: list[int]) -> list[dict]:
        """The trace each pair's prompt continues with after its grade token (greedy), and the
        verifier's verdict on grade + trace."""
        label_ids = self.backend.label_ids
        prompts = [row + [label_ids[g]] for row, g in zip(ids, grades)]
        budget = self.cfg.explain_max_tokens
        if self.backend.context_tokens:
            budget = min(budget, self.backend.context_tokens - max(map(len, prompts)))
        if budget < 1:
            raise ApiError(400, "pairs: no room left in the model's context for an explanation", "pairs",
                           "context_length_exceeded")
        groups = await self.run_generation(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=budget, seed=0)
        tokenizer, eos = self.encoder.tokenizer, set(self.backend.eos_ids)
        texts = []
        for prompt, group in zip(prompts, groups):
            tokens = strip_eos(group.token_ids[0], eos)
            self.metrics.generated.inc(len(group.token_ids[0]))
            texts.append(tokenizer.decode([prompt[-1]] + tokens, skip_special_tokens=True))
        # No ground truth here: passing the answered grade as the label with gate="pred" makes the
        # verifier's logic gate exactly "the trace's rules imply the answered grade" (y_hat == y_dec).
        verdict = verify_batch(texts, grades, self.encoder.rulebook, RewardConfig(gate="pred"))
        out = []
        for i, (text, group) in enumerate(zip(texts, groups)):
            out.append({"trace": text, "verdict": {
                "format": bool(verdict.fmt[i]), "consistent": bool(verdict.cst[i]), "logic": bool(verdict.logic[i]),
                "y_dec": optional_label(verdict.y_dec[i]), "y_final": optional_label(verdict.y_final[i]),
                "y_hat": optional_label(verdict.y_hat[i]),
                "values": {name: verdict.value_strings(j)[i] for j, name in enumerate(VALUE_NAMES)},
                "finished": bool(group.finished[0])}})
        return out


VALUE_NAMES = ("step4", "step5", "step6", "step7", "step8")


def optional_label(value) -> int | None:
    return int(value) if value >= 0 else None


def strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else list(tokens)


# ----------------------------------------------------------------------------------------------
# Completions: token strings, stop sequences, logprobs
# ----------------------------------------------------------------------------------------------

def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each token adds to the decoded string. A token that ends inside a multi-byte
    character adds nothing until the token completing it; pieces always concatenate to the
    decoded text."""
    pieces, prev = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
        if text.endswith("\ufffd") and k + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(text[len(prev):] if text.startswith(prev) else text)
        prev = text
    return pieces


def first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def completion_choice(tokenizer, group, j: int, index: int, stops: list[str], logprobs: int | None,
                      as_ids: bool, eos: set[int]) -> tuple[dict, int]:
    """One OpenAI choice from sample j of a RolloutGroup, and how many tokens it returns."""
    tokens = strip_eos(group.token_ids[j], eos)
    finish = "stop" if group.finished[j] else "length"
    if not stops and logprobs is None:
        return {"index": index, "text": tokenizer.decode(tokens, skip_special_tokens=True), "logprobs": None,
                "finish_reason": finish}, len(tokens)
    pieces = token_pieces(tokenizer, tokens)
    offsets = np.cumsum([0] + [len(p) for p in pieces])
    text = "".join(pieces)
    cut = first_stop(text, stops)
    if cut is not None:      # the stop sequence is not returned, nor the tokens starting after it
        text, finish = text[:cut], "stop"
        keep = int(np.searchsorted(offsets[:-1], cut, side="left"))
        tokens, pieces = tokens[:keep], pieces[:keep]
    lp = None
    if logprobs is not None:
        name = (lambda t, piece: f"token_id:{t}") if as_ids else (lambda t, piece: piece)
        top = group.top_logprobs[j] if logprobs else None
        lp = {"tokens": [name(t, p) for t, p in zip(tokens, pieces)],
              "token_logprobs": group.logprobs[j][:len(tokens)],
              "top_logprobs": [{name(t, tokenizer.decode([t])): v for t, v in top[k]} for k in range(len(tokens))]
              if top is not None else None,
              "text_offset": [int(o) for o in offsets[:len(tokens)]]}
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}, len(tokens)


UNSUPPORTED_DEFAULTS = {"echo": False, "stream": False, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                        "suffix": None}


def check_completion_request(req, vocab_size: int, max_rows: int) -> list:
    for name, default in UNSUPPORTED_DEFAULTS.items():
        value = getattr(req, name)
        if value is not None and value != default:
            raise ApiError(400, f"{name}: not supported by this server (only {default!r})", name, "unsupported")
    if req.best_of not in (None, 1, req.n):
        raise ApiError(400, "best_of: not supported by this server (leave it unset)", "best_of", "unsupported")
    if req.logit_bias:
        raise ApiError(400, "logit_bias: not supported by this server", "logit_bias", "unsupported")
    prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
        else [req.prompt]
    if not prompts:
        raise ApiError(400, "prompt: empty list", "prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ApiError(400, f"prompt[{i}]: empty prompt", f"prompt[{i}]")
        if isinstance(p, list):
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise ApiError(400, f"prompt[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab_size})",
                               f"prompt[{i}]")
    if len(prompts) * req.n > max_rows:
        raise ApiError(400, f"n: {len(prompts)} prompts x n={req.n} = {len(prompts) * req.n} samples, more than "
                            f"the limit of {max_rows} per request", "n")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"stop: at most 4 stop sequences, got {len(stops)}", "stop")
    return prompts


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------

def fastapi_options(fastapi_class) -> dict:
    """FastAPI >= 0.160 traces every request with OpenTelemetry unless told not to, looking up the
    global tracer, meter and logger providers per request even when none is configured. This
    service has its own Prometheus metrics; that per-request work is turned off where the option
    exists."""
    import inspect

    if "telemetry" in inspect.signature(fastapi_class.__init__).parameters:
        return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
    return {}


def create_app(backend, cfg: ServeConfig, encoder: PromptEncoder, worker: ThreadPoolExecutor):
    """The FastAPI app serving `backend`. `worker` is the single thread all inference runs in."""
    from fastapi import FastAPI, Request
    from pydantic import ValidationError
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    Pair, ScoreRequest, CompletionRequest, RerankRequest = request_models()
    cfg.check()
    svc = Service(backend, cfg, encoder, worker)
    vocab_size = len(encoder.tokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.batcher = Batcher(svc.score_jobs, worker, cfg, svc.metrics)
        svc.tokenizer_stage = TokenizeStage(svc.encode_jobs, svc.tokenize_pool)
        svc.generator = GenerationMerger(backend.generate, worker, cfg, svc.metrics)
        tasks = [asyncio.create_task(svc.batcher.run()), asyncio.create_task(svc.tokenizer_stage.run()),
                 asyncio.create_task(svc.generator.run())]
        try:
            yield
        finally:
            # uvicorn gets here after the requests in flight have been answered
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            svc.tokenize_pool.shutdown(wait=False)
            # here, not after server.run(): uvicorn re-raises the SIGTERM it caught once it is done
            await asyncio.get_running_loop().run_in_executor(worker, backend.close)
            worker.shutdown(wait=False)

    app = FastAPI(title="afrl-fast scoring service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  **fastapi_options(FastAPI))
    svc.metrics = Metrics(lambda: svc.batcher.pending if svc.batcher is not None else 0,
                          lambda: svc.pending_rows)
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.param, exc.code,
                                       "server_error" if exc.status >= 500 else "invalid_request_error"),
                            status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        error = invalid(exc.errors())
        return JSONResponse(error_body(error.message, error.param, error.code), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(f"{request.url.path}: {exc.detail}", None, str(exc.status_code)),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", None, "internal_error",
                                       "server_error"), status_code=500)

    # The scoring routes are plain Starlette routes: the body is validated straight from its bytes
    # (pydantic's JSON parser), without FastAPI's per-request dependency machinery, which cost a
    # third of the event loop's time per pair at 32 clients. Errors keep the same shape.
    async def parse(request: Request, model):
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as e:
            raise invalid(e.errors()) from None

    async def score(request: Request):
        req = await parse(request, ScoreRequest)
        if len(req.pairs) > cfg.max_request_pairs:
            svc.metrics.rejected.labels("too_many_pairs").inc()
            raise ApiError(413, f"pairs: {len(req.pairs)} pairs, more than the limit of {cfg.max_request_pairs} "
                                "per request", "pairs", "too_many_pairs")
        ids, probs, truncated = await svc.score(req.pairs)
        grades = probs.argmax(1).tolist()
        scores = expected_score(probs).tolist()
        cut = set(truncated)
        results = [{"id": pair.id, "grade": grades[i], "probs": probs[i].tolist(), "score": scores[i],
                    "truncated": i in cut} for i, pair in enumerate(req.pairs)]
        if req.explain:
            for result, extra in zip(results, await svc.explain(ids, grades)):
                result.update(extra)
        # a Response skips FastAPI's generic encoder: the content is plain JSON types already
        return JSONResponse({"model": cfg.model_name, "results": results,
                             "usage": {"pairs": len(ids), "prompt_tokens": sum(map(len, ids))}})

    async def rerank(request: Request):
        req = await parse(request, RerankRequest)
        if req.documents is not None and req.texts is not None:
            raise ApiError(422, "texts: give the candidates as documents or as texts, not both", "texts")
        name, docs = ("texts", req.texts) if req.documents is None else ("documents", req.documents)
        if docs is None:
            raise ApiError(422, "documents: required field missing", "documents")
        if None not in (req.return_documents, req.return_text) and req.return_documents != req.return_text:
            raise ApiError(422, "return_text: contradicts return_documents (return_text is TEI's name for it)",
                           "return_text")
        if len(docs) > cfg.rerank_limit:
            svc.metrics.rejected.labels("too_many_documents").inc()
            raise ApiError(413, f"{name}: {len(docs)} documents, more than the limit of {cfg.rerank_limit} per "
                                "request", name, "too_many_documents")
        ids, probs, truncated = await svc.rerank(req.query, docs, name)
        scores = expected_score(probs) / 4.0
        order = np.argsort(-scores, kind="stable")[:req.top_n or len(docs)].tolist()
        with_text = next((v for v in (req.return_documents, req.return_text) if v is not None), True)
        scores, cut = scores.tolist(), set(truncated)
        results = []
        for i in order:
            result = {"index": i, "relevance_score": scores[i]}
            if with_text:
                result["document"] = {"text": docs[i]}
            if req.return_grades:
                result["grade"] = int(probs[i].argmax())
                result["probs"] = probs[i].tolist()
            if i in cut:
                result["truncated"] = True
            results.append(result)
        tokens = sum(map(len, ids))
        return JSONResponse({"id": f"rerank-{uuid.uuid4().hex}", "model": cfg.model_name, "results": results,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    app.add_route("/v1/score", score, methods=["POST"])
    app.add_route("/v1/rerank", rerank, methods=["POST"])
    app.add_route("/rerank", rerank, methods=["POST"])

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = check_completion_request(req, vocab_size, cfg.max_completion_rows)
        if isinstance(prompts[0], str):
            prompts = await asyncio.get_running_loop().run_in_executor(
                svc.tokenize_pool, lambda: encoder.tokenizer(prompts)["input_ids"])
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        for i, p in enumerate(prompts):
            if backend.context_tokens and len(p) + max_tokens > backend.context_tokens:
                raise ApiError(400, f"prompt[{i}]: {len(p)} prompt tokens + max_tokens {max_tokens} exceed the "
                                    f"model's context of {backend.context_tokens}", f"prompt[{i}]",
                               "context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        temperature = 1.0 if req.temperature is None else req.temperature
        groups = await svc.run_generation(prompts, n=req.n, temperature=temperature,
                                          top_p=1.0 if req.top_p is None else req.top_p, max_tokens=max_tokens,
                                          seed=req.seed, top_logprobs=req.logprobs or 0)
        eos = set(backend.eos_ids)
        choices, n_out = [], 0
        for p, group in enumerate(groups):
            for j in range(req.n):
                choice, used = completion_choice(encoder.tokenizer, group, j, p * req.n + j, stops, req.logprobs,
                                                 req.return_tokens_as_token_ids, eos)
                choices.append(choice)
                n_out += used
                svc.metrics.generated.inc(len(group.token_ids[j]))
        n_in = sum(map(len, prompts))
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                             "created": int(time.time()), "model": cfg.model_name, "choices": choices,
                             "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "afrl-fast"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "backend": backend.kind, "device": backend.device,
                "prefix_tokens": backend.prefix_tokens, "query_prefix": svc.query_sharing,
                "max_prompt_tokens": svc.prompt_limit, "max_rerank_documents": cfg.rerank_limit,
                "queue_pairs": svc.batcher.queue.qsize() if svc.batcher else 0}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, metrics=svc.metrics)
    app.add_middleware(RequestMetrics, metrics=svc.metrics)
    return app


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def parse_engine_args(items: list[str]) -> dict:
    """--sglang-arg KEY=VALUE pairs -> Engine keyword arguments (values parsed as YAML scalars)."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ServeError(f"--sglang-arg must be KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m afrl_fast.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (save_pretrained export, Qwen3 tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--instructions", default=None,
                    help="system prompt: full, short or a text file; default: the one saved with the model, else full")
    ap.add_argument("--rulebook", help="rulebook YAML (default: the copy in the model folder, else the default)")
    ap.add_argument("--backend", default="embedded", choices=BACKENDS)
    ap.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for inference; default on CPU: one per core but one, which the event "
                         "loop and the tokenizer need")
    ap.add_argument("--max-batch", type=int, default=64, help="pairs per inference batch")
    ap.add_argument("--forward-rows", type=int, default=None,
                    help="rows per forward pass within a batch (embedded backend); default: 8 on a CPU, where "
                         "small length-sorted forwards pad less and stay in cache, else --max-batch")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a pair waits for its batch to fill")
    ap.add_argument("--max-queue", type=int, default=1024, help="pairs waiting before requests get 503")
    ap.add_argument("--max-request-pairs", type=int, default=256)
    ap.add_argument("--max-rerank-documents", type=int, default=1000,
                    help="candidate documents per rerank request (at most --max-queue)")
    ap.add_argument("--max-body-bytes", type=int, default=8 << 20)
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context length")
    ap.add_argument("--truncate", action="store_true",
                    help="cut the document of an over-long pair to fit instead of answering 400")
    ap.add_argument("--explain-max-tokens", type=int, default=512)
    ap.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    ap.add_argument("--no-prefix-cache", action="store_true", help="prefill whole prompts (for comparison)")
    ap.add_argument("--no-query-prefix", action="store_true",
                    help="rerank: do not share a query's prefix across its candidates, only the system prefix "
                         "(for comparison)")
    ap.add_argument("--sglang-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to sglang.Engine, e.g. tp_size=2 mem_fraction_static=0.8")
    ap.add_argument("--graceful-timeout", type=float, default=60.0,
                    help="seconds SIGTERM waits for requests in flight")
    ap.add_argument("--log-level", default="warning")
    return ap.parse_args(argv)


def build(args):
    """(app, backend) from parsed flags; ServeError & co. for anything that cannot start."""
    cfg = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      max_request_pairs=args.max_request_pairs, max_body_bytes=args.max_body_bytes,
                      max_rerank_documents=args.max_rerank_documents, query_prefix=not args.no_query_prefix,
                      max_prompt_tokens=args.max_prompt_tokens, truncate=args.truncate,
                      explain_max_tokens=args.explain_max_tokens,
                      model_name=args.served_model_name or Path(args.model).resolve().name)
    cfg.check()
    if args.threads is not None and args.threads < 1:
        raise ServeError(f"--threads must be >= 1, got {args.threads}")
    if args.forward_rows is not None and args.forward_rows < 1:
        raise ServeError(f"--forward-rows must be >= 1, got {args.forward_rows}")
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.backend == "embedded" and pick_device(args.device) == "cpu":
        # Inference threads spin-wait at every op; one sharing a core with the event loop stalls both.
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    if not Path(args.model).is_dir():
        raise ServeError(f"{args.model}: model folder not found")
    prompt = resolve_prompt_settings(args.model, args.rulebook, args.instructions)
    sglang_kwargs = parse_engine_args(args.sglang_arg)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    worker = ThreadPoolExecutor(1, thread_name_prefix="afrl-infer")
    backend = worker.submit(load_backend, args.backend, args.model, prompt, device=args.device, dtype=args.dtype,
                            max_batch=args.max_batch, share_prefix=not args.no_prefix_cache,
                            forward_rows=args.forward_rows,
                            sglang_kwargs=sglang_kwargs).result()
    encoder = PromptEncoder(backend.tokenizer, prompt.rulebook, prompt.instructions)
    log.warning("prompt: %s; shared prefix %d tokens", prompt.source, backend.prefix_tokens)
    return create_app(backend, cfg, encoder, worker), backend


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        import uvicorn

        app, backend = build(args)
    except ImportError as e:
        print(f"error: the service needs its extra: pip install 'afrl-fast[serve]' ({e})", file=sys.stderr)
        return 2
    except (ServeError, ScoringError, FormatError, RulebookError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=False, timeout_graceful_shutdown=args.graceful_timeout))
    print(f"serving {args.model} ({backend.kind}, {backend.device}) on http://{args.host}:{args.port}", flush=True)
    server.run()        # after a SIGTERM, uvicorn ends the process by that signal once requests are answered
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
