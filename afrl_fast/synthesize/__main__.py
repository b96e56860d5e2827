"""python -m afrl_fast.synthesize: verified AFRL traces for a pairs file from a chat endpoint."""
from __future__ import annotations

import argparse
import asyncio
import math
import re
import shlex
import sys
import time
from pathlib import Path

import pyarrow as pa

from afrl_fast.cli import Parser
from afrl_fast.endpoint import APIS, Endpoint, EndpointError
from afrl_fast.format import FormatError, instructions_help, load_tokenizer, resolve_prompt_settings
from afrl_fast.pairs import DataError, PAIR_COLUMNS, read_pairs
from afrl_fast.rulebook import RulebookError
from afrl_fast.synthesize import (__doc__ as synthesize_doc, RESERVED_SPLITS, SynthesisError, Synthesizer, assemble,
                                  check_out_dir, finished_pairs, read_shards, run_settings, sample_all, start_out_dir,
                                  training_overrides)


def parse_eval(items: list[str]) -> dict[str, pa.Table]:
    splits = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise SynthesisError(f"--eval {item!r}: expected NAME=PATH with a split name of letters, digits, _ and -")
        if name.lower() in RESERVED_SPLITS:     # lower: a case-insensitive file system would mix them up too
            raise SynthesisError(f"--eval {item!r}: {name!r} is the name of an output of this tool "
                                 f"({', '.join(RESERVED_SPLITS)}); give the split another name")
        if name.lower() in {k.lower() for k in splits}:
            raise SynthesisError(f"--eval {item!r}: a split named {name!r} was given already")
        splits[name] = read_pairs(path)
    return splits


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m afrl_fast.synthesize", description=synthesize_doc.split("\n")[0])
    p.add_argument("--pairs", required=True, help="labelled pairs (Parquet: query_id, doc_id, query, document, label)")
    p.add_argument("--teacher-endpoint", required=True, metavar="URL",
                   help="URL of the teacher that writes the traces: an OpenAI-compatible server (http://host:port or "
                        ".../v1)")
    p.add_argument("--teacher-model", default="default", metavar="NAME",
                   help="the model name the teacher's server answers to (default: default, which afrl_fast.serve "
                        "takes; other servers list theirs at /v1/models)")
    p.rename("--endpoint", "--teacher-endpoint")
    p.rename("--model", "--teacher-model")
    p.add_argument("--out", required=True,
                   help="output folder: train.parquet, rejected.parquet, hard.parquet, report.json, instructions.txt, "
                        "the --eval splits (made when the first shard is written)")
    p.add_argument("--n", type=int, default=10, help="samples per pair")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0-10")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens per sample; a sample cut here is rejected")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=5, help="retries (with backoff) on 429, 5xx and connection errors")
    p.add_argument("--judge-endpoint", metavar="URL",
                   help="URL of a judge that scores the verified samples of a pair 0-10 for best-of-N (default: none, "
                        "the shortest verified trace wins)")
    p.add_argument("--judge-model", metavar="NAME",
                   help="the model name the judge's server answers to (default: default, with --judge-endpoint)")
    p.add_argument("--api", choices=APIS, default="completions",
                   help="completions: the prompt is rendered here with --tokenizer's chat template; chat: the server's")
    p.add_argument("--tokenizer", default="qwen3", help="tokenizer whose chat template renders prompts (completions API)")
    p.add_argument("--instructions", default=None,
                   help=instructions_help() + "; written to OUT/instructions.txt for the trainer")
    p.add_argument("--rulebook", default=None, help="rulebook YAML (default: configs/rulebook/default.yaml)")
    p.add_argument("--eval", action="append", default=[], metavar="NAME=PATH",
                   help="an evaluation split copied into --out as NAME.parquet (name it in the trainer's eval.splits)")
    p.add_argument("--shard-size", type=int, default=64, help="pairs per result shard")
    p.add_argument("--seed", type=int, default=0, help="sampling seed sent with each request")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: finished pairs are kept, the others asked for again")
    return p


