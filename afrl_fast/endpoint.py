"""An OpenAI-compatible endpoint as the data stages use it (trace synthesis, PIAR).

Any server that speaks the OpenAI completions or chat-completions API works: SGLang's
`python -m sglang.launch_server`, vLLM, or this project's `python -m afrl_fast.serve`. The client is
the `openai` package's AsyncOpenAI, which already retries 429, 5xx, timeouts and connection errors
with exponential backoff (honouring Retry-After); this module adds bounded concurrency, one error
type naming the URL, and the two prompt modes:

- `api="completions"`: the prompt is text rendered with the model's chat template by the caller
  (`afrl_fast.format.build_prompt` for AFRL prompts, `chat_prompt` for plain messages), so a base or
  fine-tuned model sees exactly what the trainer feeds it;
- `api="chat"`: the messages go to /chat/completions and the server applies its own template.

Every answer is read as plain JSON and checked before anything is taken from it: a body that is not
JSON (an HTML page from a proxy, a truncated body), not an object, without a `choices` list, with
another number of choices than the `n` asked for, or with malformed choices or log-probs is an
EndpointError naming the URL and what was wrong (one line for the CLIs), never an AttributeError
deep inside a caller. A refusal (a 4xx other than 429) is one item's problem (RequestRefused), but
`max_refusals` refusals in a row mean the endpoint refuses everything (a wrong model name, as vLLM
answers it): the next one is an EndpointError, and `check_answered` says the same for a run whose
every request was refused.

Reasoning models may wrap thinking in <think>…</think> before the answer. `strip_thinking` removes
one leading block (and nothing else): an AFRL response must begin with its grade, so the thinking
is not part of the trace, and everything after the block is kept verbatim for the verifier.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

APIS = ("completions", "chat")
API_KEY_ENV = "AFRL_FAST_API_KEY"   # the key a served judge asks for (`serve --api-key`) and its clients send
MAX_REFUSALS = 8         # refusals in a row after which the endpoint, not the item, is at fault
_THINK = re.compile(r"\A\s*<think>.*?</think>\s*", re.DOTALL)


class EndpointError(RuntimeError):
    """The endpoint cannot be used: unreachable after the retries, or it refuses every request."""


class RequestRefused(ValueError):
    """One request was refused with a 4xx other than 429 (a prompt too long, a bad parameter):
    the caller records it against that item and goes on."""


def base_url(url: str) -> str:
    """The server's OpenAI base URL: `http://host:port` or `http://host:port/v1` both mean .../v1."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EndpointError(f"{url}: not an http(s) URL")
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path if path.endswith('/v1') else path + '/v1'}"


