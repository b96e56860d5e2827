"""python -m afrl_fast.evaluate: first-token evaluation of a model folder, or of a judge served by
`python -m afrl_fast.serve` (--endpoint, through /v1/score), on a pairs file."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from afrl_fast.cli import DEVICE_HELP, Parser, resolve_device
from afrl_fast.endpoint import API_KEY_ENV, EndpointError, ScoreEndpoint
from afrl_fast.errors import ScoringError
from afrl_fast.evaluate import __doc__ as evaluate_doc, predictions_table
from afrl_fast.files import atomic_write_many, check_output_path
from afrl_fast.format import FormatError, instructions_help, load_tokenizer, resolve_prompt_settings
from afrl_fast.observe import progress_bar
from afrl_fast.metrics import MetricsError, compute_metrics, format_table, metrics_json
from afrl_fast.pairs import DataError, read_pairs
from afrl_fast.rulebook import RulebookError
from afrl_fast.scoring import FirstTokenScorer, has_tokenizer, load_model


def parse_args(argv):
    ap = Parser(prog="python -m afrl_fast.evaluate", description=evaluate_doc.split("\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model folder (a save_pretrained export, e.g. a run's final_model)")
    which.add_argument("--endpoint", help="URL of a `python -m afrl_fast.serve` server: its /v1/score scores the "
                                          "pairs, prompted with the server's own settings")
    ap.add_argument("--pairs", required=True, help="labelled pairs Parquet: query_id, doc_id, query, document, label")
    ap.rename("--data", "--pairs")
    ap.add_argument("--out", required=True, help="metrics JSON")
    ap.add_argument("--predictions", help="also write per-pair predictions parquet here")
    ap.add_argument("--tokenizer", help="tokenizer folder or 'qwen3' (default: the model's, else qwen3)")
    ap.add_argument("--rulebook", help="rulebook YAML (default: the copy in the model folder, else the default rulebook)")
    ap.add_argument("--instructions", default=None, help=instructions_help("--model"))
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    ap.add_argument("--max-prompt-tokens", type=int, default=None,
                    help="cut each document so its prompt fits this many tokens (default: no cut)")
    ap.add_argument("--device", default="auto", help=DEVICE_HELP)
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                    help="weights' dtype (auto: as saved)")
    ap.add_argument("--api-key", default=None,
                    help=f"with --endpoint: the server's API key (default: the {API_KEY_ENV} environment variable)")
    ap.add_argument("--timeout", type=float, default=300.0, help="with --endpoint: seconds per request")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def local_scorer(args, device):
    tok_path = args.tokenizer or (args.model if has_tokenizer(args.model) else "qwen3")
    tokenizer = load_tokenizer(tok_path)
    if not Path(args.model).is_dir():
        raise ScoringError(f"{args.model}: model folder not found")
    prompt = resolve_prompt_settings(args.model, args.rulebook, args.instructions)
    return FirstTokenScorer(load_model(args.model, args.dtype), tokenizer, prompt.rulebook,
                            batch_size=args.batch_size, device=device, instructions=prompt.instructions,
                            max_prompt_tokens=args.max_prompt_tokens, progress=not args.no_progress)


def remote_scorer(args):
    """The served judge: prompting and placement are its server's, so those flags are refused here."""
    given = [f"--{k.replace('_', '-')}" for k in ("tokenizer", "rulebook", "instructions", "max_prompt_tokens")
             if getattr(args, k) is not None]
    given += [f"--{k}" for k, default in (("device", "auto"), ("dtype", "auto")) if getattr(args, k) != default]
    if given:
        raise ScoringError(f"{', '.join(given)}: with --endpoint the server's own settings prompt and place the "
                           "model; set them on `python -m afrl_fast.serve`")
    return ScoreEndpoint(args.endpoint, batch_size=args.batch_size, timeout=args.timeout, api_key=args.api_key)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # everything that can be checked cheaply is, before the model is loaded and scored
        check_output_path(args.out, ScoringError)
        if args.predictions:
            check_output_path(args.predictions, ScoringError)
        scorer = remote_scorer(args) if args.endpoint else None
        device = resolve_device(args.device, ScoringError) if scorer is None else None   # the server places its model
        table = read_pairs(args.pairs)           # validates the schema; errors name file and column
        if scorer is None:
            scorer = local_scorer(args, device)
            probs = scorer.score_pairs(table)
        else:
            with progress_bar(table.num_rows, "score", enabled=not args.no_progress, unit="pair") as bar:
                probs = scorer.score_pairs(table, bar)
        metrics = compute_metrics(table.column("label").to_numpy(zero_copy_only=False), probs,
                                  np.asarray(table.column("query_id").to_pylist(), dtype=object))
        metrics.update(model=str(args.model or args.endpoint), data=str(args.pairs), n_truncated=scorer.n_truncated,
                       max_prompt_tokens=args.max_prompt_tokens)
        outputs = {Path(args.out): lambda f: f.write(metrics_json(metrics).encode("utf-8"))}
        if args.predictions:
            import pyarrow.parquet as pq
            preds = predictions_table(table, probs)
            outputs[Path(args.predictions)] = lambda f: pq.write_table(preds, f)
        atomic_write_many(outputs)              # both files or neither
    except (DataError, ScoringError, EndpointError, MetricsError, FormatError, RulebookError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if args.max_prompt_tokens is not None:
        print(f"truncated documents: {scorer.n_truncated} of {metrics['n']} "
              f"(prompts cut to {args.max_prompt_tokens} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