def check_args(args) -> None:
    for name, low in (("n", 1), ("max_tokens", 1), ("concurrency", 1), ("shard_size", 1), ("retries", 0), ("seed", 0)):
        if getattr(args, name) < low:
            raise SynthesisError(f"--{name.replace('_', '-')} must be ≥ {low}, got {getattr(args, name)}")
    if not (0.0 <= args.temperature <= 10.0):
        raise SynthesisError(f"--temperature must be in [0, 10], got {args.temperature}")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise SynthesisError(f"--timeout must be a finite number of seconds > 0, got {args.timeout}")
    if args.judge_model and not args.judge_endpoint:
        raise SynthesisError("--judge-model names the judge's model: give --judge-endpoint too")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    out = Path(args.out)
    try:
        # everything is checked before --out is made (start_out_dir, at the first shard)
        check_args(args)
        endpoint = Endpoint(args.teacher_endpoint, args.teacher_model, api=args.api, concurrency=args.concurrency,
                            timeout=args.timeout, retries=args.retries)
        judge = (Endpoint(args.judge_endpoint, args.judge_model or "default", api=args.api, concurrency=args.concurrency,
                          timeout=args.timeout, retries=args.retries) if args.judge_endpoint else None)
        pairs_table = read_pairs(args.pairs)
        if pairs_table.num_rows == 0:
            raise SynthesisError(f"{args.pairs}: no pairs to synthesize traces for")
        eval_splits = parse_eval(args.eval)
        prompt = resolve_prompt_settings(None, args.rulebook, args.instructions)
        tokenizer = load_tokenizer(args.tokenizer)
        settings = run_settings(args, Path(args.pairs), pairs_table.num_rows, prompt.instructions)
        check_out_dir(out, settings, args.resume)
        shards = read_shards(out, pairs_table.num_rows) if args.resume else []
        done = finished_pairs(shards)
        answered_before = any(r != "request_refused" for t in shards for r in t.column("reason").to_pylist())
        pairs = pairs_table.select(list(PAIR_COLUMNS)).to_pylist()
        todo = [i for i in range(len(pairs)) if i not in done]
        synth = Synthesizer(endpoint, judge, tokenizer, prompt, args.n, args.temperature, args.max_tokens, args.seed)
        next_shard = max((int(p.stem) for p in (out / "shards").glob("*.parquet")), default=-1) + 1 \
            if args.resume else 0
        try:
            asyncio.run(sample_all(synth, pairs, todo, out, next_shard, args.shard_size, len(done),
                                   start_out=lambda: start_out_dir(out, settings), answered_before=answered_before))
        except (EndpointError, KeyboardInterrupt) as e:
            why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            if (out / "synthesis.json").exists():
                kept = finished_pairs(read_shards(out, pairs_table.num_rows))
                where = (f"{len(kept)} of {len(pairs)} pairs are saved in {out}/shards, rerun with --resume to "
                         "finish")
            else:
                where = f"no pair was finished, nothing was written to {out}"
            print(f"error: {' '.join(why.split())}; {where}", file=sys.stderr)
            return 2 if isinstance(e, EndpointError) else 130
        start_out_dir(out, settings)
        report = assemble(out, pairs_table, prompt.rulebook, eval_splits, time.time() - t0, settings,
                          prompt.instructions)
    except (SynthesisError, DataError, EndpointError, FormatError, RulebookError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{report['pairs_with_trace']} of {report['pairs']} pairs got a verified trace "
          f"(yield {report['yield']:.1%}; {report['samples_kept']} of {report['samples']} samples kept); "
          f"{report['hard_pairs']} hard pairs in {out / 'hard.parquet'}")
    print("rejections: " + ", ".join(f"{k} {v}" for k, v in report["rejections"].items()))
    print("train on it under the same prompt: " + " ".join(map(shlex.quote, training_overrides(out, args.rulebook))))
    if report["pairs_to_retry"]:
        print(f"{report['pairs_to_retry']} pairs have no trace because the endpoint refused or aborted their "
              f"requests; rerun with --resume to ask for them again")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
