"""afrl_fast.metrics against scikit-learn, a brute-force pair loop and hand-checked cases."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn import metrics as skm

from afrl_fast.metrics.__main__ import main as metrics_main
from afrl_fast.metrics import MetricsError, compute_metrics, expected_score, format_table


def random_case(seed, n=300, n_queries=12, peaked=False):
    """Random labels, probability rows and query ids (queries of uneven sizes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    alpha = np.full(5, 0.3 if peaked else 1.0)
    probs = rng.dirichlet(alpha, n)
    qids = np.array([f"q{i}" for i in rng.integers(0, n_queries, n)])
    return labels, probs, qids


def brute_pair_acc(labels, scores, qids):
    """O(n²) loop: pooled and per-query-macro pair accuracy, ties counting half."""
    correct, total, per_query = 0.0, 0, {}
    for i in range(len(labels)):
        for j in range(len(labels)):
            if qids[i] != qids[j] or labels[i] <= labels[j]:
                continue
            c = 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
            correct += c
            total += 1
            qc, qt = per_query.get(qids[i], (0.0, 0))
            per_query[qids[i]] = (qc + c, qt + 1)
    macro = np.mean([c / t for c, t in per_query.values()])
    return correct / total, macro, total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pointwise_metrics_match_sklearn(seed):
    labels, probs, qids = random_case(seed, peaked=seed == 2)
    m = compute_metrics(labels, probs, qids)
    preds = probs.argmax(1)
    assert m["acc5"] == pytest.approx(skm.accuracy_score(labels, preds))
    assert m["acc2"] == pytest.approx(skm.accuracy_score(labels >= 2, preds >= 2))
    kw = dict(labels=[0, 1, 2, 3, 4], zero_division=0)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, preds, average="macro", **kw))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(labels, preds, average="weighted", **kw))
    p, r, f, s = skm.precision_recall_fscore_support(labels, preds, **kw)
    for k in range(5):
        row = m["per_class"][str(k)]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[k], r[k], f[k]))
        assert row["support"] == s[k]
    assert m["confusion"] == skm.confusion_matrix(labels, preds, labels=[0, 1, 2, 3, 4]).tolist()
    assert m["n"] == len(labels) and m["n_queries"] == len(set(qids))


def test_absent_class_follows_sklearn_zero_division():
    # class 4 never appears in gold nor predictions: it still counts in the macro mean with F1 = 0
    labels = np.array([0, 1, 2, 3, 0, 1])
    probs = np.eye(5)[[0, 1, 2, 2, 1, 1]]
    m = compute_metrics(labels, probs, np.zeros(6))
    kw = dict(labels=[0, 1, 2, 3, 4], zero_division=0)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, probs.argmax(1), average="macro", **kw))
    assert m["per_class"]["4"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(labels, probs.argmax(1), average="weighted", **kw))


@pytest.mark.parametrize("seed", [3, 4])
def test_pair_acc_matches_brute_force_with_ties(seed):
    labels, probs, qids = random_case(seed, n=200, n_queries=7)
    # Make many exact score ties: quantise the probabilities onto a coarse grid of rows.
    rng = np.random.default_rng(seed + 100)   # not the labels' stream: scores must not copy labels
    probs = np.eye(5)[rng.integers(0, 5, len(labels))] * 0.5 + 0.1
    m = compute_metrics(labels, probs, qids)
    pooled, macro, total = brute_pair_acc(labels, expected_score(probs), qids)
    assert 0.3 < pooled < 0.7                    # a real mix of right, wrong and tied pairs
    assert m["n_pairs"] == total
    assert m["pair_acc"] == pytest.approx(pooled)
    assert m["pair_acc_macro"] == pytest.approx(macro)


def test_pair_acc_without_ties_matches_brute_force():
    labels, probs, qids = random_case(5, n=250, n_queries=9)
    m = compute_metrics(labels, probs, qids)
    pooled, macro, _ = brute_pair_acc(labels, expected_score(probs), qids)
    assert (m["pair_acc"], m["pair_acc_macro"]) == pytest.approx((pooled, macro))


def test_pair_acc_hand_checked():
    # query a: grades 2 > 1 > 0 with scores ordered 0.5 < 2.0 = 2.0 -> pairs (2,1) tie 0.5,
    # (2,0) correct 1, (1,0) correct 1 -> 2.5/3. query b: grades 4, 0 wrongly ordered -> 0/1.
    labels = np.array([2, 1, 0, 4, 0, 3])
    scores = np.array([2.0, 2.0, 0.5, 1.0, 3.0, 3.0])
    probs = np.zeros((6, 5))
    for i, s in enumerate(scores):            # put the mass on floor/ceil so that Σ k·P(k) = s
        lo = int(np.floor(s)); probs[i, lo] += 1 - (s - lo); probs[i, min(lo + 1, 4)] += s - lo
    qids = ["a", "a", "a", "b", "b", "c"]     # c has one document: no pair
    m = compute_metrics(labels, probs, qids)
    assert m["n_pairs"] == 4
    assert m["pair_acc"] == pytest.approx(2.5 / 4)
    assert m["pair_acc_macro"] == pytest.approx((2.5 / 3 + 0.0) / 2)


