"""The wire protocol: the pydantic models of every request and response body.

Requests are validated with these models straight from the body's bytes (`model_validate_json`);
a field they refuse is answered 422 naming it (`errors.invalid`). The scoring responses are built
as plain dicts on the hot path (a pydantic object per pair would cost more than the pair's
inference share); the response models here document their shape and the tests hold the service to
them.
"""
from typing import Annotated

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt,
                      StrictStr)


# What a text made only of is blank: whitespace, the C0/C1 control characters (NUL among them:
# str.strip() keeps it, and a NUL-only document would be scored as if it said something) and the
# invisible format characters (zero-width spaces and joiners, marks, the BOM).
INVISIBLE = ("".join(map(chr, range(0x20))) + "".join(map(chr, range(0x7f, 0xa1))) + " \u00ad\u034f\u061c"
             "\u115f\u1160\u1680\u180e" + "".join(map(chr, range(0x2000, 0x2010))) + "\u2028\u2029\u202a\u202b"
             "\u202c\u202d\u202e\u202f\u205f\u2060\u2061\u2062\u2063\u2064\u3000\u3164\ufeff\uffa0")


def not_blank(value: str) -> str:
    # str.strip(chars) runs in C and stops at the first visible character: nothing for real text
    if not value.strip(INVISIBLE):
        raise ValueError("must not be blank (only whitespace, control or invisible characters)")
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


class Strict(BaseModel):
    """Unknown fields are refused by name rather than ignored: a misspelt option would otherwise
    silently do nothing."""
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------

class Pair(Strict):
    query: NonBlank
    document: NonBlank
    id: StrictStr | None = None


class ScoreRequest(Strict):
    pairs: Annotated[list[Pair], Field(min_length=1)]
    explain: StrictBool = False


class RerankRequest(Strict):
    """The rerank request of Cohere, Jina, vLLM and TEI (`texts` for `documents`, `return_text`
    for `return_documents`); `return_grades` is ours."""
    model: StrictStr | None = None
    query: NonBlank
    documents: Documents | None = None
    texts: Documents | None = None
    top_n: StrictInt | None = Field(None, ge=0)
    return_documents: StrictBool | None = None
    return_text: StrictBool | None = None
    return_grades: StrictBool = False


class CompletionRequest(Strict):
    """The OpenAI completions request. Accepted but unsupported options must keep their default
    value (`completions.UNSUPPORTED_DEFAULTS`); anything else is refused by name."""
    model: StrictStr | None = None
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    n: StrictInt = Field(1, ge=1, le=128)
    max_tokens: StrictInt | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    # numpy seeds the per-prompt generators; a negative seed has no defined meaning there
    seed: StrictInt | None = Field(None, ge=0, le=2**64 - 1)
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


# ----------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------

class Verdict(BaseModel):
    """The verifier on an explained pair's trace (see afrl_fast.verify)."""
    format: bool
    consistent: bool
    logic: bool
    y_dec: int | None
    y_final: int | None
    y_hat: int | None
    values: dict[str, str | None]
    finished: bool


class ScoreResult(BaseModel):
    id: str | None
    grade: int
    probs: list[float]          # P(grade = 0..4), renormalised over the five label tokens
    score: float                # the expected grade, sum k * p_k
    truncated: bool
    trace: str | None = None    # with "explain": true
    verdict: Verdict | None = None


class ScoreUsage(BaseModel):
    pairs: int
    prompt_tokens: int


class ScoreResponse(BaseModel):
    model: str
    results: list[ScoreResult]
    usage: ScoreUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float      # the expected grade / 4, in [0, 1]
    document: RerankDocument | None = None
    grade: int | None = None
    probs: list[float] | None = None
    truncated: bool | None = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]     # sorted by relevance_score, best first
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "afrl-fast"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: str
    model: str
    backend: str
    device: str
    prefix_tokens: int
    query_prefix: bool
    max_prompt_tokens: int
    max_rerank_documents: int
    queue_pairs: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
