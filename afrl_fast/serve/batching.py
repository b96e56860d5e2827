"""Dynamic batching: requests meet in queues so that one engine call serves many clients.

* `TokenizeStage`: every request waiting to be tokenised goes into one tokenizer call, in the
  tokenizer thread.
* `Batcher`: the pairs of every request (a rerank's candidates as one job) form batches for the
  single inference thread; a batch is handed over before the previous one's requests are answered.
* `GenerationMerger`: completion and explain requests with the same sampling settings decode in
  one engine call.

A full queue raises `Overloaded` (the service answers 503); an engine call that fails fails the
requests of its batch only.
"""
import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..engines import RolloutGroup
from .config import ServeConfig
from .metrics import Metrics

log = logging.getLogger("afrl_fast.serve")


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
