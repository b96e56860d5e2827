"""First-token evaluation (paper §4.2).

Scores held-out pairs with the first-token scorer (afrl_fast.scoring: one prefill per pair, five
label logits), and writes the metrics of afrl_fast.metrics; in a training run it also scores the
splits during RL and checks greedy traces against the rulebook.

    python -m afrl_fast.evaluate --model DIR --data pairs.parquet --out metrics.json \
        [--predictions preds.parquet] [--tokenizer T] [--batch-size B] [--max-prompt-tokens L]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from . import dist as D
from .data import DataError, read_pairs
from .errors import ScoringError
from .files import atomic_write_many, check_output_path
from .format import FormatError, load_tokenizer, resolve_prompt_settings
from .metrics import MetricsError, compute_metrics, expected_score, format_table, metrics_json
from .reward import RewardConfig
from .rollouts import STREAM_EVAL, generate_rollouts, prompt_seed
from .rulebook import RulebookError
from .scoring import EngineFirstTokenScorer, FirstTokenScorer, has_tokenizer, load_model
from .verify import verify_batch

__all__ = ["EngineFirstTokenScorer", "FirstTokenScorer", "evaluate_splits", "majority_baseline", "trace_validity",
           "results_table", "main"]


def evaluate_splits(scorer, tables: dict, names, *, max_rows: int, info) -> dict:
    """First-token metrics on held-out splits with `scorer.score_pairs` (FirstTokenScorer or
    EngineFirstTokenScorer); each rank scores a slice, every rank gets all."""
    results = {}
    for name in names:
        table = tables[name]
        if max_rows and table.num_rows > max_rows:
            table = table.slice(0, max_rows)
        rows = list(range(info.rank, table.num_rows, info.world))
        probs = scorer.score_pairs(table.take(rows)) if rows else np.zeros((0, 5))
        full = np.zeros((table.num_rows, 5))
        for r, p in D.all_gather_objects((rows, probs)):
            full[r] = p
        results[name] = compute_metrics(np.asarray(table.column("label").to_pylist()), full,
                                        np.asarray(table.column("query_id").to_pylist()))
        # the answered grade per pair, as one string of digits: what a paired comparison of two
        # phases on the same pairs needs (train.py keeps it out of results.json's rows)
        results[name]["answers"] = "".join(map(str, full.argmax(1).tolist()))
    return results


def majority_baseline(train_table, tables: dict, names) -> dict:
    """Always predicting the most frequent training grade (all scores tie: Pair-ACC 0.5)."""
    majority = int(np.bincount(np.asarray(train_table.column("label").to_pylist()), minlength=5).argmax())
    out = {}
    for name in names:
        t = tables[name]
        probs = np.zeros((t.num_rows, 5))
        probs[:, majority] = 1.0
        out[name] = compute_metrics(np.asarray(t.column("label").to_pylist()), probs,
                                    np.asarray(t.column("query_id").to_pylist()))
    return out


def trace_validity(engine, tokenizer, rulebook, prompt_ids, labels, n: int, *, max_new_tokens: int,
                   seed: int) -> dict:
    """Greedy traces of the first n prompts: the share in valid AFRL format, with y_dec = y_final,
    and whose boxed step values imply the answered grade (ŷ = y_dec)."""
    n = min(n, len(prompt_ids))
    if n == 0:
        return {"trace_fmt_rate": None, "trace_cst_rate": None, "trace_logic_rate": None, "n_traces": 0}
    ro = generate_rollouts(engine, tokenizer, list(range(n)), prompt_ids[:n], labels[:n], group_size=1,
                           temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                           seeds=[prompt_seed(seed, STREAM_EVAL, 0, i) for i in range(n)])
    res = verify_batch(ro.texts, ro.labels, rulebook, RewardConfig(gate="literal"))
    return {"trace_fmt_rate": float(res.fmt.mean()), "trace_cst_rate": float(res.cst.mean()),
            "trace_logic_rate": float((res.fmt & (res.y_hat == res.y_dec)).mean()), "n_traces": n}


RESULT_KEYS = [("acc5", "5-ACC"), ("acc2", "2-ACC"), ("pair_acc", "Pair-ACC"), ("ndcg3", "NDCG@3"),
               ("macro_f1", "Macro-F1"), ("weighted_f1", "W-F1")]


def results_table(rows: dict, names) -> str:
    """model → split → metrics as one text table per split (percentages)."""
    lines = []
    for name in names:
        lines.append(f"\n{name.upper()}")
        lines.append(f"{'model':<16}" + "".join(f"{h:>10}" for _, h in RESULT_KEYS))
        for model, res in rows.items():
            m = res[name]
            lines.append(f"{model:<16}" + "".join(f"{100 * m[k]:>10.2f}" if m.get(k) is not None else f"{'n/a':>10}"
                                                  for k, _ in RESULT_KEYS))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data and CLI

def predictions_table(table, probs: np.ndarray):
    """query_id, doc_id, label, p0..p4, score, pred (float64 so metrics recompute exactly)."""
    import pyarrow as pa

    cols = {"query_id": table.column("query_id"), "doc_id": table.column("doc_id"),
            "label": table.column("label").cast(pa.int8())}
    cols.update({f"p{k}": pa.array(probs[:, k], pa.float64()) for k in range(5)})
    cols["score"] = pa.array(expected_score(probs), pa.float64())
    cols["pred"] = pa.array(probs.argmax(1).astype(np.int8), pa.int8())
    return pa.table(cols)


def check_device(name: str) -> None:
    """--device must name a device this machine has (checked before any loading)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ScoringError(f"--device {name!r} is not a device name (cpu, cuda, cuda:1, …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScoringError(f"--device {name}: no CUDA device is visible on this machine (use --device cpu)")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m afrl_fast.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model folder")
    ap.add_argument("--data", required=True, help="pairs parquet: query_id, doc_id, query, document, label")
    ap.add_argument("--out", required=True, help="metrics JSON")
    ap.add_argument("--predictions", help="also write per-pair predictions parquet here")
    ap.add_argument("--tokenizer", help="tokenizer folder or 'qwen3' (default: the model's, else qwen3)")
    ap.add_argument("--rulebook", help="rulebook YAML (default: the copy in the model folder, else the default rulebook)")
    ap.add_argument("--instructions", default=None,
                    help="system prompt: full (the whole rulebook), short (its summary) or a text file; "
                         "default: the prompt saved in the model folder at export, else full")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-prompt-tokens", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # everything that can be checked cheaply is, before the model is loaded and scored
        check_output_path(args.out, ScoringError)
        if args.predictions:
            check_output_path(args.predictions, ScoringError)
        check_device(args.device)
        table = read_pairs(args.data)           # validates the schema; errors name file and column
        tok_path = args.tokenizer or (args.model if has_tokenizer(args.model) else "qwen3")
        tokenizer = load_tokenizer(tok_path)
        if not Path(args.model).is_dir():
            raise ScoringError(f"{args.model}: model folder not found")
        prompt = resolve_prompt_settings(args.model, args.rulebook, args.instructions)
        scorer = FirstTokenScorer(load_model(args.model, args.dtype), tokenizer, prompt.rulebook,
                                  batch_size=args.batch_size, device=args.device,
                                  instructions=prompt.instructions,
                                  max_prompt_tokens=args.max_prompt_tokens, progress=not args.no_progress)
        probs = scorer.score_pairs(table)
        metrics = compute_metrics(table.column("label").to_numpy(zero_copy_only=False), probs,
                                  np.asarray(table.column("query_id").to_pylist(), dtype=object))
        metrics.update(model=str(args.model), data=str(args.data), n_truncated=scorer.n_truncated,
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
    sys.exit(main())
