"""Evaluation metrics of a first-token relevance judge (paper §4.2, Tables 3–5).

Inputs, one row per (query, document) pair:
    labels     [n]     gold grades 0..4
    probs      [n, 5]  P(0..4) at the first answer position, renormalised over the five label tokens
    query_ids  [n]     any hashable ids; the ranking metrics work inside each query

Definitions (the choices the paper leaves open are fixed here, once):

- prediction = argmax P (lowest grade on an exact tie, numpy's argmax); expected score
  s = Σ k·P(k) (paper Eq. 9), used by both ranking metrics.
- 5-ACC: exact match. 2-ACC: {0,1} "irrelevant" vs {2,3,4} "relevant", on predictions.
- Pair-ACC: over all pairs of documents of one query with DIFFERENT gold grades, the fraction
  ordered correctly by s; equal s (exact float equality) counts half. `pair_acc` POOLS the pairs
  of all queries (each pair weighs the same, so queries with many graded documents weigh more,
  which is what a ranking serving all queries sees); `pair_acc_macro` averages the per-query
  fractions over the queries that have at least one such pair.
- NDCG@3 per query: gain = gold grade (linear, as scikit-learn's ndcg_score; `exp_gain=True`
  gives 2^g − 1), discount 1/log2(rank + 1), documents ranked by s descending; the ideal ranks by
  gold. Ties of s are broken PESSIMISTICALLY by default (lower gold first), so a model whose scores
  collapse to equal values (the over-confidence trap of paper §4.4.1) gains nothing from the file's
  row order; `ndcg_ties="input"` breaks them by input order instead. Queries whose ideal DCG is 0
  (every gold grade 0) are skipped; the result is the mean over the remaining queries.
- Macro-F1 / Weighted-F1 / per-class P, R, F1, support over the five classes, following
  scikit-learn with labels=[0..4] and zero_division=0: a class absent from both gold and
  predictions still counts in the macro mean with F1 = 0; weights of the weighted mean are the
  gold supports.
- confusion[i][j] = number of pairs with gold i predicted j (scikit-learn's convention).

Undefined values (no pair with different grades, no query with a non-zero ideal DCG) are None,
so the result stays strict JSON. CLI:

    python -m afrl_fast.metrics --predictions P.parquet [--out M.json] [--renormalise]

with columns query_id, label, p0..p4 in the predictions file.
"""
from __future__ import annotations

import json

import numpy as np

from ..files import atomic_write_text

N_CLASSES = 5
GRADES = np.arange(N_CLASSES)
PROB_COLUMNS = tuple(f"p{k}" for k in range(N_CLASSES))
ROW_SUM_ATOL = 1e-3   # float32 softmax rows sum to 1 within ~1e-6; larger drift means wrong inputs
NDCG_K = 3


class MetricsError(ValueError):
    """Inputs the metrics cannot be computed from; the message says what is wrong."""


# ----------------------------------------------------------------------------- validation

def check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise MetricsError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size == 0:
        raise MetricsError("no rows to evaluate")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise MetricsError(f"labels must be integers 0-4, got dtype {labels.dtype}")
    bad = ~np.isfinite(labels.astype(np.float64)) | (labels != np.round(labels)) | (labels < 0) | (labels > 4)
    if bad.any():
        raise MetricsError(f"labels must be integers 0-4; row {int(np.argmax(bad))} has {labels[bad][0]!r}")
    return labels.astype(np.int64)


def check_probs(probs, n: int, renormalise: bool = False) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (n, N_CLASSES):
        raise MetricsError(f"probs must have shape ({n}, {N_CLASSES}), got {probs.shape}")
    if not np.isfinite(probs).all():
        raise MetricsError(f"probs has NaN or inf in row {int(np.argmax(~np.isfinite(probs).all(1)))}")
    if (probs < 0).any():
        raise MetricsError(f"probs has a negative value in row {int(np.argmax((probs < 0).any(1)))}")
    sums = probs.sum(1)
    if renormalise:
        if (sums <= 0).any():
            raise MetricsError(f"row {int(np.argmax(sums <= 0))} of probs sums to 0; cannot renormalise")
        return probs / sums[:, None]
    off = np.abs(sums - 1.0) > ROW_SUM_ATOL
    if off.any():
        i = int(np.argmax(off))
        raise MetricsError(f"row {i} of probs sums to {sums[i]:.6g}, not 1; pass renormalise=True "
                           "if they are unnormalised probabilities over the five label tokens")
    return probs


