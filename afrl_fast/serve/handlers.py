"""One handler per endpoint: a validated request (`protocol`) in, the response body out, through
the service. Bodies are plain JSON types (lists, dicts, floats), so the routes send them without
FastAPI's generic encoder."""
import asyncio
import time
import uuid

import numpy as np

from ..metrics import expected_score
from .completions import check_completion_request, completion_choices
from .errors import ApiError, unknown_model
from .protocol import CompletionRequest, RerankRequest, ScoreRequest
from .service import Service


async def score(svc: Service, req: ScoreRequest) -> dict:
    cfg = svc.cfg
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
    return {"model": cfg.model_name, "results": results,
            "usage": {"pairs": len(ids), "prompt_tokens": sum(map(len, ids))}}


async def rerank(svc: Service, req: RerankRequest) -> dict:
    cfg = svc.cfg
    if not cfg.serves(req.model):
        raise unknown_model(req.model, cfg.model_name)
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
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": cfg.model_name, "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def complete(svc: Service, req: CompletionRequest) -> dict:
    backend, tokenizer = svc.backend, svc.encoder.tokenizer
    prompts = check_completion_request(req, svc.vocab_size, svc.cfg)
    loop = asyncio.get_running_loop()
    if isinstance(prompts[0], str):
        prompts = await loop.run_in_executor(svc.tokenize_pool, lambda: tokenizer(prompts)["input_ids"])
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
    svc.metrics.generated.inc(sum(len(t) for g in groups for t in g.token_ids))
    # in the tokenizer thread (the only one that uses the tokenizer), off the event loop
    choices, n_out = await loop.run_in_executor(svc.tokenize_pool, completion_choices, tokenizer, groups, req.n,
                                                stops, req.logprobs, req.return_tokens_as_token_ids,
                                                set(backend.eos_ids))
    n_in = sum(map(len, prompts))
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": svc.cfg.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}}


def models(svc: Service) -> dict:
    return {"object": "list", "data": [{"id": svc.cfg.model_name, "object": "model", "created": 0,
                                        "owned_by": "afrl-fast"}]}


def health(svc: Service) -> dict:
    backend = svc.backend
    return {"status": "ok", "model": svc.cfg.model_name, "backend": backend.kind, "device": backend.device,
            "prefix_tokens": backend.prefix_tokens, "query_prefix": svc.query_sharing,
            "max_prompt_tokens": svc.prompt_limit, "max_rerank_documents": svc.cfg.rerank_limit,
            "queue_pairs": svc.batcher.queue.qsize() if svc.batcher else 0}
