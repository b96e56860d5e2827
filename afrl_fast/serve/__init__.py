"""Online scoring service: first-token relevance scores over HTTP, a rerank API, and OpenAI-compatible
completions.

    python -m afrl_fast.serve --model DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY]
        [--instructions full|short|PATH|MODEL_DIR] [--rulebook YAML] [--max-batch 64] [--max-wait-ms 5]
        [--max-queue 1024] [--max-rerank-documents 1000] [--device auto] [--backend embedded|sglang]
        [--truncate] [--max-completion-tokens 32768] [--max-logprob-entries 65536]
        [--body-timeout 30] [--keep-alive-timeout 5] [--graceful-timeout 60]

(`--help` lists every flag with its default.)

Endpoints (FastAPI on uvicorn):
  POST /v1/score        {"pairs": [{"query", "document", "id"?}], "explain": false}
                        -> per pair {"id", "grade", "probs": [p0..p4], "score": sum k*p_k, "truncated"};
                        with "explain": true also the AFRL trace generated greedily after the grade
                        token and the verifier's verdict on it
  POST /v1/rerank, /rerank
                        the rerank API of Cohere, Jina, vLLM and TEI: {"query", "documents": [text or
                        {"text"}], "top_n"?, "return_documents"? (default true), "return_grades"?, "model"?}
                        (TEI's "texts" / "return_text" accepted for documents / return_documents)
                        -> {"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"},
                        "grade"?, "probs"?}] sorted by relevance_score, "usage"}; relevance_score is the
                        expected grade over the five label probabilities divided by 4, in [0, 1]
  POST /v1/completions  the OpenAI completions API (prompt as text or token ids, n, temperature, top_p,
                        max_tokens, seed, stop, logprobs); the n samples of a prompt share its KV
  GET  /v1/models, GET /health, GET /metrics (Prometheus text format)

Why it is fast. In the AFRL format the grade is the first token, so a score is one prefill. The
prompt prefix every pair shares (system prompt and chat template up to the user's text) has its KV
computed once at start-up; a pair prefills only its own suffix, and only the five label rows of the
LM head are applied (`afrl_fast.scoring.FirstTokenScorer`, the offline evaluator's code). A rerank
request's candidates share more: the query's part of the prompt is prefilled once on top of that
KV, and each candidate prefills only its document and the template's end (two-level prefix;
`FirstTokenScorer.score_query`). A prompt's ids are the cached ids of the template around the user
message plus the tokenisation of that message alone (`PromptPieces`); requests waiting together
are tokenised in one batch call in a tokenizer thread. Pairs from all clients go through one asyncio
queue; a batching task takes up to --max-batch of them, keeps filling the batch while the previous
one is still computing, then waits at most --max-wait-ms after its first pair arrived for requests
still being tokenised (not at all when there are none); inference runs in one worker thread, so the
event loop keeps accepting requests, and the next batch is handed to it before the previous one's
requests are answered. A full queue answers 503 with Retry-After instead of growing memory.

Bad input gets a JSON 4xx naming the field (and pair or document index): {"error": {"message",
"type", "param", "code"}}, the OpenAI error shape. A body that is not UTF-8 is a 400 naming the
first bad byte; a query or document made only of whitespace, control characters (NUL included) or
invisible format characters is refused as blank; a request naming another model than the served
one (or "default") gets OpenAI's 404 model_not_found.

Access. With --api-key KEY, or the AFRL_FAST_API_KEY environment variable (preferred: a flag shows
in the process list), every route but GET /health needs the header `Authorization: Bearer KEY`
(what the openai client sends for its api_key); others get 401. /health stays open for load
balancers and orchestrators' probes; it tells the model's name and limits, nothing else. The key is
compared in constant time. Listening beyond loopback (e.g. --host 0.0.0.0) without a key prints a
warning. --host and --port (1-65535) are checked, and the port bound, before the model loads.

Limits. One completions request may ask for at most --max-completion-tokens tokens (prompts x n x
max_tokens) and --max-logprob-entries log-probs (those tokens x (1 + logprobs)); more is a 400
naming max_tokens or logprobs. Completion bodies are built in the tokenizer thread, off the event
loop. A request body must arrive whole within --body-timeout seconds (else 408); an idle keep-alive
connection is closed after --keep-alive-timeout seconds. SIGTERM stops accepting connections,
finishes the requests in flight for at most --graceful-timeout seconds (then cancels what is left,
one log line each), and exits by that signal, as uvicorn re-raises it.

The package, one concern per module (imports go down this list, never up):

  errors       ServeError (start-up) and ApiError (a request), the one JSON error shape
  config       ServeConfig: the limits and batching, the CLI flags of the same names
  backends     where the model runs: EmbeddedBackend (any device), SGLangBackend (GPU)
  protocol     the pydantic request and response models
  metrics      the Prometheus metrics
  middleware   pure ASGI middlewares: request metrics, the body limit
  batching     the tokenizer stage, the scoring batcher, the generation merger
  completions  OpenAI completions: request checks, token strings, stops, logprobs
  service      Service: the backend, its threads and queues, what every route shares
  handlers     one handler per endpoint: request model in, response body out
  routes       the APIRouter; the service is a dependency (the lifespan's state)
  app          create_app: the FastAPI app, its lifespan and error handlers
  cli          the flags, start-up checks, uvicorn; __main__ runs it
"""
