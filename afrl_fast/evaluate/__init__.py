"""First-token evaluation (paper §4.2).

Scores held-out pairs with the first-token scorer (afrl_fast.scoring: one prefill per pair, five
label logits), and writes the metrics of afrl_fast.metrics; in a training run it also scores the
splits during RL and checks greedy traces against the rulebook.

    python -m afrl_fast.evaluate --model DIR --pairs pairs.parquet --out metrics.json \
        [--predictions preds.parquet] [--tokenizer T] [--batch-size B] [--max-prompt-tokens L]
"""
from __future__ import annotations


import numpy as np

from .. import dist as D
from ..metrics import compute_metrics, expected_score
from ..reward import RewardConfig
from ..rollouts import STREAM_EVAL, generate_rollouts, prompt_seed
from ..scoring import EngineFirstTokenScorer, FirstTokenScorer
from ..verify import verify_batch

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
