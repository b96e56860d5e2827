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

Reasoning models may wrap thinking in <think>…</think> before the answer. `strip_thinking` removes
one leading block (and nothing else): an AFRL response must begin with its grade, so the thinking
is not part of the trace, and everything after the block is kept verbatim for the verifier.
"""
from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

APIS = ("completions", "chat")
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
    finish_reason: str
    first_top_logprobs: dict | None = None     # token text -> log-prob at the first generated position


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, usage) -> None:
        self.requests += 1
        if usage is not None:
            self.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)


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
    usage: Usage = field(default_factory=Usage)

    def __post_init__(self):
        if self.api not in APIS:
            raise EndpointError(f"api must be one of {APIS}, got {self.api!r}")
        if self.concurrency < 1 or self.retries < 0 or not self.timeout > 0:
            raise EndpointError(f"{self.url}: concurrency ≥ 1, retries ≥ 0 and timeout > 0 are required")
        self._base = base_url(self.url)
        self._client = None
        self._sem = None

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
        """n completions of one prompt (completions API) or one message list (chat API); the
        request's token counts are added to `self.usage` and to `usage` when given."""
        import openai

        client = self._ensure_client()
        try:
            async with self._sem:
                if self.api == "completions":
                    resp = await client.completions.create(
                        model=self.model, prompt=prompt, n=n, temperature=temperature, max_tokens=max_tokens,
                        seed=seed, logprobs=top_logprobs, stop=stop)
                    self._count(resp.usage, usage)
                    return [Choice(c.text or "", c.finish_reason or "stop", _first_completion_logprobs(c))
                            for c in sorted(resp.choices, key=lambda c: c.index)]
                resp = await client.chat.completions.create(
                    model=self.model, messages=messages, n=n, temperature=temperature, max_tokens=max_tokens,
                    seed=seed, logprobs=top_logprobs is not None or None, top_logprobs=top_logprobs, stop=stop)
                self._count(resp.usage, usage)
                return [Choice(c.message.content or "", c.finish_reason or "stop", _first_chat_logprobs(c))
                        for c in sorted(resp.choices, key=lambda c: c.index)]
        except openai.RateLimitError as e:
            raise EndpointError(f"{self.url}: still rate-limited (429) after {self.retries} retries: "
                                f"{_short(e)}") from None
        except openai.APIStatusError as e:
            if 400 <= e.status_code < 500:
                raise RequestRefused(f"{e.status_code}: {_short(e)}") from None
            raise EndpointError(f"{self.url}: server error {e.status_code} after {self.retries} retries: "
                                f"{_short(e)}") from None
        except openai.APITimeoutError:         # before its base class APIConnectionError: it answered nothing in time
            raise EndpointError(f"{self.url}: no answer within the {self.timeout:g} s timeout, "
                                f"{self.retries} retries") from None
        except openai.APIConnectionError as e:
            raise EndpointError(f"{self.url}: unreachable after {self.retries} retries ({_short(e)})") from None
        except openai.OpenAIError as e:        # e.g. a body that is not a completion
            raise EndpointError(f"{self.url}: unusable response: {_short(e)}") from None


    def _count(self, reported, usage: Usage | None) -> None:
        self.usage.add(reported)
        if usage is not None:
            usage.add(reported)


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _first_completion_logprobs(choice) -> dict | None:
    lp = getattr(choice, "logprobs", None)
    tops = getattr(lp, "top_logprobs", None) if lp is not None else None
    return dict(tops[0]) if tops else None


def _first_chat_logprobs(choice) -> dict | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if not content:
        return None
    return {t.token: t.logprob for t in (content[0].top_logprobs or [])}
