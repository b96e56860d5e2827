"""The command line of the service: `python -m afrl_fast.serve --model DIR [flags]` (`--help` lists
every flag with its default). Flags are checked, and the model loaded, before the port is served;
anything that cannot start ends in one line on stderr and exit status 2."""
import argparse
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvicorn
import yaml
from transformers.utils import logging as hf_logging

from ..evaluate import PromptEncoder, ScoringError
from ..format import FormatError, resolve_prompt_settings
from ..rulebook import RulebookError
from .app import create_app
from .backends import BACKENDS, load_backend, pick_device
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
    ap = argparse.ArgumentParser(prog="python -m afrl_fast.serve", description=DESCRIPTION)
    ap.add_argument("--model", required=True, help="model folder (save_pretrained export, Qwen3 tokenizer)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--instructions", default=None,
                    help="system prompt: full, short or a text file; default: the one saved with the model, else full")
    ap.add_argument("--rulebook", help="rulebook YAML (default: the copy in the model folder, else the default)")
    ap.add_argument("--backend", default="embedded", choices=BACKENDS)
    ap.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1 ...")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for inference; default on CPU: one per core but one, which the event "
                         "loop and the tokenizer need")
    ap.add_argument("--max-batch", type=int, default=64, help="pairs per inference batch")
    ap.add_argument("--forward-rows", type=int, default=None,
                    help="rows per forward pass within a batch (embedded backend); default: 8 on a CPU, where "
                         "small length-sorted forwards pad less and stay in cache, else --max-batch")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="longest a pair waits for its batch to fill")
    ap.add_argument("--max-queue", type=int, default=1024, help="pairs waiting before requests get 503")
    ap.add_argument("--max-request-pairs", type=int, default=256)
    ap.add_argument("--max-rerank-documents", type=int, default=1000,
                    help="candidate documents per rerank request (at most --max-queue)")
    ap.add_argument("--max-body-bytes", type=int, default=8 << 20)
    ap.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context length")
    ap.add_argument("--truncate", action="store_true",
                    help="cut the document of an over-long pair to fit instead of answering 400")
    ap.add_argument("--explain-max-tokens", type=int, default=512)
    ap.add_argument("--served-model-name", default=None, help="default: the model folder's name")
    ap.add_argument("--no-prefix-cache", action="store_true", help="prefill whole prompts (for comparison)")
    ap.add_argument("--no-query-prefix", action="store_true",
                    help="rerank: do not share a query's prefix across its candidates, only the system prefix "
                         "(for comparison)")
    ap.add_argument("--sglang-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to sglang.Engine, e.g. tp_size=2 mem_fraction_static=0.8")
    ap.add_argument("--graceful-timeout", type=float, default=60.0,
                    help="seconds SIGTERM waits for requests in flight")
    ap.add_argument("--log-level", default="warning")
    return ap.parse_args(argv)


def build(args):
    """(app, backend) from parsed flags; ServeError & co. for anything that cannot start."""
    cfg = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                      max_request_pairs=args.max_request_pairs, max_body_bytes=args.max_body_bytes,
                      max_rerank_documents=args.max_rerank_documents, query_prefix=not args.no_query_prefix,
                      max_prompt_tokens=args.max_prompt_tokens, truncate=args.truncate,
                      explain_max_tokens=args.explain_max_tokens,
                      model_name=args.served_model_name or Path(args.model).resolve().name)
    cfg.check()
    if args.threads is not None and args.threads < 1:
        raise ServeError(f"--threads must be >= 1, got {args.threads}")
    if args.forward_rows is not None and args.forward_rows < 1:
        raise ServeError(f"--forward-rows must be >= 1, got {args.forward_rows}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif args.backend == "embedded" and pick_device(args.device) == "cpu":
        # Inference threads spin-wait at every op; one sharing a core with the event loop stalls both.
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))
    if not Path(args.model).is_dir():
        raise ServeError(f"{args.model}: model folder not found")
    prompt = resolve_prompt_settings(args.model, args.rulebook, args.instructions)
    sglang_kwargs = parse_engine_args(args.sglang_arg)
    hf_logging.disable_progress_bar()
    worker = ThreadPoolExecutor(1, thread_name_prefix="afrl-infer")
    backend = worker.submit(load_backend, args.backend, args.model, prompt, device=args.device, dtype=args.dtype,
                            max_batch=args.max_batch, share_prefix=not args.no_prefix_cache,
                            forward_rows=args.forward_rows,
                            sglang_kwargs=sglang_kwargs).result()
    encoder = PromptEncoder(backend.tokenizer, prompt.rulebook, prompt.instructions)
    log.warning("prompt: %s; shared prefix %d tokens", prompt.source, backend.prefix_tokens)
    return create_app(backend, cfg, encoder, worker), backend


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        app, backend = build(args)
    except (ServeError, ScoringError, FormatError, RulebookError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=False, timeout_graceful_shutdown=args.graceful_timeout))
    print(f"serving {args.model} ({backend.kind}, {backend.device}) on http://{args.host}:{args.port}", flush=True)
    server.run()        # after a SIGTERM, uvicorn ends the process by that signal once requests are answered
    return 0 if server.started else 1