def ragged_sklearn_ndcg(labels, scores, qids, k=3):
    values = []
    for q in np.unique(qids):
        rows = qids == q
        if labels[rows].sum() == 0 or rows.sum() < 2:   # sklearn needs 2+ documents per query
            continue
        values.append(skm.ndcg_score([labels[rows]], [scores[rows]], k=k))
    return np.mean(values), len(values)


@pytest.mark.parametrize("seed", [6, 7])
def test_ndcg3_matches_sklearn_on_tie_free_scores(seed):
    labels, probs, qids = random_case(seed, n=150, n_queries=10)
    labels[qids == "q0"] = 0            # a query with ideal DCG 0: must be skipped
    m = compute_metrics(labels, probs, qids)
    scores = expected_score(probs)
    assert len(np.unique(scores)) == len(scores)
    expect, n_q = ragged_sklearn_ndcg(labels, scores, qids)
    assert m["ndcg3"] == pytest.approx(expect)
    assert m["n_ndcg_queries"] == n_q == len(set(qids)) - 1


def test_ndcg_exp_gain_hand_checked():
    # one query, gold 3, 1, 0 ranked by s as 1, 3, 0: DCG = 1 + 3/log2(3), ideal 3 + 1/log2(3)
    labels = np.array([3, 1, 0])
    probs = np.eye(5)[[1, 3, 0]]
    lin = compute_metrics(labels, probs, [0, 0, 0])["ndcg3"]
    assert lin == pytest.approx((1 + 3 / np.log2(3)) / (3 + 1 / np.log2(3)))
    ex = compute_metrics(labels, probs, [0, 0, 0], exp_gain=True)["ndcg3"]
    assert ex == pytest.approx((1 + 7 / np.log2(3)) / (7 + 1 / np.log2(3)))


def test_ndcg_ties_pessimistic_ignores_row_order():
    # all four documents get the same score; rows happen to be sorted best-first
    labels = np.array([4, 3, 0, 0])
    probs = np.full((4, 5), 0.2)
    pess = compute_metrics(labels, probs, [1] * 4)["ndcg3"]
    worst = (3 / np.log2(4)) / (4 + 3 / np.log2(3))      # ranking 0, 0, 3 at the top three
    assert pess == pytest.approx(worst)
    assert compute_metrics(labels[::-1], probs, [1] * 4)["ndcg3"] == pytest.approx(worst)
    assert compute_metrics(labels, probs, [1] * 4, ndcg_ties="input")["ndcg3"] == pytest.approx(1.0)


def test_undefined_ranking_metrics_are_none_and_json_safe():
    m = compute_metrics([0, 0, 2], np.eye(5)[[0, 1, 2]], ["a", "a", "b"])
    assert m["pair_acc"] is None and m["pair_acc_macro"] is None and m["n_pairs"] == 0
    assert m["ndcg3"] == pytest.approx(1.0)        # query b alone: single relevant document
    m = compute_metrics([0, 0], np.eye(5)[[0, 1]], ["a", "a"])
    assert m["ndcg3"] is None
    json.loads(json.dumps(m, allow_nan=False))
    assert "n/a" in format_table(m)


def test_expected_score_and_entropy():
    probs = np.array([[0.1, 0.2, 0.3, 0.2, 0.2], [0, 0, 0, 0, 1.0]])
    assert expected_score(probs) == pytest.approx([0.2 + 0.6 + 0.6 + 0.8, 4.0])
    m = compute_metrics([2, 4], probs, ["a", "a"])
    assert m["mean_entropy"] == pytest.approx(-np.sum(probs[0] * np.log(probs[0])) / 2)


def test_format_table_shows_percentages():
    labels, probs, qids = random_case(8, n=60)
    m = compute_metrics(labels, probs, qids)
    text = format_table(m)
    for name in ("5-ACC", "2-ACC", "Pair-ACC", "NDCG@3", "Mac-F1", "W-F1"):
        assert name in text
    assert f"{100 * m['acc5']:.2f}" in text
    assert len([ln for ln in text.splitlines() if ln.strip()[:1] in "01234"]) >= 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(probs=np.full((3, 4), 0.25)), "shape"),
    (dict(probs=np.array([[np.nan, 0.5, 0.5, 0, 0]] * 3)), "NaN"),
    (dict(probs=np.array([[-0.1, 0.6, 0.5, 0, 0]] * 3)), "negative"),
    (dict(probs=np.full((3, 5), 0.3)), "sums to 1.5"),
    (dict(labels=[0, 5, 1]), "0-4"),
    (dict(labels=[0, 1.5, 1]), "0-4"),
    (dict(labels=[0, -1, 1]), "0-4"),
    (dict(labels=["0", "1", "2"]), "integers"),
    (dict(query_ids=["a", "b"]), "query_ids"),
    (dict(labels=[0, 1]), "shape"),
    (dict(labels=[], probs=np.zeros((0, 5)), query_ids=[]), "no rows"),
])
def test_validation_errors(kwargs, match):
    args = dict(labels=[0, 1, 2], probs=np.full((3, 5), 0.2), query_ids=["a", "a", "b"])
    args.update(kwargs)
    with pytest.raises(MetricsError, match=match):
        compute_metrics(args["labels"], args["probs"], args["query_ids"])


