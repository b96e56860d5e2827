"""The online scoring service: a real `python -m afrl_fast.serve` in a subprocess on a free loopback
port, a tiny Qwen3 (hidden 32, 1 layer, the real 151,936-token Qwen3 tokenizer) saved the way the
trainer exports models, and real HTTP clients (httpx, the official openai client; the rerank API with
plain httpx JSON, as Cohere's, Jina's, vLLM's and TEI's users call theirs).

Oracles: the full-vocabulary softmax of the causal LM over the whole prompt (restricted to the
label tokens and renormalised), `afrl_fast.evaluate.FirstTokenScorer` without prefix reuse,
teacher-forced log-probs of the sampled tokens, HF greedy `generate`, and the regex reference
verifier in tests/reference_verifier.py.
"""
import asyncio
import csv
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers

from afrl_fast.data import synthesize
from afrl_fast.scoring import FirstTokenScorer
from afrl_fast.format import (build_prompt, instructions_text, label_token_ids, load_tokenizer,
                              render_trace, resolve_prompt_settings, save_prompt_settings)
from afrl_fast.engines import EmbeddedEngine
from afrl_fast.rulebook import load_rulebook
from afrl_fast.serve.cli import API_KEY_ENV
from afrl_fast.serve.cli import main as serve_main

sys.path.insert(0, str(Path(__file__).parent))
from reference_verifier import verify_all  # noqa: E402
from serving import Server, free_port  # noqa: E402

NOVELEVAL = Path(__file__).resolve().parents[1] / "data" / "noveleval" / "noveleval_graded.tsv"
CONTEXT = 1024
TINY = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, max_position_embeddings=CONTEXT)


# ----------------------------------------------------------------------------------------------
# Fixtures: an exported model folder and servers
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY))
    with torch.no_grad():      # a larger spread than the default init, so the five label probabilities differ
        model.model.embed_tokens.weight.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("export") / "tiny_judge"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rulebook = load_rulebook()
    save_prompt_settings(out, rulebook, instructions_text(rulebook, "short"))
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def prompt(model_dir):
    return resolve_prompt_settings(model_dir)


MAX_REQUEST_PAIRS, MAX_BODY, MAX_RERANK = 32, 40_000, 24


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("logs") / "server.log", "--max-batch", "8",
                 "--max-wait-ms", "20", "--max-queue", "256", "--max-request-pairs", str(MAX_REQUEST_PAIRS),
                 "--max-body-bytes", str(MAX_BODY), "--explain-max-tokens", "24",
                 "--max-rerank-documents", str(MAX_RERANK))
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------------------------
# Data and oracles
# ----------------------------------------------------------------------------------------------

