"""The service: what the routes share. It owns the backend and the threads around it: prompts are
tokenised in the tokenizer thread (`TokenizeStage`), scored in batches in the single inference
thread (`Batcher`), and generated there too (`GenerationMerger`); `start` runs those three tasks
for the app's lifespan and `stop` ends them and closes the backend."""
import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ScoringError
from ..prompt_encoding import PromptEncoder, PromptPieces
from ..engines import RolloutGroup
from ..verify import RewardConfig, verify_batch
from .batching import (Batcher, EncodeJob, GenerationMerger, GenJob, Job, Overloaded, TokenizeStage,
                       request_seeds)
from .completions import strip_eos
from .config import ServeConfig
from .errors import ApiError, ServeError
from .metrics import Metrics

log = logging.getLogger("afrl_fast.serve")
CLOSE_TIMEOUT_S = 30


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

    tasks: list = field(default_factory=list)

    def __post_init__(self):
        pieces = PromptPieces(self.encoder)
        if pieces.ok:
            self.pieces = pieces
        else:
            log.warning("the chat template cannot be cut around the user message with the same token ids; "
                        "every prompt is rendered and tokenised whole")
        if self.metrics is None:
            self.metrics = Metrics(lambda: self.batcher.pending if self.batcher is not None else 0,
                                   lambda: self.pending_rows)

    def check_room(self) -> None:
        """ServeError when no pair can fit: the prompt's fixed part (system prompt and chat
        template) alone fills the prompt limit, so every score would be refused."""
        fixed = len(self.encoder.encode(self.encoder.prompt_text("q", "d")))
        if fixed >= self.prompt_limit:
            limit = (f"--max-prompt-tokens {self.cfg.max_prompt_tokens}" if self.cfg.max_prompt_tokens
                     else f"the model's context of {self.prompt_limit} tokens")
            raise ServeError(f"{limit} leaves no room for a pair: the prompt without query and document (system "
                             f"prompt and chat template) is already {fixed} tokens; use shorter --instructions or "
                             "a longer limit")

    @property
    def vocab_size(self) -> int:
        return len(self.encoder.tokenizer)

    # --- life cycle (the app's lifespan) -------------------------------------------------------

    def start(self) -> None:
        """Start the tokenizer stage, the batcher and the generation merger (on the running loop)."""
        self.batcher = Batcher(self.score_jobs, self.worker, self.cfg, self.metrics)
        self.tokenizer_stage = TokenizeStage(self.encode_jobs, self.tokenize_pool)
        self.generator = GenerationMerger(self.backend.generate, self.worker, self.cfg, self.metrics)
        self.tasks = [asyncio.create_task(self.batcher.run()), asyncio.create_task(self.tokenizer_stage.run()),
                      asyncio.create_task(self.generator.run())]

    async def stop(self) -> None:
        """End the three tasks and close the backend. uvicorn calls this after the requests in
        flight have been answered; the backend is closed here, not after server.run(), because
        uvicorn re-raises the SIGTERM it caught once it is done."""
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tokenize_pool.shutdown(wait=False)
        # The close queues behind the engine call still running (a long generation whose request
        # --graceful-timeout cancelled): bounded, so a drain stays bounded too.
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.worker, self.backend.close),
                                   CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("the backend did not close within %d s (an engine call still running); exiting anyway",
                        CLOSE_TIMEOUT_S)
        self.worker.shutdown(wait=False)

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
                    self.check_queries(job, ids)
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

    def check_queries(self, job: EncodeJob, ids: list[list[int]]) -> None:
        """Without --truncate: ScoringError (its `row` set) for an over-long prompt that would be
        too long even without its document, so the error names the query, not the document, and
        does not suggest --truncate. Only over-long prompts are re-tokenised (the error path)."""
        limit = self.prompt_limit
        for i, row in enumerate(ids):
            if len(row) > limit:
                bare = len(self.encoder.encode(self.encoder.prompt_text(job.queries[i], "")))
                if bare > limit:
                    error = ScoringError(f"the prompt without its document is already {bare} tokens, more than "
                                         f"the model's limit of {limit}; shorten the query")
                    error.row = i
                    raise error

    def truncate(self, job: EncodeJob, ids: list[list[int]]) -> list[int]:
        """With --truncate, cut the document of each over-long prompt (in place); the rows cut."""
        if not self.cfg.truncate:
            self.check_queries(job, ids)
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
        self.metrics.generated.inc(sum(len(group.token_ids[0]) for group in groups))
        # decoding and verifying up to --max-request-pairs traces: in the tokenizer thread, off the event loop
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, self.explained, prompts,
                                                                grades, groups)

    def explained(self, prompts: list[list[int]], grades: list[int], groups: list[RolloutGroup]) -> list[dict]:
        """Per pair its trace (the grade token and what followed) and the verifier's verdict."""
        tokenizer, eos = self.encoder.tokenizer, set(self.backend.eos_ids)
        texts = [tokenizer.decode([prompt[-1]] + strip_eos(group.token_ids[0], eos), skip_special_tokens=True)
                 for prompt, group in zip(prompts, groups)]
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