def query_index(query_ids, n: int) -> tuple[np.ndarray, int]:
    """Dense index 0..Q-1 of each row's query, and Q. A null id (None or NaN) is an error: grouping
    all of them as one query would invent pairs between unrelated documents."""
    ids = np.asarray(query_ids)
    if ids.shape != (n,):
        raise MetricsError(f"query_ids must have {n} entries (one per label), got shape {ids.shape}")
    if ids.dtype.kind == "f":
        null = np.isnan(ids)
    elif ids.dtype.kind == "O":
        null = np.array([x is None or (isinstance(x, float) and x != x) for x in ids.tolist()], dtype=bool)
    else:                      # integer or string arrays cannot hold a null
        null = np.zeros(n, dtype=bool)
    if null.any():
        raise MetricsError(f"query_id is null in row {int(np.argmax(null))} ({int(null.sum())} null ids)")
    try:
        uniq, inverse = np.unique(ids, return_inverse=True)
    except TypeError:   # mixed types in an object array do not sort; compare them as text
        uniq, inverse = np.unique(ids.astype(str), return_inverse=True)
    return inverse.reshape(-1).astype(np.int64), len(uniq)


# ----------------------------------------------------------------------------- pointwise

def expected_score(probs: np.ndarray) -> np.ndarray:
    """s = Σ k·P(k) (paper Eq. 9)."""
    return probs @ GRADES.astype(probs.dtype)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """[5, 5] counts, rows gold, columns predicted."""
    return np.bincount(labels * N_CLASSES + preds, minlength=N_CLASSES ** 2).reshape(N_CLASSES, N_CLASSES)


def per_class_prf(confusion: np.ndarray) -> dict:
    """Precision, recall, F1 and support per class; 0 where a ratio is 0/0 (zero_division=0).
    F1 = 2·tp / (2·tp + fp + fn), which equals 2PR/(P+R) wherever that is defined."""
    tp = np.diag(confusion).astype(np.float64)
    pred_count = confusion.sum(0)
    support = confusion.sum(1)
    safe = lambda num, den: np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return {"precision": safe(tp, pred_count.astype(np.float64)),
            "recall": safe(tp, support.astype(np.float64)),
            "f1": safe(2 * tp, (pred_count + support).astype(np.float64)),
            "support": support}


def binary_accuracy(labels: np.ndarray, preds: np.ndarray) -> float:
    """2-ACC: relevant = grade ≥ 2 on both sides."""
    return float(np.mean((labels >= 2) == (preds >= 2)))


# ----------------------------------------------------------------------------- ranking

def pair_counts(labels: np.ndarray, scores: np.ndarray, qidx: np.ndarray, n_queries: int):
    """Per query: number of pairs with different gold grades, and the correctly ordered count
    (ties half). O(n log n): for each grade g, every document of grade g is compared with the
    documents of its query with a lower grade by binary search in a (query, score-rank) sorted key,
    so a query with 10^4 documents never builds a 10^8 matrix."""
    # Exact ranks of the scores (equal floats share a rank), packed with the query into one int64.
    _, rank = np.unique(scores, return_inverse=True)
    width = int(rank.max()) + 2
    key = qidx * width + rank.reshape(-1)
    correct = np.zeros(n_queries)
    total = np.zeros(n_queries)
    for g in range(1, N_CLASSES):
        lower = np.sort(key[labels < g])
        upper = labels == g
        if lower.size == 0 or not upper.any():
            continue
        k, q = key[upper], qidx[upper]
        start = np.searchsorted(lower, q * width, "left")
        end = np.searchsorted(lower, q * width + width, "left")
        below = np.searchsorted(lower, k, "left") - start          # lower grade, strictly lower score
        tied = np.searchsorted(lower, k, "right") - start - below  # lower grade, equal score
        correct += np.bincount(q, weights=below + 0.5 * tied, minlength=n_queries)
        total += np.bincount(q, weights=end - start, minlength=n_queries)
    return correct, total


