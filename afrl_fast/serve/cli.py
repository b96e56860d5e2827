"""The command line of the service: `python -m afrl_fast.serve --model DIR [flags]` (`--help` lists
every flag with its default). The flags, the address and the port are checked, and the port bound,
before the model loads; anything that cannot start ends in one line on stderr and exit status 2."""
import ipaddress
import logging
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
import yaml
from transformers.utils import logging as hf_logging

from ..cli import DEVICE_HELP, Parser
from ..endpoint import API_KEY_ENV
from ..errors import ScoringError
from ..prompt_encoding import PromptEncoder
from ..format import FormatError, instructions_help, resolve_prompt_settings
from ..rulebook import RulebookError
from .app import create_app
from .backends import BACKENDS, check_device, load_backend
from .config import ServeConfig
from .errors import ServeError

log = logging.getLogger("afrl_fast.serve")
DESCRIPTION = "Online scoring service: first-token relevance scores over HTTP, a rerank API, and OpenAI-compatible completions."


def parse_engine_args(items: list[str]) -> dict:
    """--sglang-arg KEY=VALUE pairs -> Engine keyword arguments (values parsed as YAML scalars)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ServeError(f"--sglang-arg must be KEY=VALUE, got {item!r}")
        out[key.replace("-", "_")] = yaml.safe_load(value)
    return out


def parse_args(argv):
    d = ServeConfig()
    ap = Parser(prog="python -m afrl_fast.serve", description=DESCRIPTION)
    ap.add_argument("--model", required=True, help="model folder (save_pretrained export, Qwen3 tokenizer)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: %(default)s; another address without an API key "
                         "gets a warning)")
    ap.add_argument("--port", type=int, default=8000, help="port, 1-65535 (default: %(default)s)")
    ap.add_argument("--api-key", default=None,
                    help=f"require 'Authorization: Bearer <key>' on every route but /health (default: the "
                         f"{API_KEY_ENV} environment variable, else no key; prefer the variable, a flag shows in "
                         "the process list)")
    ap.add_argument("--instructions", default=None, help=instructions_help("--model"))
    ap.add_argument("--rulebook", help="rulebook YAML (default: the copy in the model folder, else the default)")
    ap.add_argument("--backend", default="embedded", choices=BACKENDS,
                    help="embedded: the model in this process, any device; sglang: an SGLang engine (GPU, the "
                         "sglang extra) (default: %(default)s)")
    ap.add_argument("--device", default="auto", help=f"{DEVICE_HELP}; embedded backend")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="weights' dtype (auto: as saved)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for inference (default on CPU: one per core but one, which the event "
                         "loop and the tokenizer need)")
    ap.add_argument("--max-batch", type=int, default=d.max_batch, help="pairs per inference batch (default: %(default)s)")
    ap.add_argument("--forward-rows", type=int, default=None,
                    help="rows per forward pass within a batch, embedded backend (default: 8 on a CPU, where "
                         "small length-sorted forwards pad less and stay in cache, else --max-batch)")
    ap.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                    help="longest a pair waits for its batch to fill (default: %(default)s)")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help="pairs (or completion rows) waiting before requests get 503 (default: %(default)s)")
    ap.add_argument("--max-request-pairs", type=int, default=d.max_request_pairs,
                    help="pairs per /v1/score request (default: %(default)s)")
    ap.add_argument("--max-rerank-documents", type=int, default=d.max_rerank_documents,
                    help="candidate documents per rerank request, at most --max-queue (default: %(default)s)")
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                    help="request body size; larger gets 413 (default: %(default)s)")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="tokens per scored prompt (default: the model's context length)")
    ap.add_argument("--truncate", action="store_true",
                    help="cut the document of an over-long pair to fit instead of answering 400 (default: off)")
    ap.add_argument("--explain-max-tokens", type=int, default=d.explain_max_tokens,
                    help="trace tokens per explained pair (default: %(default)s)")
    ap.add_argument("--max-completion-tokens", type=int, default=d.max_completion_tokens,
                    help="prompts x n x max_tokens per completions request; more gets 400 naming max_tokens "
                         "(default: %(default)s)")
    ap.add_argument("--max-logprob-entries", type=int, default=d.max_logprob_entries,
                    help="prompts x n x max_tokens x (1 + logprobs) per completions request; more gets 400 "
                         "naming logprobs (default: %(default)s)")
    ap.add_argument("--served-model-name", default=None,
                    help="the model's name in answers; a request naming another model (but \"default\") gets "
                         "404 (default: the model folder's name)")
    ap.add_argument("--no-prefix-cache", action="store_true",
                    help="prefill whole prompts, for comparison (default: off)")
    ap.add_argument("--no-query-prefix", action="store_true",
                    help="rerank: do not share a query's prefix across its candidates, only the system prefix, "
                         "for comparison (default: off)")
    ap.add_argument("--sglang-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to sglang.Engine, e.g. tp_size=2 mem_fraction_static=0.8 (default: none)")
    ap.add_argument("--body-timeout", type=float, default=d.body_timeout_s,
                    help="seconds a request's whole body may take to arrive; slower gets 408 (default: %(default)s)")
    ap.add_argument("--keep-alive-timeout", type=float, default=5.0,
                    help="seconds an idle keep-alive connection stays open (uvicorn's timeout_keep_alive; "
                         "default: %(default)s)")
    ap.add_argument("--graceful-timeout", type=float, default=60.0,
                    help="seconds SIGTERM waits for requests in flight before cancelling them (uvicorn's "
                         "timeout_graceful_shutdown; default: %(default)s)")
    ap.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error", "critical"),
                    help="the service's and uvicorn's log level")
    return ap.parse_args(argv)


def resolve_address(host: str, port: int) -> tuple:
    """(family, type, proto, sockaddr) of host:port; ServeError naming the flag otherwise. Done
    before anything loads: uvicorn would take a port over 65535 modulo 65536 and print the other."""
    if not 1 <= port <= 65535:
        raise ServeError(f"--port must be 1-65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"--host {host!r}: not an address or a name this machine resolves "
                         f"({getattr(e, 'strerror', None) or e})") from None
    return family, kind, proto, address


def listen_socket(host: str, port: int, resolved: tuple) -> socket.socket:
    """The bound socket uvicorn then serves on (bound here, so a port in use is one line before the
    model loads, and no other process can take the port meanwhile). SO_REUSEADDR as uvicorn sets it."""
    family, kind, proto, address = resolved
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ServeError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def is_loopback(resolved: tuple) -> bool:
    try:
        return ipaddress.ip_address(resolved[3][0].split("%")[0]).is_loopback
    except ValueError:
        return False


def build(args, api_key: str | None):
    """(app, backend, bound socket) from parsed flags; ServeError & co. for anything that cannot start."""
    cfg = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      max_request_pairs=args.max_request_pairs, max_body_bytes=args.max_body_bytes,
                      max_rerank_documents=args.max_rerank_documents, query_prefix=not args.no_query_prefix,
                      max_prompt_tokens=args.max_prompt_tokens, truncate=args.truncate,
                      explain_max_tokens=args.explain_max_tokens, max_completion_tokens=args.max_completion_tokens,
                      max_logprob_entries=args.max_logprob_entries, body_timeout_s=args.body_timeout,
                      api_key=api_key, model_name=args.served_model_name or Path(args.model).resolve().name)
    cfg.check()
    resolved = resolve_address(args.host, args.port)
    for flag, value in (("--threads", args.threads), ("--forward-rows", args.forward_rows)):
        if value is not None and value < 1:
            raise ServeError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--keep-alive-timeout", args.keep_alive_timeout),
                        ("--graceful-timeout", args.graceful_timeout)):
        if not value > 0:
            raise ServeError(f"{flag} must be > 0, got {value}")
    device = check_device(args.device) if args.backend == "embedded" else None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device == "cpu":
        # Inference threads spin-wait at every op; one sharing a core with the event loop stalls both.
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    if not Path(args.model).is_dir():
        raise ServeError(f"{args.model}: model folder not found")
    prompt = resolve_prompt_settings(args.model, args.rulebook, args.instructions)
    sglang_kwargs = parse_engine_args(args.sglang_arg)
    if not api_key and not is_loopback(resolved):
        print(f"warning: listening on {args.host} without an API key: anyone who reaches the port can use the "
              f"model (--api-key or {API_KEY_ENV})", file=sys.stderr, flush=True)
    sock = listen_socket(args.host, args.port, resolved)
    try:
        hf_logging.disable_progress_bar()
        worker = ThreadPoolExecutor(1, thread_name_prefix="afrl-infer")
        backend = worker.submit(load_backend, args.backend, args.model, prompt, device=args.device,
                                dtype=args.dtype, max_batch=args.max_batch, share_prefix=not args.no_prefix_cache,
                                forward_rows=args.forward_rows, sglang_kwargs=sglang_kwargs).result()
        encoder = PromptEncoder(backend.tokenizer, prompt.rulebook, prompt.instructions)
        log.warning("prompt: %s; shared prefix %d tokens", prompt.source, backend.prefix_tokens)
        return create_app(backend, cfg, encoder, worker), backend, sock
    except BaseException:
        sock.close()
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    try:
        app, backend, sock = build(args, api_key)
    except (ServeError, ScoringError, FormatError, RulebookError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=False, timeout_keep_alive=args.keep_alive_timeout,
                                           timeout_graceful_shutdown=args.graceful_timeout))
    print(f"serving {args.model} ({backend.kind}, {backend.device}) on http://{args.host}:{args.port}"
          f"{' (API key required)' if api_key else ''}", flush=True)
    # after a SIGTERM, uvicorn ends the process by that signal once requests are answered
    server.run(sockets=[sock])
    return 0 if server.started else 1
