"""python -m afrl_fast.evaluate: first-token evaluation of a model folder on a pairs file."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from afrl_fast.cli import DEVICE_HELP, Parser, resolve_device
from afrl_fast.errors import ScoringError
from afrl_fast.evaluate import __doc__ as evaluate_doc, predictions_table
from afrl_fast.files import atomic_write_many, check_output_path
from afrl_fast.format import FormatError, instructions_help, load_tokenizer, resolve_prompt_settings
from afrl_fast.metrics import MetricsError, compute_metrics, format_table, metrics_json
from afrl_fast.pairs import DataError, read_pairs
from afrl_fast.rulebook import RulebookError
from afrl_fast.scoring import FirstTokenScorer, has_tokenizer, load_model


def parse_args(argv):
    ap = Parser(prog="python -m afrl_fast.evaluate", description=evaluate_doc.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (a save_pretrained export, e.g. a run's final_model)")
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
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # everything that can be checked cheaply is, before the model is loaded and scored
        check_output_path(args.out, ScoringError)
        if args.predictions:
            check_output_path(args.predictions, ScoringError)
        device = resolve_device(args.device, ScoringError)
        table = read_pairs(args.pairs)           # validates the schema; errors name file and column
        tok_path = args.tokenizer or (args.model if has_tokenizer(args.model) else "qwen3")
        tokenizer = load_tokenizer(tok_path)
        if not Path(args.model).is_dir():
            raise ScoringError(f"{args.model}: model folder not found")
        prompt = resolve_prompt_settings(args.model, args.rulebook, args.instructions)
        scorer = FirstTokenScorer(load_model(args.model, args.dtype), tokenizer, prompt.rulebook,
                                  batch_size=args.batch_size, device=device,
                                  instructions=prompt.instructions,
                                  max_prompt_tokens=args.max_prompt_tokens, progress=not args.no_progress)
        probs = scorer.score_pairs(table)
        metrics = compute_metrics(table.column("label").to_numpy(zero_copy_only=False), probs,
                                  np.asarray(table.column("query_id").to_pylist(), dtype=object))
        metrics.update(model=str(args.model), data=str(args.pairs), n_truncated=scorer.n_truncated,
                       max_prompt_tokens=args.max_prompt_tokens)
        outputs = {Path(args.out): lambda f: f.write(metrics_json(metrics).encode("utf-8"))}
        if args.predictions:
            import pyarrow.parquet as pq
            preds = predictions_table(table, probs)
            outputs[Path(args.predictions)] = lambda f: pq.write_table(preds, f)
        atomic_write_many(outputs)              # both files or neither
    except (DataError, ScoringError, MetricsError, FormatError, RulebookError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    if args.max_prompt_tokens is not None:
        print(f"truncated documents: {scorer.n_truncated} of {metrics['n']} "
              f"(prompts cut to {args.max_prompt_tokens} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