def ranking_order(scores: np.ndarray, gains: np.ndarray, ties: str) -> np.ndarray:
    """Indices ranked by score descending; ties pessimistic (lowest gain first) or by input order."""
    if ties == "pessimistic":
        return np.lexsort((gains, -scores))
    if ties == "input":
        return np.argsort(-scores, kind="stable")
    raise MetricsError(f"ndcg_ties must be 'pessimistic' or 'input', got {ties!r}")


def dcg(gains_in_rank_order: np.ndarray, k: int) -> float:
    top = gains_in_rank_order[:k]
    return float(np.sum(top / np.log2(np.arange(2, top.size + 2))))


def ndcg_per_query(labels, scores, qidx, n_queries, k=NDCG_K, exp_gain=False, ties="pessimistic"):
    """NDCG@k of each query; NaN for queries whose ideal DCG is 0 (skipped by the mean)."""
    gains = (2.0 ** labels - 1.0) if exp_gain else labels.astype(np.float64)
    order = np.argsort(qidx, kind="stable")
    bounds = np.searchsorted(qidx[order], np.arange(n_queries + 1))
    out = np.full(n_queries, np.nan)
    for q in range(n_queries):
        rows = order[bounds[q]:bounds[q + 1]]
        g = gains[rows]
        ideal = dcg(np.sort(g)[::-1], k)
        if ideal > 0:
            out[q] = dcg(g[ranking_order(scores[rows], g, ties)], k) / ideal
    return out


# ----------------------------------------------------------------------------- all together

def _none_if_nan(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def compute_metrics(labels, probs, query_ids, *, renormalise: bool = False, exp_gain: bool = False,
                    ndcg_ties: str = "pessimistic") -> dict:
    """All evaluation metrics as a JSON-serialisable dict (fractions in [0, 1]).

    Keys: acc5, acc2, pair_acc (pooled), pair_acc_macro, ndcg3, macro_f1, weighted_f1,
    per_class {"0".."4": {precision, recall, f1, support}}, confusion (5×5, rows gold),
    n, n_queries, n_pairs, n_ndcg_queries, mean_score, mean_entropy (nats; the paper's
    "softness" of the first-token distribution), label_counts, pred_counts.
    """
    labels = check_labels(labels)
    n = labels.size
    probs = check_probs(probs, n, renormalise)
    qidx, n_queries = query_index(query_ids, n)
    if ndcg_ties not in ("pessimistic", "input"):
        raise MetricsError(f"ndcg_ties must be 'pessimistic' or 'input', got {ndcg_ties!r}")

    preds = probs.argmax(1)
    scores = expected_score(probs)
    conf = confusion_matrix(labels, preds)
    prf = per_class_prf(conf)
    support = prf["support"]
    correct, total = pair_counts(labels, scores, qidx, n_queries)
    has_pairs = total > 0
    ndcg = ndcg_per_query(labels, scores, qidx, n_queries, exp_gain=exp_gain, ties=ndcg_ties)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.sum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=1)

    return {
        "acc5": float(np.mean(preds == labels)),
        "acc2": binary_accuracy(labels, preds),
        "pair_acc": _none_if_nan(correct.sum() / total.sum()) if total.sum() else None,
        "pair_acc_macro": float(np.mean(correct[has_pairs] / total[has_pairs])) if has_pairs.any() else None,
        "ndcg3": _none_if_nan(np.nanmean(ndcg)) if np.isfinite(ndcg).any() else None,
        "macro_f1": float(prf["f1"].mean()),
        "weighted_f1": float(np.sum(prf["f1"] * support) / n),
        "per_class": {str(k): {"precision": float(prf["precision"][k]), "recall": float(prf["recall"][k]),
                               "f1": float(prf["f1"][k]), "support": int(support[k])} for k in GRADES},
        "confusion": conf.tolist(),
        "n": int(n),
        "n_queries": int(n_queries),
        "n_pairs": int(total.sum()),
        "n_ndcg_queries": int(np.isfinite(ndcg).sum()),
        "mean_score": float(scores.mean()),
        "mean_entropy": float(entropy.mean()),
        "label_counts": np.bincount(labels, minlength=N_CLASSES).tolist(),
        "pred_counts": np.bincount(preds, minlength=N_CLASSES).tolist(),
        "ndcg_gain": "exp" if exp_gain else "linear",
        "ndcg_ties": ndcg_ties,
    }