def strip_thinking(text: str) -> str:
    return _THINK.sub("", text, count=1)


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """Plain chat messages as completion text in the model's own template (thinking disabled)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


@dataclass
class Choice:
    text: str
    finish_reason: str                         # as the server says: stop, length, abort, ... (a missing one: stop)
    first_top_logprobs: dict | None = None     # token text -> log-prob at the first generated position


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, usage: dict | None) -> None:
        """One answered request and the token counts its `usage` object reports (counts that are
        not non-negative integers are not counted)."""
        self.requests += 1
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "completion_tokens"):
                value = usage.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    setattr(self, key, getattr(self, key) + value)


@dataclass
class Endpoint:
    """One OpenAI-compatible server and model. `usage` counts what this process asked of it."""
    url: str
    model: str
    api: str = "completions"
    concurrency: int = 32
    timeout: float = 120.0
    retries: int = 5
    api_key: str | None = None
    max_refusals: int = MAX_REFUSALS
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self):
        if self.api not in APIS:
            raise EndpointError(f"api must be one of {APIS}, got {self.api!r}")
        if self.concurrency < 1 or self.retries < 0 or not (math.isfinite(self.timeout) and self.timeout > 0):
            raise EndpointError(f"{self.url}: concurrency ≥ 1, retries ≥ 0 and a finite timeout > 0 are required "
                                f"(got {self.concurrency}, {self.retries}, {self.timeout})")
        self._base = base_url(self.url)
        self._client = None
        self._sem = None
        self.answered = 0              # requests answered with a usable body
        self.refused = 0               # requests refused (4xx other than 429)
        self._refused_in_a_row = 0
        self._last_refusal = ""

    def _ensure_client(self):
        if self._client is None:       # created inside the running loop that uses it
            import openai
            self._client = openai.AsyncOpenAI(base_url=self._base, timeout=self.timeout, max_retries=self.retries,
                                              api_key=self.api_key or os.environ.get("OPENAI_API_KEY") or "none")
            self._sem = asyncio.Semaphore(self.concurrency)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def generate(self, *, prompt: str | None = None, messages: list[dict] | None = None, n: int = 1,
                       temperature: float = 1.0, max_tokens: int = 1024, seed: int | None = None,
                       top_logprobs: int | None = None, stop: list[str] | None = None,
                       usage: Usage | None = None) -> list[Choice]:
        """n completions of one prompt (completions API) or one message list (chat API), exactly n
        and in index order; the request's token counts are added to `self.usage` and to `usage`
        when given. RequestRefused for a refused request, EndpointError for an endpoint that cannot
        be used (unreachable, failing, refusing everything, or answering something else)."""
        import openai

        client = self._ensure_client()
        try:
            async with self._sem:
                if self.api == "completions":
                    raw = await client.completions.with_raw_response.create(
                        model=self.model, prompt=prompt, n=n, temperature=temperature, max_tokens=max_tokens,
                        seed=seed, logprobs=top_logprobs, stop=stop)
                else:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=self.model, messages=messages, n=n, temperature=temperature, max_tokens=max_tokens,
                        seed=seed, logprobs=top_logprobs is not None or None, top_logprobs=top_logprobs, stop=stop)
                content = raw.content
        except openai.RateLimitError as e:
            raise EndpointError(f"{self.url}: still rate-limited (429) after {self.retries} retries: "
                                f"{_short(e)}") from None
        except openai.APIStatusError as e:
            if 400 <= e.status_code < 500:
                self._refusal(f"{e.status_code}: {_short(e)}")
                raise RequestRefused(f"{e.status_code}: {_short(e)}") from None
            raise EndpointError(f"{self.url}: server error {e.status_code} after {self.retries} retries: "
                                f"{_short(e)}") from None
        except openai.APITimeoutError:         # before its base class APIConnectionError: it answered nothing in time
            raise EndpointError(f"{self.url}: no answer within the {self.timeout:g} s timeout, "
                                f"{self.retries} retries") from None
        except openai.APIConnectionError as e:
            raise EndpointError(f"{self.url}: unreachable after {self.retries} retries ({_short(e)})") from None
        except openai.OpenAIError as e:
            raise EndpointError(f"{self.url}: unusable response: {_short(e)}") from None
        choices, reported = self._read_answer(content, n)
        self.answered += 1
        self._refused_in_a_row = 0
        self.usage.add(reported)
        if usage is not None:
            usage.add(reported)
        return choices

    def _refusal(self, why: str) -> None:
        self.refused += 1
        self._refused_in_a_row += 1
        self._last_refusal = why
        if self._refused_in_a_row >= self.max_refusals:
            raise EndpointError(f"{self.url}: refused {self._refused_in_a_row} requests in a row (model "
                                f"{self.model!r}), the last with {why}; check the model name and the request "
                                "settings")

    def check_answered(self) -> None:
        """EndpointError when this process sent requests and every one was refused (fewer than
        `max_refusals`, so generate did not say so already)."""
        if self.refused and not self.answered:
            raise EndpointError(f"{self.url}: refused every request ({self.refused}, model {self.model!r}), "
                                f"the last with {self._last_refusal}; check the model name and the request "
                                "settings")

    def _read_answer(self, content: bytes, n: int) -> tuple[list[Choice], dict | None]:
        """The n choices of a completion body, checked; EndpointError naming what is wrong."""
        route = "/completions" if self.api == "completions" else "/chat/completions"

        def bad(what: str):
            start = " ".join(content[:80].decode("utf-8", "replace").split())
            return EndpointError(f"{self.url}: unusable answer to {route}: {what} (the body starts {start!r}); "
                                 "is this an OpenAI-compatible server?")
        try:
            body = json.loads(content)
        except ValueError as e:                # JSONDecodeError, UnicodeDecodeError
            raise bad(f"not JSON ({getattr(e, 'msg', None) or type(e).__name__})") from None
        if not isinstance(body, dict):
            raise bad(f"a JSON {type(body).__name__}, not an object")
        choices = body.get("choices")
        if not isinstance(choices, list):
            raise bad(f"no 'choices' list (keys: {', '.join(sorted(map(str, body))[:6]) or 'none'})")
        if len(choices) != n:
            raise bad(f"asked for n={n} completions, the answer has {len(choices)} choices")
        if not all(isinstance(c, dict) for c in choices):
            raise bad("a choice that is not an object")
        indices = [c.get("index") for c in choices]
        if all(i is None for i in indices):
            ordered = choices
        elif sorted(i for i in indices if isinstance(i, int) and not isinstance(i, bool)) == list(range(n)):
            ordered = sorted(choices, key=lambda c: c["index"])
        else:
            raise bad(f"choice indices {indices[:8]} are not 0..{n - 1}")
        out = []
        for k, c in enumerate(ordered):
            if self.api == "completions":
                text = c.get("text")
            else:
                message = c.get("message")
                if not isinstance(message, dict):
                    raise bad(f"choice {k} has no 'message' object")
                text = message.get("content")
            finish = c.get("finish_reason")
            if not isinstance(text, (str, type(None))) or not isinstance(finish, (str, type(None))):
                raise bad(f"choice {k}: text and finish_reason must be strings")
            try:
                top = (_first_completion_logprobs if self.api == "completions" else _first_chat_logprobs)(c)
            except (TypeError, ValueError, AttributeError, KeyError, IndexError):
                raise bad(f"choice {k} has malformed logprobs") from None
            out.append(Choice(text or "", finish or "stop", top))
        reported = body.get("usage")
        return out, reported if isinstance(reported, dict) else None

def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _logprob(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a log-prob must be a number, got {value!r}")
    return float(value)


def _first_completion_logprobs(choice: dict) -> dict | None:
    """{token text: log-prob} at the first position of a completions choice, None without them."""
    lp = choice.get("logprobs")
    tops = lp.get("top_logprobs") if lp is not None else None
    if not tops or tops[0] is None:
        return None
    return {str(_text(token)): _logprob(v) for token, v in tops[0].items()}


def _first_chat_logprobs(choice: dict) -> dict | None:
    lp = choice.get("logprobs")
    content = lp.get("content") if lp is not None else None
    if not content:
        return None
    return {_text(t["token"]): _logprob(t["logprob"]) for t in (content[0].get("top_logprobs") or [])}


def _text(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a token must be a string, got {value!r}")
    return value


# ----------------------------------------------------------------------------- /v1/score of afrl_fast.serve

@dataclass
class ScoreEndpoint:
    """A first-token judge served by `python -m afrl_fast.serve`, asked through its /v1/score route.
    The `openai` client carries the request (its retries and backoff on 429, 5xx, timeouts and
    connection errors, as for completions); the answer is checked before anything is taken from it."""
    url: str
    batch_size: int = 64
    timeout: float = 120.0
    retries: int = 5
    api_key: str | None = None
    n_truncated: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.retries < 0 or not (math.isfinite(self.timeout) and self.timeout > 0):
            raise EndpointError(f"{self.url}: batch size ≥ 1, retries ≥ 0 and a finite timeout > 0 are required "
                                f"(got {self.batch_size}, {self.retries}, {self.timeout})")
        import openai
        self._base = base_url(self.url)
        self._client = openai.OpenAI(base_url=self._base, timeout=self.timeout, max_retries=self.retries,
                                     api_key=self.api_key or os.environ.get(API_KEY_ENV) or "none")

    def score_pairs(self, table, progress=None):
        """P(grade = 0..4) per pair of a pairs table [N, 5], in its row order (the interface of
        afrl_fast.scoring.FirstTokenScorer, so the same metrics follow); `progress.update(n)` after
        each batch when given (a tqdm bar)."""
        queries, docs = table.column("query").to_pylist(), table.column("document").to_pylist()
        probs = np.zeros((len(queries), 5))
        for start in range(0, len(queries), self.batch_size):
            stop = min(start + self.batch_size, len(queries))
            pairs = [{"query": q, "document": d} for q, d in zip(queries[start:stop], docs[start:stop])]
            probs[start:stop] = self._score(pairs, start)
            if progress is not None:
                progress.update(stop - start)
        return probs

    def _score(self, pairs: list[dict], first_row: int):
        import httpx
        import openai
        try:
            response = self._client.post("/score", body={"pairs": pairs}, cast_to=httpx.Response)
        except openai.APIStatusError as e:
            raise EndpointError(f"{self._base}/score refused rows {first_row}..{first_row + len(pairs) - 1} "
                                f"(HTTP {e.status_code}): {_short(e.response.text)}") from None
        except openai.APIError as e:
            raise EndpointError(f"{self._base}/score: {type(e).__name__}: {_short(e)}") from None
        try:
            results = json.loads(response.content)["results"]
            probs = np.array([r["probs"] for r in results], dtype=float)
            truncated = sum(bool(r["truncated"]) for r in results)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise EndpointError(f"{self._base}/score: the answer is not a score response "
                                f"({type(e).__name__}: {_short(e)})") from None
        if probs.shape != (len(pairs), 5) or not np.isfinite(probs).all():
            raise EndpointError(f"{self._base}/score: asked for {len(pairs)} pairs, got probabilities of shape "
                                f"{probs.shape} (finite: {bool(np.isfinite(probs).all())})")
        self.n_truncated += truncated
        return probs
