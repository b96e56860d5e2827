"""The limits and batching of one service: the CLI flags of the same names (`cli`)."""
from dataclasses import dataclass, field

from .errors import ServeError


@dataclass
class ServeConfig:
    max_batch: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 1024            # pairs waiting to be scored, and rows waiting to be generated
    max_request_pairs: int = 256
    max_body_bytes: int = 8 << 20
    max_prompt_tokens: int | None = None    # default: the model's context length
    truncate: bool = False
    explain_max_tokens: int = 512
    max_completion_rows: int = 256  # prompts x n of one completions request
    # prompts x n x max_tokens of one completions request: what a response body can grow to (with
    # logprobs=k each token also carries k alternatives, counted by max_logprob_entries)
    max_completion_tokens: int = 32768
    max_logprob_entries: int = 65536
    max_rerank_documents: int = 1000    # candidates of one rerank request (at most max_queue count)
    query_prefix: bool = True       # rerank: prefill a query's part of the prompt once for its candidates
    retry_after_s: int = 1
    body_timeout_s: float = 30.0    # a request's whole body must arrive within this (slow clients)
    model_name: str = "afrl"
    # names a request's "model" may carry besides model_name: "default" is what SGLang's clients
    # (and afrl_fast.piar) send when the server has one model
    model_aliases: tuple = ("default",)
    api_key: str | None = field(default=None, repr=False)      # never printed with the config

    def serves(self, name: str | None) -> bool:
        """Whether a request naming `name` (None: no model named) is for this service's model."""
        return name is None or name == self.model_name or name in self.model_aliases

    @property
    def rerank_limit(self) -> int:
        """Candidates one rerank request may send: a request must fit the queue whole."""
        return min(self.max_rerank_documents, self.max_queue)

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_request_pairs", "max_body_bytes", "explain_max_tokens",
                     "max_completion_rows", "max_completion_tokens", "max_logprob_entries", "max_rerank_documents",
                     "retry_after_s"):
            if getattr(self, name) < 1:
                raise ServeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.max_wait_ms >= 0:
            raise ServeError(f"--max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if not self.body_timeout_s > 0:
            raise ServeError(f"--body-timeout must be > 0, got {self.body_timeout_s}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ServeError(f"--max-prompt-tokens must be >= 1, got {self.max_prompt_tokens}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServeError("--api-key must not be empty")
