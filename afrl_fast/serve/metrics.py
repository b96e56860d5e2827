"""The service's Prometheus metrics (GET /metrics), in a registry of their own."""
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = ("/v1/score", "/v1/rerank", "/rerank", "/v1/completions", "/v1/models", "/health", "/metrics")


class Metrics:
    """Prometheus metrics of one service, in their own registry (several apps can live in one process)."""

    def __init__(self, queue_depth, generation_rows=lambda: 0):
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

    def exposition(self) -> tuple[bytes, str]:
        """(the text format of every metric, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
