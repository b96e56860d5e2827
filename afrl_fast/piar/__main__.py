"""python -m afrl_fast.piar: PIAR, the instructions refined against a teacher endpoint."""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path

from afrl_fast.cli import Parser
from afrl_fast.endpoint import APIS, Endpoint, EndpointError
from afrl_fast.files import check_output_path
from afrl_fast.format import FormatError, instructions_help, load_tokenizer, resolve_prompt_settings
from afrl_fast.metrics import MetricsError
from afrl_fast.pairs import DataError, read_pairs
from afrl_fast.piar import __doc__ as piar_doc, PiarError, run_piar, shown
from afrl_fast.rulebook import RulebookError


# Each model PIAR talks to, by its role: --<role>-endpoint URL and --<role>-model NAME (the synthesize spelling).
ROLES = {"actor": "the judge being instructed", "evaluator": "the model that attributes mistakes to rules",
         "refiner": "the model that rewrites the instructions"}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m afrl_fast.piar", description=piar_doc.split("\n")[0])
    p.add_argument("--pairs", required=True,
                   help="labelled validation pairs (Parquet with labels) the texts are graded on")
    p.rename("--val", "--pairs")
    for role, what in ROLES.items():
        p.add_argument(f"--{role}-endpoint", required=True, metavar="URL",
                       help=f"URL of {what}: an OpenAI-compatible server (http://host:port or .../v1)")
        p.rename(f"--{role}", f"--{role}-endpoint")
    for role in ROLES:
        p.add_argument(f"--{role}-model", default="default", metavar="NAME",
                       help=f"the model name the {role}'s server answers to (default: default, which afrl_fast.serve "
                            "takes; other servers list theirs at /v1/models)")
    p.add_argument("--out", required=True,
                   help="output folder (new or empty): round_NNN/, history.json, instructions.txt")
    p.add_argument("--rounds", type=int, default=5, help="refinement rounds at most")
    p.add_argument("--patience", type=int, default=2, help="stop after this many rounds in a row without a gain")
    p.add_argument("--instructions", default=None, help=instructions_help(what="the starting system prompt"))
    p.add_argument("--rulebook", default=None, help="rulebook YAML (default: configs/rulebook/default.yaml)")
    p.add_argument("--api", choices=APIS, default="completions",
                   help="completions: prompts rendered here with --tokenizer's chat template; chat: the server's")
    p.add_argument("--tokenizer", default="qwen3",
                   help="tokenizer whose chat template renders prompts (completions API)")
    p.add_argument("--max-diagnose", type=int, default=64, help="misgraded pairs sent to the evaluator per round")
    p.add_argument("--refiner-max-tokens", type=int, default=2048,
                   help="longest rewritten text the refiner may return, in tokens")
    p.add_argument("--max-unparsed", type=float, default=0.2,
                   help="fraction of validation pairs whose answer may carry no grade; more ends the run under the "
                        "starting text and rejects a candidate text")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once, per endpoint")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=5, help="retries (with backoff) on 429, 5xx and connection errors")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        for name in ("rounds", "patience", "max_diagnose", "refiner_max_tokens", "concurrency"):
            if getattr(args, name) < 1:
                raise PiarError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
        if not 0.0 <= args.max_unparsed <= 1.0:
            raise PiarError(f"--max-unparsed must be a fraction in [0, 1], got {args.max_unparsed}")
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise PiarError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
        if args.retries < 0:
            raise PiarError(f"--retries must be ≥ 0, got {args.retries}")
        check_output_path(out, PiarError, kind="dir")
        if out.exists() and any(out.iterdir()):
            raise PiarError(f"{out}: folder is not empty; give a new --out")
        pairs = read_pairs(args.pairs).to_pylist()
        if not pairs:
            raise PiarError(f"{args.pairs}: no pairs; PIAR grades the instructions on labelled validation pairs")
        prompt = resolve_prompt_settings(None, args.rulebook, args.instructions)
        tokenizer = load_tokenizer(args.tokenizer)
        endpoints = [Endpoint(url, model, api=args.api, concurrency=args.concurrency, timeout=args.timeout,
                              retries=args.retries)
                     for url, model in ((args.actor_endpoint, args.actor_model),
                                        (args.evaluator_endpoint, args.evaluator_model),
                                        (args.refiner_endpoint, args.refiner_model))]

        async def go():
            try:
                return await run_piar(args, out, pairs, tokenizer, prompt.rulebook, prompt.instructions, *endpoints)
            finally:
                for e in endpoints:
                    await e.close()
        history = asyncio.run(go())
    except (PiarError, DataError, EndpointError, FormatError, RulebookError, MetricsError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    accepted = sum(r["accepted"] for r in history["rounds"])
    print(f"{len(history['rounds'])} rounds, {accepted} accepted; best 5-ACC {shown(history['best']['acc5'])}, "
          f"Pair-ACC {shown(history['best']['pair_acc'])}; instructions: {out / 'instructions.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