def test_renormalise_flag():
    raw = np.array([[1.0, 1, 2, 0, 0], [0, 0, 0, 3, 1]])
    with pytest.raises(MetricsError, match="renormalise"):
        compute_metrics([2, 3], raw, ["a", "a"])
    m = compute_metrics([2, 3], raw, ["a", "a"], renormalise=True)
    assert m["mean_score"] == pytest.approx(((1 + 4) / 4 + (9 + 4) / 4) / 2)
    with pytest.raises(MetricsError, match="sums to 0"):
        compute_metrics([2], np.zeros((1, 5)), ["a"], renormalise=True)


def write_predictions(path, labels, probs, qids, drop=None):
    cols = {"query_id": pa.array(list(qids)), "label": pa.array(labels, pa.int8())}
    cols.update({f"p{k}": pa.array(probs[:, k]) for k in range(5)})
    cols.pop(drop, None)
    pq.write_table(pa.table(cols), path)


def test_cli_round_trip(tmp_path, capsys):
    labels, probs, qids = random_case(9, n=80)
    write_predictions(tmp_path / "p.parquet", labels, probs, qids)
    out = tmp_path / "m.json"
    assert metrics_main(["--predictions", str(tmp_path / "p.parquet"), "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    expect = compute_metrics(labels, probs, qids)
    assert saved == json.loads(json.dumps(expect))
    assert "Pair-ACC" in capsys.readouterr().out


def test_cli_missing_column_exits_2_without_traceback(tmp_path):
    labels, probs, qids = random_case(10, n=20)
    path = tmp_path / "bad.parquet"
    write_predictions(path, labels, probs, qids, drop="p3")
    proc = subprocess.run([sys.executable, "-m", "afrl_fast.metrics", "--predictions", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "bad.parquet" in proc.stderr and "'p3'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_missing_file_exits_2(tmp_path, capsys):
    assert metrics_main(["--predictions", str(tmp_path / "nope.parquet")]) == 2
    assert "nope.parquet" in capsys.readouterr().err


@pytest.mark.parametrize("null", [None, float("nan")])
def test_null_query_ids_are_rejected_not_grouped(null):
    """Null ids would all become one query and create pairs between unrelated documents."""
    labels = np.array([0, 2, 1, 4])
    probs = np.full((4, 5), 0.2)
    with pytest.raises(MetricsError, match="query_id is null in row 1"):
        compute_metrics(labels, probs, np.array(["a", null, "b", null], dtype=object))


def test_paired_bootstrap_matches_a_plain_loop_and_covers_the_difference():
    from afrl_fast.metrics import paired_bootstrap

    rng = np.random.default_rng(5)
    before = rng.random(300) < 0.6
    after = before.copy()
    flip = rng.choice(300, 40, replace=False)
    after[flip] = ~after[flip]
    got = paired_bootstrap(before, after, n_boot=500, seed=3)
    # independent: the same resamples drawn one by one
    draw = np.random.default_rng(3).integers(0, 300, size=(500, 300))
    diffs = sorted(float(np.mean(after[i].astype(float) - before[i].astype(float))) for i in draw)
    assert got["diff"] == pytest.approx(after.mean() - before.mean())
    assert got["lo"] == pytest.approx(np.quantile(diffs, 0.025)) and got["hi"] == pytest.approx(np.quantile(diffs, 0.975))
    assert got["lo"] <= got["diff"] <= got["hi"] and got["n"] == 300
    same = paired_bootstrap(before, before)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0          # identical answers: no change, no spread
    with pytest.raises(Exception, match="equally long"):
        paired_bootstrap(before, after[:10])


def test_paired_bootstrap_averages_seed_replicates_per_pair():
    from afrl_fast.metrics import paired_bootstrap

    rng = np.random.default_rng(9)
    before = rng.random(50) < 0.5
    seeds = rng.random((3, 50)) < 0.7
    got = paired_bootstrap(before, seeds, n_boot=200, seed=1)
    ref = paired_bootstrap(before, seeds.mean(axis=0), n_boot=200, seed=1)
    assert got == ref and got["diff"] == pytest.approx(seeds.mean() - before.mean())
