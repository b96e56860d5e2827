"""OpenAI completions: the request's checks, token strings, stop sequences and logprobs of a choice."""
import numpy as np

from .config import ServeConfig
from .errors import ApiError, unknown_model


def strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in eos else list(tokens)


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
        sampled = group.logprobs[j][:len(tokens)]
        # The engine computes the sampled token's log-prob and the top-k list by two routes in
        # float32 (its sampler, a full log-softmax) that can differ in the 5th digit; a client
        # reads them as one number, so the sampled token's entry is its token_logprobs value.
        lp = {"tokens": [name(t, p) for t, p in zip(tokens, pieces)],
              "token_logprobs": sampled,
              "top_logprobs": [{name(t, tokenizer.decode([t])): sampled[k] if t == tokens[k] else v for t, v in top[k]}
                               for k in range(len(tokens))] if top is not None else None,
              "text_offset": [int(o) for o in offsets[:len(tokens)]]}
    return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}, len(tokens)


def completion_choices(tokenizer, groups, n: int, stops: list[str], logprobs: int | None, as_ids: bool,
                       eos: set[int]) -> tuple[list[dict], int]:
    """Every choice of a request (prompt-major) and the tokens they return. Decoding each token's
    piece costs a decode per token: run in the tokenizer thread, never on the event loop, where a
    large request would stall every other client and /health."""
    choices, n_out = [], 0
    for p, group in enumerate(groups):
        for j in range(n):
            choice, used = completion_choice(tokenizer, group, j, p * n + j, stops, logprobs, as_ids, eos)
            choices.append(choice)
            n_out += used
    return choices, n_out


UNSUPPORTED_DEFAULTS = {"echo": False, "stream": False, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                        "suffix": None}


def check_completion_request(req, vocab_size: int, cfg: ServeConfig) -> list:
    """The request's prompts (text, or token ids) after every check that needs no tokenizer: 400
    naming the field for what this server does not do or will not do at that size."""
    max_rows = cfg.max_completion_rows
    if not cfg.serves(req.model):
        raise unknown_model(req.model, cfg.model_name)
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
    # What the response can grow to: a token per sample and step, each with `logprobs`
    # alternatives when asked; bounded before anything is generated.
    rows, max_tokens = len(prompts) * req.n, req.max_tokens if req.max_tokens is not None else 16
    if rows * max_tokens > cfg.max_completion_tokens:
        raise ApiError(400, f"max_tokens: {len(prompts)} prompts x n={req.n} x max_tokens={max_tokens} = "
                            f"{rows * max_tokens} tokens, more than the limit of {cfg.max_completion_tokens} per "
                            "request (--max-completion-tokens)", "max_tokens", "too_many_tokens")
    if req.logprobs is not None and rows * max_tokens * (1 + req.logprobs) > cfg.max_logprob_entries:
        raise ApiError(400, f"logprobs: {rows * max_tokens} tokens x (1 + logprobs={req.logprobs}) = "
                            f"{rows * max_tokens * (1 + req.logprobs)} log-probs, more than the limit of "
                            f"{cfg.max_logprob_entries} per request (--max-logprob-entries); ask for fewer "
                            "logprobs, samples or tokens", "logprobs", "too_many_logprobs")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise ApiError(400, f"stop: at most 4 stop sequences, got {len(stops)}", "stop")
    return prompts