def paired_bootstrap(before, after, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """The change in a per-pair score (e.g. 5-ACC's 0/1 correctness) from `before` to `after` on the
    same pairs, with a percentile confidence interval from resampling the pairs with replacement
    (both models see the same resample: the pairing removes the pairs' shared difficulty). `after`
    may be [seeds, pairs]: replicates of one recipe, averaged per pair before the pairs are resampled."""
    a, b = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.ndim == 2 and b.shape[0] > 0:
        b = b.mean(axis=0)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise MetricsError(f"paired_bootstrap needs two equally long non-empty vectors, got {a.shape} and {b.shape}")
    d = b - a
    idx = np.random.default_rng(seed).integers(0, d.size, size=(n_boot, d.size))
    boots = d[idx].mean(axis=1)
    tail = (1.0 - level) / 2
    return {"diff": float(d.mean()), "lo": float(np.quantile(boots, tail)), "hi": float(np.quantile(boots, 1 - tail)),
            "n": int(d.size), "n_boot": int(n_boot), "level": level}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"


def format_table(metrics: dict) -> str:
    """A small text table in the paper's layout (percent)."""
    head = ["5-ACC", "2-ACC", "Pair-ACC", "NDCG@3", "Mac-F1", "W-F1"]
    keys = ["acc5", "acc2", "pair_acc", "ndcg3", "macro_f1", "weighted_f1"]
    lines = [f"n={metrics['n']}  queries={metrics['n_queries']}  pairs={metrics['n_pairs']}  "
             f"pair_acc_macro={_pct(metrics.get('pair_acc_macro'))}",
             "  ".join(f"{h:>8}" for h in head),
             "  ".join(f"{_pct(metrics[k]):>8}" for k in keys),
             "",
             f"{'label':>5}  {'P':>7}  {'R':>7}  {'F1':>7}  {'support':>7}"]
    for k, row in metrics["per_class"].items():
        lines.append(f"{k:>5}  {_pct(row['precision']):>7}  {_pct(row['recall']):>7}  "
                     f"{_pct(row['f1']):>7}  {row['support']:>7}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def read_predictions(path: str):
    """labels, probs [n, 5], query_ids from a predictions parquet; MetricsError names file, column
    and row (types are checked here, so a string or list column is a message, not a traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:   # missing file, not a parquet file
        raise MetricsError(f"{path}: cannot read predictions parquet: {e}") from None
    for col in ("query_id", "label", *PROB_COLUMNS):
        if col not in table.column_names:
            raise MetricsError(f"{path}: missing column {col!r} (have {table.column_names})")
    number = lambda t: pa.types.is_floating(t) or pa.types.is_integer(t)     # noqa: E731
    text_or_int = lambda t: (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
                             or pa.types.is_integer(t) or pa.types.is_dictionary(t))  # noqa: E731
    kinds = {"query_id": (text_or_int, "strings or integers"), "label": (number, "grades 0-4"),
             **{c: (number, "numbers") for c in PROB_COLUMNS}}
    for col, (ok, what) in kinds.items():
        column = table.column(col)
        if not ok(column.type):
            raise MetricsError(f"{path}: column {col!r} must be {what}, got {column.type}")
        if column.null_count:
            row = column.is_null().to_numpy(zero_copy_only=False).argmax()
            raise MetricsError(f"{path}: column {col!r} is null in row {int(row)}")
    labels = table.column("label").to_numpy(zero_copy_only=False)
    probs = np.stack([table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                      for c in PROB_COLUMNS], axis=1)
    return labels, probs, np.asarray(table.column("query_id").to_pylist(), dtype=object)


def metrics_json(metrics: dict) -> str:
    return json.dumps(metrics, indent=2) + "\n"


def write_json(metrics: dict, path: str) -> None:
    """The metrics as indented JSON, written atomically (no half-written file on a crash)."""
    atomic_write_text(path, metrics_json(metrics))