def noveleval(n):
    with open(NOVELEVAL, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[::max(len(rows) // n, 1)][:n]
    return [(r["query"], r["passage"][:600]) for r in rows]


def pairs_for_tests():
    synth = synthesize(12, seed=3, split="longtail")
    pairs = list(zip(synth.column("query").to_pylist(), synth.column("document").to_pylist()))
    # queries that start with a digit, punctuation or a non-Latin script probe the prefix boundary
    pairs += noveleval(8) + [("7 wonders", "A list."), ("(brackets) {braces}", "x"), ("東京 タワー", "高さ"),
                             ("\tleading tab", "  spaced   document  ")]
    return pairs


PAIRS = pairs_for_tests()
LONG_DOCUMENT = "The tower is 330 metres tall and was finished in 1889. " * 120      # > CONTEXT tokens


def full_vocab_reference(model, tokenizer, prompt, pairs) -> np.ndarray:
    """The causal LM over each whole prompt alone; softmax over all 151,936 logits at the last
    position, restricted to "0".."4" and renormalised (float64)."""
    ids = label_token_ids(tokenizer)
    out = []
    with torch.no_grad():
        for q, d in pairs:
            text = build_prompt(tokenizer, prompt.rulebook, q, d, prompt.instructions)
            x = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            p = torch.softmax(model(input_ids=x).logits[0, -1].double(), -1)[ids]
            out.append((p / p.sum()).numpy())
    return np.stack(out)


def score(url, pairs, **extra):
    body = {"pairs": [{"query": q, "document": d, "id": f"p{i}"} for i, (q, d) in enumerate(pairs)], **extra}
    r = httpx.post(url + "/v1/score", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def metric(url, name, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------

def test_scores_equal_the_offline_evaluator(server, model, tokenizer, prompt):
    results = score(server.url, PAIRS)
    probs = np.array([r["probs"] for r in results])
    offline = FirstTokenScorer(model, tokenizer, prompt.rulebook, instructions=prompt.instructions,
                               progress=False, share_prefix=False).score(*zip(*PAIRS))
    np.testing.assert_allclose(probs, offline, atol=1e-5)
    np.testing.assert_allclose(probs, full_vocab_reference(model, tokenizer, prompt, PAIRS), atol=1e-5)
    assert [r["id"] for r in results] == [f"p{i}" for i in range(len(PAIRS))]
    assert [r["grade"] for r in results] == probs.argmax(1).tolist()
    np.testing.assert_allclose([r["score"] for r in results], [sum(k * p for k, p in enumerate(row)) for row in probs])
    assert np.abs(np.diff(probs, axis=0)).max() > 1e-3        # distinct pairs: a row mix-up would show
    health = httpx.get(server.url + "/health").json()
    assert health["prefix_tokens"] > 0 and health["backend"] == "embedded"
    assert metric(server.url, "afrl_full_prefill_pairs") == 0   # every pair reused the cached prefix


def test_score_endpoint_client_reads_the_served_scores_in_row_order(server, model, tokenizer, prompt):
    """afrl_fast.endpoint.ScoreEndpoint (what `evaluate --endpoint` and the user's path use): batches
    of 5 over 24 pairs (a partial last batch) come back in the table's row order, as scored offline."""
    import pyarrow as pa
    from afrl_fast.endpoint import EndpointError, ScoreEndpoint

    table = pa.table({"query": [q for q, _ in PAIRS], "document": [d for _, d in PAIRS]})
    client = ScoreEndpoint(server.url, batch_size=5)
    probs = client.score_pairs(table)
    offline = FirstTokenScorer(model, tokenizer, prompt.rulebook, instructions=prompt.instructions,
                               progress=False, share_prefix=False).score(*zip(*PAIRS))
    np.testing.assert_allclose(probs, offline, atol=1e-5)
    bad = pa.table({"query": ["q", "q", "q"], "document": ["a", "   ", "c"]})
    with pytest.raises(EndpointError, match=r"refused rows 0\.\.2 \(HTTP 422\)"):
        ScoreEndpoint(server.url, batch_size=5, retries=0).score_pairs(bad)


def test_evaluate_endpoint_gives_the_metrics_of_the_model_folder(server, model_dir, tmp_path):
    """`python -m afrl_fast.evaluate --endpoint URL` (scores through /v1/score) writes the metrics
    `--model DIR` writes for the model the server serves; model-only flags are refused in one line."""
    import json
    import subprocess
    from afrl_fast.pairs import write_table

    pairs = tmp_path / "pairs.parquet"
    write_table(synthesize(20, seed=8, split="longtail"), pairs)
    out = {}
    for name, source in (("served", ["--endpoint", server.url]), ("local", ["--model", str(model_dir)])):
        proc = subprocess.run([sys.executable, "-m", "afrl_fast.evaluate", *source, "--pairs", str(pairs), "--out",
                               str(tmp_path / f"{name}.json"), "--batch-size", "6", "--no-progress"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("acc5", "acc2", "pair_acc", "ndcg3", "macro_f1", "n"):
        assert out["served"][key] == pytest.approx(out["local"][key], abs=1e-9), key
    assert out["served"]["model"] == server.url
    proc = subprocess.run([sys.executable, "-m", "afrl_fast.evaluate", "--endpoint", server.url, "--pairs", str(pairs),
                           "--out", str(tmp_path / "x.json"), "--instructions", "short"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--instructions" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_batched_equals_one_by_one(server):
    together = np.array([r["probs"] for r in score(server.url, PAIRS)])
    alone = np.array([score(server.url, [pair])[0]["probs"] for pair in PAIRS])
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_prefix_reuse_equals_no_reuse(model, tokenizer, prompt):
    kwargs = dict(instructions=prompt.instructions, progress=False, batch_size=5)
    reuse = FirstTokenScorer(model, tokenizer, prompt.rulebook, **kwargs)
    plain = FirstTokenScorer(model, tokenizer, prompt.rulebook, share_prefix=False, **kwargs)
    assert reuse.prefix is not None and plain.prefix is None
    ids = reuse.prompt_ids(*zip(*PAIRS))
    assert all(row[:len(reuse.prefix)] == reuse.prefix.ids for row in ids)
    # a prompt that does not start with the cached prefix is mixed into the batches: full prefill
    other = tokenizer.encode(build_prompt(tokenizer, prompt.rulebook, "q", "d", "another system prompt"),
                             add_special_tokens=False)
    ids.insert(3, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)      # the cache goes in under its current name
        np.testing.assert_allclose(reuse.score_token_ids(ids), plain.score_token_ids(ids), atol=1e-6)
        EmbeddedEngine(model, tokenizer).generate_groups([ids[0]], group_size=2, max_new_tokens=2, seed=0)
    assert reuse.n_full_prefill == 1


def test_64_concurrent_clients_get_their_own_answers(server, model, tokenizer, prompt):
    pairs = [PAIRS[i % len(PAIRS)] if i < len(PAIRS) else (f"query number {i}", f"document {i} " * (1 + i % 7))
             for i in range(64)]
    expect = full_vocab_reference(model, tokenizer, prompt, pairs)
    batches_before = metric(server.url, "afrl_batch_pairs_count")
    pairs_before = metric(server.url, "afrl_pairs_scored_total")
    ok_before = metric(server.url, "afrl_requests_total", endpoint="/v1/score", status="200")

    async def client(i, http):
        r = await http.post("/v1/score", json={"pairs": [{"query": pairs[i][0], "document": pairs[i][1],
                                                          "id": f"client-{i}"}]})
        return r.status_code, r.json()

    async def all_clients():
        async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as http:
            return await asyncio.gather(*(client(i, http) for i in range(64)))

    answers = asyncio.run(all_clients())
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        assert body["results"][0]["id"] == f"client-{i}"
        np.testing.assert_allclose(body["results"][0]["probs"], expect[i], atol=1e-5)
    assert metric(server.url, "afrl_pairs_scored_total") - pairs_before == 64
    assert metric(server.url, "afrl_requests_total", endpoint="/v1/score", status="200") - ok_before == 64
    # pairs of different clients were merged: fewer batches than pairs
    assert metric(server.url, "afrl_batch_pairs_count") - batches_before < 64


def test_metrics_endpoint_is_prometheus_text(server):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("afrl_requests_total", "afrl_request_seconds_bucket", "afrl_pairs_scored_total",
                 "afrl_batch_pairs_bucket", "afrl_queue_pairs", "afrl_batch_seconds_bucket",
                 "afrl_generation_rows", "afrl_generated_tokens_total", "afrl_rerank_candidates_bucket",
                 "afrl_query_prefixes_total", "afrl_query_prefix_candidates_total", "afrl_query_prefix_hit_ratio",
                 "afrl_tokenize_seconds_bucket", "afrl_tokenized_pairs_total", "afrl_thread_cpu_seconds_total",
                 "afrl_process_cpu_seconds"):
        assert name in r.text


# ----------------------------------------------------------------------------------------------
# Rerank
# ----------------------------------------------------------------------------------------------

def evaluator_probs(model, tokenizer, prompt, pairs) -> np.ndarray:
    """afrl_fast.evaluate's first-token scores, whole prompts prefilled (no prefix reuse)."""
    return FirstTokenScorer(model, tokenizer, prompt.rulebook, instructions=prompt.instructions, progress=False,
                            share_prefix=False).score(*zip(*pairs))


def relevance(probs: np.ndarray) -> np.ndarray:
    """The rerank relevance_score: the expected grade over the five label probabilities, / 4."""
    return probs @ np.arange(5) / 4


RERANK_QUERY = "how tall is the eiffel tower"
RERANK_DOCUMENTS = [d for _, d in PAIRS[:12]] + ["The tower is 330 metres tall.", "7 wonders of the world",
                                                  "(brackets) first", "東京タワーの高さ", "  spaced   out  "]


def test_rerank_the_way_cohere_and_jina_clients_call_it(server, model, tokenizer, prompt):
    """A Cohere/Jina-shaped request with plain httpx: results sorted by relevance_score, which is
    the expected grade / 4 of afrl_fast.evaluate's first-token probabilities for the same pairs."""
    docs = RERANK_DOCUMENTS
    expect = evaluator_probs(model, tokenizer, prompt, [(RERANK_QUERY, d) for d in docs])
    r = httpx.post(server.url + "/v1/rerank", timeout=60, json={
        "model": "tiny_judge", "query": RERANK_QUERY, "documents": docs, "return_grades": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny_judge" and body["id"].startswith("rerank-")
    results = body["results"]
    assert sorted(x["index"] for x in results) == list(range(len(docs)))
    scores = [x["relevance_score"] for x in results]
    assert scores == sorted(scores, reverse=True)
    got = np.zeros(len(docs))
    for x in results:
        got[x["index"]] = x["relevance_score"]
        assert x["document"] == {"text": docs[x["index"]]}            # the text as sent (return_documents: true)
        np.testing.assert_allclose(x["probs"], expect[x["index"]], atol=1e-5)
        assert x["grade"] == int(np.argmax(x["probs"])) and "truncated" not in x
    np.testing.assert_allclose(got, relevance(expect), atol=1e-5)
    assert ((0 <= got) & (got <= 1)).all() and np.ptp(got) > 1e-4     # distinct candidates: a mix-up would show
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] > 0

    # top_n, document objects {"text": ...}, no documents echoed
    r = httpx.post(server.url + "/v1/rerank", timeout=60, json={
        "query": RERANK_QUERY, "documents": [{"text": d} for d in docs], "top_n": 3, "return_documents": False})
    top = r.json()["results"]
    assert [x["index"] for x in top] == [x["index"] for x in results[:3]]
    assert all(set(x) == {"index", "relevance_score"} for x in top)
    np.testing.assert_allclose([x["relevance_score"] for x in top], scores[:3], atol=1e-9)
    # top_n 0 (vLLM: all) and over the count: every candidate
    for top_n in (0, 1000):
        r = httpx.post(server.url + "/v1/rerank", json={"query": RERANK_QUERY, "documents": docs[:4], "top_n": top_n})
        assert len(r.json()["results"]) == 4


def test_rerank_route_takes_tei_texts(server, model, tokenizer, prompt):
    """TEI's call: POST /rerank {"query", "texts", "return_text"}; same scores as /v1/rerank."""
    docs = RERANK_DOCUMENTS[:5]
    r = httpx.post(server.url + "/rerank", json={"query": RERANK_QUERY, "texts": docs, "return_text": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["document"]["text"] for x in results] == [docs[x["index"]] for x in results]
    expect = relevance(evaluator_probs(model, tokenizer, prompt, [(RERANK_QUERY, d) for d in docs]))
    np.testing.assert_allclose([x["relevance_score"] for x in results], expect[[x["index"] for x in results]],
                               atol=1e-5)
    r = httpx.post(server.url + "/rerank", json={"query": RERANK_QUERY, "texts": docs, "return_text": False})
    assert all("document" not in x for x in r.json()["results"])


def test_rerank_prefills_the_query_once_and_metrics_count_it(server):
    docs = RERANK_DOCUMENTS[:9]
    before = {name: metric(server.url, name) for name in ("afrl_query_prefixes_total", "afrl_rerank_candidates_count",
                                                          "afrl_rerank_candidates_sum")}
    reused = metric(server.url, "afrl_query_prefix_candidates_total", outcome="reused")
    requests_before = metric(server.url, "afrl_requests_total", endpoint="/v1/rerank", status="200")
    r = httpx.post(server.url + "/v1/rerank", json={"query": RERANK_QUERY, "documents": docs})
    assert r.status_code == 200
    assert metric(server.url, "afrl_query_prefixes_total") - before["afrl_query_prefixes_total"] == 1
    assert metric(server.url, "afrl_query_prefix_candidates_total", outcome="reused") - reused == len(docs)
    assert metric(server.url, "afrl_rerank_candidates_count") - before["afrl_rerank_candidates_count"] == 1
    assert metric(server.url, "afrl_rerank_candidates_sum") - before["afrl_rerank_candidates_sum"] == len(docs)
    assert metric(server.url, "afrl_requests_total", endpoint="/v1/rerank", status="200") - requests_before == 1
    assert metric(server.url, "afrl_query_prefix_hit_ratio") > 0.5
    assert httpx.get(server.url + "/health").json()["query_prefix"] is True
    # a lone candidate has nothing to share its query with: scored like /v1/score, counted as a fallback
    fallback = metric(server.url, "afrl_query_prefix_candidates_total", outcome="fallback")
    httpx.post(server.url + "/v1/rerank", json={"query": RERANK_QUERY, "documents": docs[:1]})
    assert metric(server.url, "afrl_query_prefix_candidates_total", outcome="fallback") - fallback == 1


def test_concurrent_reranks_get_their_own_answers(server, model, tokenizer, prompt):
    """Reranks of different queries (and single-pair scores) batched together: each query's candidates
    on its own query prefix, every answer that of the evaluator."""
    queries = [f"{RERANK_QUERY} {i}" if i % 2 else f"{i} tower facts" for i in range(8)]
    docs = RERANK_DOCUMENTS[:6]
    expect = [relevance(evaluator_probs(model, tokenizer, prompt, [(q, d) for d in docs])) for q in queries]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            reranks = [http.post("/v1/rerank", json={"query": q, "documents": docs}) for q in queries]
            scores = [http.post("/v1/score", json={"pairs": [{"query": q, "document": docs[0]}]}) for q in queries]
            return await asyncio.gather(*reranks, *scores)

    answers = asyncio.run(together())
    for q, want, r in zip(queries, expect, answers[:len(queries)]):
        assert r.status_code == 200, r.text
        got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(docs))], want, atol=1e-5, err_msg=q)
    for want, r in zip(expect, answers[len(queries):]):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["results"][0]["score"] / 4, want[0], atol=1e-5)


BAD_RERANK_BODIES = [
    ("missing query", {"documents": ["d"]}, 422, "query"),
    ("blank query", {"query": "  ", "documents": ["d"]}, 422, "query"),
    ("missing documents", {"query": "q"}, 422, "documents"),
    ("empty documents", {"query": "q", "documents": []}, 422, "documents"),
    ("empty document", {"query": "q", "documents": ["d", ""]}, 422, "documents[1]"),
    ("blank document", {"query": "q", "documents": ["d", "d", " \t"]}, 422, "documents[2]"),
    ("non-string document", {"query": "q", "documents": ["d", 7]}, 422, "documents[1]"),
    ("document object without text", {"query": "q", "documents": ["d", {"title": "t"}]}, 422, "documents[1]"),
    ("document object with another field", {"query": "q", "documents": [{"text": "d", "url": "u"}]}, 422,
     "documents[0]"),
    ("empty text alias", {"query": "q", "texts": ["d", ""]}, 422, "texts[1]"),
    ("documents and texts", {"query": "q", "documents": ["d"], "texts": ["d"]}, 422, "texts"),
    ("negative top_n", {"query": "q", "documents": ["d"], "top_n": -1}, 422, "top_n"),
    ("string top_n", {"query": "q", "documents": ["d"], "top_n": "3"}, 422, "top_n"),
    ("return_text contradicts return_documents", {"query": "q", "documents": ["d"], "return_documents": True,
                                                  "return_text": False}, 422, "return_text"),
    ("unknown field", {"query": "q", "documents": ["d"], "rank_fields": ["title"]}, 422, "rank_fields"),
    ("too many documents", {"query": "q", "documents": ["d"] * (MAX_RERANK + 1)}, 413, "documents"),
    ("longer than the context", {"query": "q", "documents": ["d", "d", LONG_DOCUMENT]}, 400, "documents[2]"),
    ("query longer than the context", {"query": LONG_DOCUMENT, "documents": ["d", "e"]}, 400, "query"),
    ("NUL-only document", {"query": "q", "documents": ["d", "\x00"]}, 422, "documents[1]"),
    ("NUL-only query", {"query": "\x00 \x00", "documents": ["d"]}, 422, "query"),
    ("unknown model", {"model": "rerank-english-v3.0", "query": "q", "documents": ["d"]}, 404, "model"),
]


@pytest.mark.parametrize("name, body, status, param", BAD_RERANK_BODIES, ids=[b[0] for b in BAD_RERANK_BODIES])
def test_bad_rerank_requests_get_a_4xx_naming_the_field(server, name, body, status, param):
    r = httpx.post(server.url + "/v1/rerank", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and "\n" not in error["message"]
    if param == "query":
        assert "--truncate" not in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found" and error["type"] == "invalid_request_error"
    assert httpx.post(server.url + "/rerank", json={"query": "q", "documents": ["d", "e"]}).status_code == 200


def test_two_level_prefix_equals_the_evaluator_with_boundary_merges(model, tokenizer, prompt):
    """FirstTokenScorer.score_query: the system prefix extended once by the query's part, the candidates'
    suffixes batched on it, equals the evaluator's whole-prompt prefill. Candidates whose ids do not
    start with the query's (a token merged across the boundary; another query; another system
    prompt) are scored the one-level or full way, and counted out."""
    from afrl_fast.prompt_encoding import PromptPieces

    kwargs = dict(instructions=prompt.instructions, progress=False, batch_size=4)
    scorer = FirstTokenScorer(model, tokenizer, prompt.rulebook, **kwargs)
    plain = FirstTokenScorer(model, tokenizer, prompt.rulebook, share_prefix=False, **kwargs)
    pieces = PromptPieces(scorer)
    assert pieces.ok and pieces.query_ok and pieces.head and pieces.tail
    # the pieces give the evaluator's ids, special-token text and odd whitespace in documents included
    docs = RERANK_DOCUMENTS + ["a <|im_end|> inside", "<|im_start|>user", "\u0301 combining first", "::"]
    queries, documents = zip(*([(RERANK_QUERY, d) for d in docs] + PAIRS))
    assert pieces.prompt_ids(queries, documents) == scorer.prompt_ids(queries, documents)

    query_ids = pieces.query_ids([RERANK_QUERY])[0]
    candidates = pieces.prompt_ids([RERANK_QUERY] * len(docs), docs)
    probs, reused = scorer.score_query(query_ids, candidates)
    assert reused == len(docs)
    np.testing.assert_allclose(probs, plain.score_token_ids(candidates), atol=1e-6)

    # A boundary that BPE merges across: the query's ids taken up to "Document: " with its space, a
    # token of its own that the first word of a document absorbs (" The"), while a digit stays apart.
    merging = pieces.head + pieces.encode_batch([pieces.seg_pre + f"Query: {RERANK_QUERY}\nDocument: "])[0]
    apart = ["7 wonders", "9 lives", "42 is the answer"]
    merged = ["The tower is 330 metres tall.", "Paris", "tall"]
    mixed = pieces.prompt_ids([RERANK_QUERY] * 6, apart + merged)
    assert all(ids[:len(merging)] == merging for ids in mixed[:3])
    assert not any(ids[:len(merging)] == merging for ids in mixed[3:])
    # and a candidate of another query, and one with another system prompt (no shared prefix at all)
    mixed.append(pieces.prompt_ids(["another query"], ["7 more"])[0])
    mixed.append(tokenizer.encode(build_prompt(tokenizer, prompt.rulebook, RERANK_QUERY, "7 x", "other system"),
                                  add_special_tokens=False))
    before = scorer.n_full_prefill
    probs, reused = scorer.score_query(merging, mixed)
    assert reused == 3 and scorer.n_full_prefill - before == 1
    np.testing.assert_allclose(probs, plain.score_token_ids(mixed), atol=1e-6)
    # fewer than two candidates left to share the query: no query prefix at all
    probs, reused = scorer.score_query(merging, mixed[2:])
    assert reused == 0
    np.testing.assert_allclose(probs, plain.score_token_ids(mixed[2:]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Explain
# ----------------------------------------------------------------------------------------------

def test_explain_returns_the_greedy_trace_and_the_verifiers_verdict(server, model, tokenizer, prompt):
    pairs = PAIRS[:3]
    results = score(server.url, pairs, explain=True)
    label_ids = label_token_ids(tokenizer)
    traces = []
    for (q, d), r in zip(pairs, results):
        ids = tokenizer.encode(build_prompt(tokenizer, prompt.rulebook, q, d, prompt.instructions),
                               add_special_tokens=False) + [label_ids[r["grade"]]]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                 pad_token_id=tokenizer.pad_token_id)
        expect = tokenizer.decode(out[0, len(ids) - 1:], skip_special_tokens=True)
        assert r["trace"] == expect
        assert r["trace"].startswith(str(r["grade"]))
        traces.append(r["trace"])
    reference = verify_all(traces, [r["grade"] for r in results], prompt.rulebook, gate="pred")
    for r, ref in zip(results, reference):
        v = r["verdict"]
        assert (v["format"], v["consistent"], v["logic"]) == (ref.fmt, ref.cst, ref.logic)
        assert v["y_dec"] == r["grade"]


def test_explain_verdict_on_a_valid_trace(tokenizer, prompt):
    """The verdict fields on traces that pass the format (a random model never writes one): a stub
    backend 'generates' rendered traces, one consistent, one whose rules imply another grade."""
    from concurrent.futures import ThreadPoolExecutor

    from afrl_fast.engines import RolloutGroup
    from afrl_fast.prompt_encoding import PromptEncoder
    from afrl_fast.serve.config import ServeConfig
    from afrl_fast.serve.metrics import Metrics
    from afrl_fast.serve.service import Service

    rb = prompt.rulebook
    values = {step.key: step.values[0] for step in rb.steps if step.values}
    good = render_trace(rb, rb.expected_label(values), values)
    grade = rb.expected_label(values)
    wrong = render_trace(rb, (grade + 1) % 5, values)
    continuations = [tokenizer.encode(t[1:], add_special_tokens=False) for t in (good, wrong)]

    class Stub:
        label_ids, eos_ids, context_tokens = label_token_ids(tokenizer), [tokenizer.eos_token_id], 4096

        def generate(self, prompts, **kw):
            return [RolloutGroup(p, [c], [[0.0] * len(c)], [True]) for p, c in zip(prompts, continuations)]

    svc = Service(Stub(), ServeConfig(), PromptEncoder(tokenizer, rb, prompt.instructions), ThreadPoolExecutor(1))
    svc.metrics = Metrics(lambda: 0)
    out = asyncio.run(svc.explain([[1, 2], [3, 4]], [grade, (grade + 1) % 5]))
    reference = verify_all([good, wrong], [grade, (grade + 1) % 5], rb, gate="pred")
    assert [o["trace"] for o in out] == [good, wrong]
    for o, ref in zip(out, reference):
        v = o["verdict"]
        assert (v["format"], v["consistent"], v["logic"], v["y_hat"]) == (ref.fmt, ref.cst, ref.logic, ref.y_hat)
    assert out[0]["verdict"]["logic"] and not out[1]["verdict"]["logic"] and out[1]["verdict"]["format"]


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible completions
# ----------------------------------------------------------------------------------------------

def teacher_forced_logprobs(model, prompt_ids, token_ids, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + token_ids])).logits[0].double()
    rows = logits[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(token_ids)]
    return torch.log_softmax(rows / (temperature or 1.0), -1)


def test_openai_client_gets_n_completions_with_logprobs(server, model, tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    prompt_ids = tokenizer.encode("Query: cheap phones\nDocument: The Brava Z5 costs", add_special_tokens=False)
    kwargs = dict(model="tiny_judge", prompt=prompt_ids, n=3, max_tokens=6, temperature=0.8, seed=11, logprobs=3,
                  extra_body={"return_tokens_as_token_ids": True})
    first = client.completions.create(**kwargs)
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    samples = set()
    for choice in first.choices:
        ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        assert 1 <= len(ids) <= 6 and tokenizer.decode(ids, skip_special_tokens=True) == choice.text
        ref = teacher_forced_logprobs(model, prompt_ids, ids, 0.8)
        np.testing.assert_allclose(choice.logprobs.token_logprobs, ref[torch.arange(len(ids)), ids].numpy(),
                                   atol=1e-4)
        for k, top in enumerate(choice.logprobs.top_logprobs):
            values, idx = ref[k].topk(3)
            assert sorted(int(t.removeprefix("token_id:")) for t in top) == sorted(idx.tolist())
            np.testing.assert_allclose(sorted(top.values()), sorted(values.tolist()), atol=1e-4)
        samples.add(tuple(ids))
    assert len(samples) > 1                    # n samples, not one sample n times
    assert first.usage.prompt_tokens == len(prompt_ids)
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]      # seeded

    # stop sequences cut the text before them
    text = first.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2] or text
    cut = client.completions.create(**{**kwargs, "stop": [stop]})
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"

    # a text prompt and greedy decoding: the argmax continuation
    greedy = client.completions.create(model="tiny_judge", prompt="The Brava Z5", max_tokens=4, temperature=0)
    ids = tokenizer("The Brava Z5")["input_ids"]
    with torch.no_grad():
        expect = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=4,
                                pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    assert greedy.choices[0].text == tokenizer.decode(expect, skip_special_tokens=True)
    assert greedy.choices[0].logprobs is None


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

BAD_SCORE_BODIES = [
    ("missing query", {"pairs": [{"document": "d"}]}, 422, "pairs[0].query"),
    ("empty document", {"pairs": [{"query": "q", "document": "d"}, {"query": "q", "document": ""}]}, 422,
     "pairs[1].document"),
    ("blank query", {"pairs": [{"query": "   ", "document": "d"}]}, 422, "pairs[0].query"),
    ("non-string query", {"pairs": [{"query": "q", "document": "d"}, {"query": 5, "document": "d"}]}, 422,
     "pairs[1].query"),
    ("non-string id", {"pairs": [{"query": "q", "document": "d", "id": 3}]}, 422, "pairs[0].id"),
    ("pairs not a list", {"pairs": "q"}, 422, "pairs"),
    ("no pairs", {"pairs": []}, 422, "pairs"),
    ("missing pairs", {"explain": True}, 422, "pairs"),
    ("unknown field", {"pairs": [{"query": "q", "document": "d", "title": "t"}]}, 422, "pairs[0].title"),
    ("too many pairs", {"pairs": [{"query": "q", "document": "d"}] * (MAX_REQUEST_PAIRS + 1)}, 413, "pairs"),
    ("longer than the context", {"pairs": [{"query": "q", "document": "d"}, {"query": "q", "document": LONG_DOCUMENT}]},
     400, "pairs[1].document"),
    # the query alone does not fit: the query is named, and --truncate (which cuts documents) not suggested
    ("query longer than the context", {"pairs": [{"query": "q", "document": "d"},
                                                 {"query": LONG_DOCUMENT, "document": "d"}]}, 400, "pairs[1].query"),
    ("NUL-only document", {"pairs": [{"query": "q", "document": "\x00\x00"}]}, 422, "pairs[0].document"),
    ("invisible-only document", {"pairs": [{"query": "q", "document": " \u200b\u3000\ufeff\t"}]}, 422,
     "pairs[0].document"),
    ("control-only query", {"pairs": [{"query": "\x01\x7f", "document": "d"}]}, 422, "pairs[0].query"),
]


@pytest.mark.parametrize("name, body, status, param", BAD_SCORE_BODIES, ids=[b[0] for b in BAD_SCORE_BODIES])
def test_bad_score_requests_get_a_4xx_naming_the_field(server, name, body, status, param):
    r = httpx.post(server.url + "/v1/score", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and "\n" not in error["message"]
    if param.endswith("query"):
        assert "--truncate" not in error["message"]
    assert score(server.url, PAIRS[:1])[0]["grade"] in range(5)          # the server still answers


def test_raw_bodies_get_a_4xx(server):
    big = b'{"pairs": [{"query": "q", "document": "' + b"x" * MAX_BODY + b'"}]}'
    r = httpx.post(server.url + "/v1/score", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"

    def chunks():                               # no Content-Length: the limit applies while reading
        for _ in range(8):
            yield b"x" * (MAX_BODY // 4)
    r = httpx.post(server.url + "/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"

    r = httpx.post(server.url + "/v1/score", content=b'{"pairs": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "body"
    assert "invalid JSON" in r.json()["error"]["message"]

    # bytes that are not UTF-8 (a Latin-1 client): 400 naming the encoding and the first bad byte, on every route
    latin1 = '{"pairs": [{"query": "caf\u00e9", "document": "d"}]}'.encode("latin-1")
    for path, body in (("/v1/score", latin1), ("/v1/rerank", b'{"query": "\xff", "documents": ["d"]}'),
                       ("/v1/completions", b'{"prompt": "na\xefve"}')):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "body" and error["code"] == "invalid_encoding", r.text
        assert "UTF-8" in error["message"] and "0x" in error["message"] and "\n" not in error["message"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


BAD_COMPLETIONS = [
    ("streaming", {"prompt": "hi", "stream": True}, 400, "stream"),
    ("n = 0", {"prompt": "hi", "n": 0}, 422, "n"),
    ("token id outside the vocabulary", {"prompt": [1, 2, 10 ** 7]}, 400, "prompt[0]"),
    ("empty prompt", {"prompt": ""}, 400, "prompt[0]"),
    ("prompt + max_tokens over the context", {"prompt": [1] * 1000, "max_tokens": 100}, 400, "prompt[0]"),
    ("temperature out of range", {"prompt": "hi", "temperature": 3}, 422, "temperature"),
    ("unsupported option", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("negative seed", {"prompt": "hi", "seed": -1}, 422, "seed"),
    ("seed over 64 bits", {"prompt": "hi", "seed": 2 ** 64}, 422, "seed"),
    ("unknown model", {"prompt": "hi", "model": "gpt-4o"}, 404, "model"),
    # what a response can grow to: 64 x 600 tokens, each with 20 alternatives, was 24 MB
    ("n x max_tokens over the cap", {"prompt": [1, 2, 3], "n": 64, "max_tokens": 600, "logprobs": 20}, 400,
     "max_tokens"),
    ("log-probs over the cap", {"prompt": [1, 2, 3], "n": 8, "max_tokens": 400, "logprobs": 20}, 400, "logprobs"),
]


@pytest.mark.parametrize("name, body, status, param", BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_requests(server, name, body, status, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny_judge", **body}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param) and "\n" not in error["message"]
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_truncate_flag_cuts_documents_like_the_offline_evaluator(model_dir, model, tokenizer, prompt, tmp_path):
    srv = Server(model_dir, tmp_path / "truncate.log", "--truncate", "--max-prompt-tokens", "300")
    try:
        pairs = [("tower height", LONG_DOCUMENT), ("tower height", "It is 330 metres tall.")]
        results = score(srv.url, pairs)
        assert [r["truncated"] for r in results] == [True, False]
        offline = FirstTokenScorer(model, tokenizer, prompt.rulebook, instructions=prompt.instructions,
                                   max_prompt_tokens=300, progress=False, share_prefix=False)
        np.testing.assert_allclose([r["probs"] for r in results], offline.score(*zip(*pairs)), atol=1e-5)
        # a query that alone does not fit cannot be cut: 400 naming it
        r = httpx.post(srv.url + "/v1/score", json={"pairs": [{"query": "q", "document": "d"},
                                                              {"query": "tall " * 400, "document": "d"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "pairs[1].query"
    finally:
        srv.stop()


def test_rerank_truncates_and_runs_without_the_query_prefix(model_dir, model, tokenizer, prompt, tmp_path):
    """--truncate cuts an over-long candidate like the evaluator (flagged in its result);
    --no-query-prefix scores every candidate on the system prefix only, with the same scores."""
    srv = Server(model_dir, tmp_path / "rerank.log", "--truncate", "--max-prompt-tokens", "300", "--no-query-prefix")
    try:
        assert httpx.get(srv.url + "/health").json()["query_prefix"] is False
        docs = [LONG_DOCUMENT, "It is 330 metres tall.", "7 wonders"]
        r = httpx.post(srv.url + "/v1/rerank", json={"query": "tower height", "documents": docs})
        assert r.status_code == 200, r.text
        results = {x["index"]: x for x in r.json()["results"]}
        assert results[0].get("truncated") is True and "truncated" not in results[1]
        offline = FirstTokenScorer(model, tokenizer, prompt.rulebook, instructions=prompt.instructions,
                                   max_prompt_tokens=300, progress=False, share_prefix=False)
        expect = relevance(offline.score(["tower height"] * 3, docs))
        np.testing.assert_allclose([results[i]["relevance_score"] for i in range(3)], expect, atol=1e-5)
        assert metric(srv.url, "afrl_query_prefix_candidates_total", outcome="reused") == 0
        assert metric(srv.url, "afrl_query_prefix_candidates_total", outcome="fallback") == 3
        r = httpx.post(srv.url + "/v1/rerank", json={"query": "tall " * 400, "documents": ["d", "e"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "query"
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------
# Overload, shutdown, start-up errors
# ----------------------------------------------------------------------------------------------

def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_full_queue_answers_503_and_sigterm_finishes_in_flight(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path / "small.log", "--max-queue", "4", "--max-batch", "1", "--max-wait-ms", "0")
    try:
        pair = {"query": "q", "document": "d"}
        # a request that alone needs more slots than the queue has is refused whole
        r = httpx.post(srv.url + "/v1/score", json={"pairs": [pair] * 5})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"

        # keep the inference thread busy with a long generation, fill the queue, overflow it
        slow = {}
        gen = threading.Thread(target=lambda: slow.update(r=httpx.post(
            srv.url + "/v1/completions", json={"prompt": [1, 2, 3], "n": 2, "max_tokens": 600, "seed": 0},
            timeout=300)))
        gen.start()
        wait_until(lambda: metric(srv.url, "afrl_generation_rows") == 2)
        filler = {}
        fill = threading.Thread(target=lambda: filler.update(r=httpx.post(
            srv.url + "/v1/score", json={"pairs": [pair] * 4}, timeout=300)))
        fill.start()
        # max batch 1 and a busy worker: one pair waits for the worker, the next batch of one is
        # formed, two pairs stay in the queue of four
        wait_until(lambda: metric(srv.url, "afrl_queue_pairs") == 2)
        overflow = httpx.post(srv.url + "/v1/score", json={"pairs": [pair] * 3}, timeout=60)
        assert overflow.status_code == 503, overflow.text
        assert metric(srv.url, "afrl_rejected_total", reason="queue_full") == 2
        assert "r" not in slow and "r" not in filler          # both still in flight

        # SIGTERM while the generation and the queued pairs are in flight: both are answered
        srv.proc.send_signal(signal.SIGTERM)
        gen.join(timeout=300)
        fill.join(timeout=300)
        assert slow["r"].status_code == 200 and len(slow["r"].json()["choices"]) == 2
        assert filler["r"].status_code == 200 and len(filler["r"].json()["results"]) == 4
        # uvicorn re-raises the signal it caught once the requests are answered: the process ends by SIGTERM
        assert srv.proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        srv.stop()


def model_variant(model_dir, out, tokenizer_json=None, **config):
    """A copy of the test model folder with its config.json changed by `config`, or its
    tokenizer.json replaced by `tokenizer_json`."""
    import json
    import shutil

    shutil.copytree(model_dir, out)
    if config:
        path = out / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_text(tokenizer_json)
    return out


def test_startup_errors_end_in_one_line_and_exit_2(tmp_path, capsys, model_dir, tokenizer):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    # a model whose vocabulary is smaller than the tokenizer saved with it
    small = tmp_path / "small_vocab"
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**TINY, "vocab_size": 1000})).save_pretrained(small)
    tokenizer.save_pretrained(small)
    broken_tokenizer = model_variant(model_dir, tmp_path / "broken_tok", tokenizer_json="{not json")
    short_context = model_variant(model_dir, tmp_path / "short_ctx", max_position_embeddings=64)
    capsys.readouterr()        # the progress bars of saving them
    cases = [(["--model", str(tmp_path / "missing")], "model folder not found"),
             (["--model", str(not_a_model)], "not a model folder"),
             (["--model", str(broken)], "cannot load the model"),
             (["--model", str(model_dir), "--max-batch", "0"], "--max-batch"),
             (["--model", str(model_dir), "--forward-rows", "0"], "--forward-rows"),
             (["--model", str(model_dir), "--max-rerank-documents", "0"], "--max-rerank-documents"),
             (["--model", str(model_dir), "--max-completion-tokens", "0"], "--max-completion-tokens"),
             (["--model", str(model_dir), "--body-timeout", "0"], "--body-timeout"),
             (["--model", str(model_dir), "--instructions", str(tmp_path / "nope.txt")], "instructions"),
             (["--model", str(model_dir), "--device", "tpu"], "--device 'tpu'"),
             (["--model", str(broken_tokenizer)], "cannot load the tokenizer"),
             (["--model", str(small)], "fewer than its tokenizer's"),
             # a context shorter than the prompt's fixed part: every score would be refused
             (["--model", str(short_context)], "leaves no room for a pair"),
             (["--model", str(model_dir), "--max-prompt-tokens", "20"], "--max-prompt-tokens 20 leaves no room")]
    try:
        import sglang  # noqa: F401
    except ImportError:
        cases.append((["--model", str(model_dir), "--backend", "sglang"], "needs SGLang"))
    for argv, words in cases:
        assert serve_main([*argv, "--port", str(free_port())]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)


def test_address_errors_come_before_the_model_loads(tmp_path, capsys, model_dir):
    """A bad port or host, or a port in use, is one line before anything loads: the model folder
    here does not even exist, and the error is still about the address."""
    import socket

    missing = ["--model", str(tmp_path / "missing")]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [(["--port", "70000"], "--port must be 1-65535, got 70000"),
                 (["--port", "0"], "--port must be 1-65535"),
                 (["--port", "-1"], "--port must be 1-65535"),
                 (["--host", "no-such-host.invalid", "--port", str(free_port())], "--host 'no-such-host.invalid'"),
                 (["--host", "300.1.2.3", "--port", str(free_port())], "--host '300.1.2.3'")]
        for argv, words in cases:
            assert serve_main([*missing, *argv]) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)
        # in use: found before the model loads (the model folder exists, its loading would take seconds)
        assert serve_main(["--model", str(model_dir), "--port", str(taken.getsockname()[1])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot listen there" in err[0] and "in use" in err[0], err


def test_listening_beyond_loopback_without_a_key_warns(tmp_path, capsys):
    """Binding another address than loopback without an API key says so on stderr (the folder is no
    model, so start-up then ends; the warning comes before the model loads)."""
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert serve_main(["--model", str(not_a_model), "--host", "0.0.0.0", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("warning: listening on 0.0.0.0 without an API key"), err
    assert serve_main(["--model", str(not_a_model), "--host", "0.0.0.0", "--port", str(free_port()),
                       "--api-key", "k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model folder" in err[0], err
    assert serve_main(["--model", str(not_a_model), "--port", str(free_port())]) == 2      # loopback: no warning
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------
# The SGLang backend against a stand-in engine
# ----------------------------------------------------------------------------------------------

class StandInEngine:
    """Answers `generate` the way SGLang 0.5's Engine does for the calls the backend makes, computing
    the log-probs with the HF model (so the scores can be checked), and records the calls. Sampling
    follows SGLang under --enable-deterministic-inference: a request's `sampling_seed` (a default one
    without it) seeds its sampler, and the `n` copies of one request share it — so they come back
    identical, which is what the backend must avoid."""
    DEFAULT_SEED = 42

    def __init__(self, model, **kwargs):
        self.model, self.kwargs, self.calls = model, kwargs, []

    def generate(self, input_ids=None, sampling_params=None, return_logprob=False, logprob_start_len=None,
                 top_logprobs_num=None, token_ids_logprob=None, **kw):
        self.calls.append(dict(input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob,
                               logprob_start_len=logprob_start_len, token_ids_logprob=token_ids_logprob,
                               top_logprobs_num=top_logprobs_num))
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        return [self.sample(ids, sp, top_logprobs_num, token_ids_logprob)
                for ids, sp in zip(input_ids, params) for _ in range(sp.get("n", 1))]

    def sample(self, ids, sp, top_logprobs_num, token_ids_logprob) -> dict:
        gen = torch.Generator().manual_seed(int(sp.get("sampling_seed", self.DEFAULT_SEED)))
        seq, triples, tops, first = list(ids), [], [], None
        for _ in range(sp["max_new_tokens"]):
            with torch.no_grad():
                logits = self.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            logp = torch.log_softmax(logits, -1)
            first = logp if first is None else first
            t = sp.get("temperature", 1.0)
            token = int(logp.argmax()) if t == 0 else \
                int(torch.multinomial(torch.softmax(logits / t, -1), 1, generator=gen))
            triples.append((float(logp[token]), token, None))
            if top_logprobs_num:
                v, i = logp.topk(top_logprobs_num)
                tops.append([(float(a), int(b), None) for a, b in zip(v, i)])
            seq.append(token)
        meta = {"output_token_logprobs": triples, "finish_reason": {"type": "length", "length": len(triples)}}
        if token_ids_logprob:
            meta["output_token_ids_logprobs"] = [[(float(first[t]), t, None) for t in token_ids_logprob]]
        if top_logprobs_num:
            meta["output_top_logprobs"] = tops
        return {"text": "", "meta_info": meta}

    def shutdown(self):
        self.calls.append("shutdown")


def test_sglang_backend_scores_like_the_embedded_scorer(monkeypatch, model_dir, model, tokenizer, prompt):
    import types

    from afrl_fast.serve.backends import SGLangBackend

    engines = []
    fake = types.ModuleType("sglang")
    fake.Engine = lambda **kw: engines.append(StandInEngine(model, **kw)) or engines[-1]
    monkeypatch.setitem(sys.modules, "sglang", fake)
    monkeypatch.setattr("afrl_fast.serve.backends.check_sglang_version", lambda installed=None: "0.5.23")
    backend = SGLangBackend(str(model_dir), prompt, engine_kwargs={"tp_size": 1})
    scorer = FirstTokenScorer(model, tokenizer, prompt.rulebook, instructions=prompt.instructions, progress=False)
    ids = scorer.prompt_ids(*zip(*PAIRS[:5]))
    np.testing.assert_allclose(backend.score(ids), scorer.score_token_ids(ids), atol=1e-5)
    call = engines[0].calls[0]
    assert call["return_logprob"] and call["token_ids_logprob"] == label_token_ids(tokenizer)
    assert call["sampling_params"]["max_new_tokens"] == 1 and call["sampling_params"]["temperature"] == 1.0
    assert engines[0].kwargs == {"model_path": str(model_dir), "tp_size": 1}
    groups = backend.generate([ids[0], ids[1]], n=3, temperature=1.0, top_p=0.9, max_tokens=3, seeds=[3, 4],
                              top_logprobs=2)
    assert [g.group_size for g in groups] == [3, 3] and len(groups[0].top_logprobs[0][0]) == 2
    # n samples are n distinct samples (one request with n copies would share its seed)
    assert all(len({tuple(t) for t in g.token_ids}) == 3 for g in groups), [g.token_ids for g in groups]
    params = engines[0].calls[-1]["sampling_params"]
    seeds = [sp["sampling_seed"] for sp in params]
    assert [sp["n"] for sp in params] == [1] * 6 and len(set(seeds)) == 6 and all(0 <= x < 2**31 for x in seeds)
    again = backend.generate([ids[0], ids[1]], n=3, temperature=1.0, top_p=0.9, max_tokens=3, seeds=[3, 4])
    assert [g.token_ids for g in again] == [g.token_ids for g in groups]      # the prompt seeds fix them
    other = backend.generate([ids[0]], n=3, temperature=1.0, top_p=0.9, max_tokens=3, seeds=[5])
    assert other[0].token_ids != groups[0].token_ids
    backend.close()
    assert engines[0].calls[-1] == "shutdown"


def test_concurrent_completions_decode_together_and_get_what_they_get_alone(server, tokenizer):
    """Requests that wait while a batch decodes go into the next engine call together (the
    generation-batch histogram shows it); each gets the tokens it gets when it runs alone. Greedy:
    sampled tokens of this near-uniform random model flip on the rounding differences a different
    batch shape makes (each prompt's generator is its own, so on a trained model they agree)."""
    import asyncio

    prompts = [tokenizer.encode(f"Query: phone {i}\nDocument: The Brava Z{i} costs", add_special_tokens=False)
               for i in range(8)]
    bodies = [{"prompt": p, "n": 2, "max_tokens": 5 + (i % 3), "temperature": 0.0, "seed": 100 + i,
               "return_tokens_as_token_ids": True, "logprobs": 0} for i, p in enumerate(prompts)]

    def tokens(resp):
        return [[int(t.removeprefix("token_id:")) for t in c["logprobs"]["tokens"]] for c in resp.json()["choices"]]

    alone = [tokens(httpx.post(server.url + "/v1/completions", json=b, timeout=60)) for b in bodies]
    before = metric(server.url, "afrl_generation_batch_requests_count")

    async def together():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[client.post(server.url + "/v1/completions", json=b) for b in bodies])

    merged = [tokens(r) for r in asyncio.run(together())]
    assert merged == alone
    for body, toks in zip(bodies, merged):
        assert all(1 <= len(t) <= body["max_tokens"] for t in toks)
    calls = metric(server.url, "afrl_generation_batch_requests_count") - before
    assert calls < len(bodies)          # fewer engine calls than requests: some decoded together


# ----------------------------------------------------------------------------------------------
# Reliability: API key, response caps, slow clients, log-probs, the protocol models
# ----------------------------------------------------------------------------------------------

def test_api_key_guards_every_route_but_health(model_dir, tmp_path, monkeypatch):
    """With the key in the environment (as a deployment passes it, out of the process list):
    every route answers 401 in the OpenAI error shape without it or with a wrong one, /health
    answers anyway, and the official openai client with the key works."""
    from openai import AuthenticationError, OpenAI

    monkeypatch.setenv(API_KEY_ENV, "s3cret-key")
    srv = Server(model_dir, tmp_path / "key.log")        # its /health readiness probe needs no key
    try:
        routes = [("POST", "/v1/score", {"pairs": [{"query": "q", "document": "d"}]}),
                  ("POST", "/v1/rerank", {"query": "q", "documents": ["d"]}),
                  ("POST", "/rerank", {"query": "q", "texts": ["d"]}),
                  ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                  ("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None),
                  ("GET", "/no-such-route", None)]
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer s3cret-keyX"},
                        {"authorization": "Basic s3cret-key"}, {"authorization": "s3cret-key"}):
            for method, path, body in routes:
                r = httpx.request(method, srv.url + path, json=body, headers=headers, timeout=60)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"
        good = {"authorization": "Bearer s3cret-key"}
        for method, path, body in routes[:-2]:
            r = httpx.request(method, srv.url + path, json=body, headers=good, timeout=60)
            assert r.status_code == 200, (path, r.text)
        assert httpx.get(srv.url + "/v1/models", headers={"authorization": "bearer s3cret-key"}).status_code == 200
        client = OpenAI(base_url=srv.url + "/v1", api_key="s3cret-key", max_retries=0)
        assert client.completions.create(model="tiny_judge", prompt="hi", max_tokens=2).choices[0].finish_reason
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=srv.url + "/v1", api_key="guess", max_retries=0).completions.create(
                model="tiny_judge", prompt="hi", max_tokens=2)
    finally:
        srv.stop()


def test_openai_client_naming_another_model_gets_404(server):
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError) as caught:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=2)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    for name in ("tiny_judge", "default"):        # the served name, and the one-model placeholder
        assert client.completions.create(model=name, prompt="hi", max_tokens=2).model == "tiny_judge"


def test_top_logprobs_entry_of_the_sampled_token_is_its_logprob(server, tokenizer):
    """A sampled token listed among its position's top_logprobs has there exactly its token_logprobs
    value (the engine computes the two by different float32 routes)."""
    prompt_ids = tokenizer.encode("Query: cheap phones\nDocument: The Brava Z5 costs", add_special_tokens=False)
    listed = 0
    for temperature in (0.0, 0.3, 1.0):
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "prompt": prompt_ids, "n": 4, "max_tokens": 12, "temperature": temperature, "seed": 5, "logprobs": 5,
            "return_tokens_as_token_ids": True})
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            lp = choice["logprobs"]
            for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
                if token in top:
                    listed += 1
                    assert top[token] == value, (temperature, token, top[token], value)
    assert listed > 0


class BlockingDecode:
    """The test tokenizer, but `decode` waits, once armed, until the test lets it go."""

    def __init__(self, tokenizer):
        self.tokenizer, self.armed = tokenizer, False
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __len__(self):
        return len(self.tokenizer)

    def decode(self, *args, **kwargs):
        if self.armed:
            self.entered.set()
            self.release.wait(120)
        return self.tokenizer.decode(*args, **kwargs)


def test_completion_bodies_are_built_off_the_event_loop(prompt):
    """/health answers while a completion's body is being built. The body's tokens are decoded by a
    tokenizer that, once armed, waits until /health has answered: were bodies built on the event
    loop, /health could not answer (its read timeout fails the test). A stand-in backend
    "generates" at once, so only the body building is in flight."""
    import uvicorn
    from concurrent.futures import ThreadPoolExecutor

    from afrl_fast.prompt_encoding import PromptEncoder
    from afrl_fast.engines import RolloutGroup
    from afrl_fast.serve.app import create_app
    from afrl_fast.serve.config import ServeConfig

    tok = BlockingDecode(load_tokenizer())

    class StandIn:
        kind, device, prefix_tokens, full_prefill_pairs, context_tokens = "stand-in", "cpu", 0, 0, 4096
        label_ids, eos_ids = label_token_ids(tok.tokenizer), [tok.tokenizer.eos_token_id]

        def generate(self, prompts, *, n, max_tokens, **kw):
            return [RolloutGroup(p, [[100, 200, 300][:max_tokens]] * n, [[-1.0] * 3] * n, [False] * n) for p in prompts]

        def close(self):
            pass

    app = create_app(StandIn(), ServeConfig(model_name="stand-in"),
                     PromptEncoder(tok, prompt.rulebook, prompt.instructions), ThreadPoolExecutor(1))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: server.started)
        tok.armed = True
        done = {}
        client = threading.Thread(target=lambda: done.update(r=httpx.post(
            url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3}, timeout=120)))
        client.start()
        assert tok.entered.wait(60)
        health = httpx.get(url + "/health", timeout=30)       # the body is being built meanwhile
        assert health.status_code == 200 and "r" not in done
        tok.release.set()
        client.join(timeout=60)
        assert done["r"].status_code == 200 and done["r"].json()["choices"][0]["text"]
    finally:
        tok.release.set()
        server.should_exit = True
        thread.join(timeout=30)


def read_until_closed(sock) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_clients_time_out_and_sigterm_drains_in_bounded_time(model_dir, tmp_path):
    """A body that does not arrive in full within --body-timeout gets 408 and its connection
    closed; an idle keep-alive connection is closed after --keep-alive-timeout; SIGTERM with a
    stalled client connected ends the process by that signal, with no traceback in the log."""
    import socket

    log = tmp_path / "slow.log"
    srv = Server(model_dir, log, "--body-timeout", "1", "--keep-alive-timeout", "1", "--graceful-timeout", "20")
    partial = (b"POST /v1/score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
               b'{"pairs": [{"query": ')
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
            s.sendall(partial)
            answer = read_until_closed(s)        # a socket timeout (60 s) would fail the test
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert b'"param":"body"' in body.replace(b" ", b"") and b"--body-timeout" in body
        assert metric(srv.url, "afrl_rejected_total", reason="body_timeout") == 1

        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = read_until_closed(s)        # answered, then closed by the server when idle
        assert answer.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in answer

        stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=60)
        stalled.sendall(partial)
        # a request on another connection answered after it: the stalled one's headers are read by then
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == -signal.SIGTERM
        assert read_until_closed(stalled).startswith(b"HTTP/1.1 408")
        stalled.close()
    finally:
        srv.stop()
    text = log.read_text()
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]


@pytest.mark.slow
def test_sigterm_cancels_what_outlasts_the_graceful_timeout_in_one_line(model_dir, tmp_path):
    """A generation still running when --graceful-timeout runs out is cancelled: the process still
    ends by SIGTERM, the cancelled request is one log line, and no traceback is logged."""
    log = tmp_path / "drain.log"
    srv = Server(model_dir, log, "--graceful-timeout", "1")
    try:
        slow = {}

        def generate():
            try:
                slow["r"] = httpx.post(srv.url + "/v1/completions", timeout=300,
                                       json={"prompt": [1, 2, 3], "n": 16, "max_tokens": 1000, "seed": 0})
            except httpx.TransportError as e:        # the connection closed under it: what is expected
                slow["error"] = e

        gen = threading.Thread(target=generate)
        gen.start()
        wait_until(lambda: metric(srv.url, "afrl_generation_rows") == 16)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=120) == -signal.SIGTERM
        gen.join(timeout=60)
        assert "error" in slow or slow["r"].status_code != 200       # cut off, not answered in full
    finally:
        srv.stop()
    text = log.read_text()
    assert "POST /v1/completions cancelled: still running when --graceful-timeout ran out" in text, text[-3000:]
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]


def test_responses_follow_the_protocol_models(server):
    """The response bodies the routes build by hand have the shape of afrl_fast.serve.protocol's models."""
    from afrl_fast.serve import protocol

    pairs = {"pairs": [{"query": q, "document": d, "id": f"p{i}"} for i, (q, d) in enumerate(PAIRS[:2])]}
    checks = [("/v1/score", pairs, protocol.ScoreResponse),
              ("/v1/score", {**pairs, "explain": True}, protocol.ScoreResponse),
              ("/v1/rerank", {"query": "q", "documents": ["a", "b"], "return_grades": True}, protocol.RerankResponse),
              ("/rerank", {"query": "q", "texts": ["a", "b"]}, protocol.RerankResponse),
              ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "logprobs": 2}, protocol.CompletionResponse)]
    for path, body, model in checks:
        r = httpx.post(server.url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        model.model_validate(r.json(), strict=False)
    protocol.ModelList.model_validate(httpx.get(server.url + "/v1/models").json())
    protocol.Health.model_validate(httpx.get(server.url + "/health").json())
    protocol.ErrorResponse.model_validate(httpx.post(server.url + "/v1/score", json={}).json())
