"""The data stage: pair schema and validation, the rule-grounded synthetic generator, the TREC loader."""
import csv
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from afrl_fast import pairs, synthetic
from afrl_fast.data.__main__ import main
from afrl_fast.pairs import PAIRS_SCHEMA, SYNTHETIC_SCHEMA, DataError, read_pairs, validate_pairs, write_table
from afrl_fast.synthetic import CUES, cue_patterns, rule_combos, synthesize
from afrl_fast.trec import load_trec
from afrl_fast.rulebook import DEFAULT_RULEBOOK, load_rulebook, parse_rulebook

RB = load_rulebook()
N = 600


@pytest.fixture(scope="module")
def splits():
    return {s: synthesize(N, 7, RB, s) for s in pairs.SYNTHETIC_SPLITS}


def rows(table):
    return table.to_pylist()


# ---------------------------------------------------------------- determinism and schema

def test_schema_of_synthetic_tables(splits):
    for t in splits.values():
        assert t.schema == SYNTHETIC_SCHEMA
        assert len(t) == N
    assert SYNTHETIC_SCHEMA.names[:5] == PAIRS_SCHEMA.names


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    paths = []
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        paths.append(write_table(synthesize(150, seed, RB, "train"), tmp_path / f"{name}.parquet"))
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c
    assert synthesize(150, 12, RB, "train").column("document") != synthesize(150, 11, RB, "train").column("document")


def test_splits_use_independent_streams(splits):
    # Same seed, different split: not the same documents (nor a shifted copy of them).
    train_docs = set(splits["train"].column("document").to_pylist())
    industry_docs = splits["industry"].column("document").to_pylist()
    assert sum(d in train_docs for d in industry_docs) < len(industry_docs) / 2


def test_ids(splits):
    t = splits["longtail"]
    for r in rows(t)[:20]:
        assert re.fullmatch(r"longtail-q\d{6}", r["query_id"])
        assert re.fullmatch(re.escape(r["query_id"]) + r"-d\d", r["doc_id"])


# ---------------------------------------------------------------- labels, rules, traces

def test_labels_follow_the_rulebook(splits):
    for t in splits.values():
        for r in rows(t):
            values = {k: r[k] for k in RB.keys}
            rule = RB.first_rule(values)
            assert RB.expected_label(values) == r["label"]
            assert rule.name == r["rule"] and rule.tail == r["tail"]


STEP_RE = re.compile(r"Step (\d) \(([^()]*)\): [^{}\n]*?\\boxed\{([^{}\n]+)\}")


def parse_trace(trace):
    """Independent of the verifier: the decision, the nine (number, name, box) and the final box."""
    lines = trace.split("\n")
    steps = [STEP_RE.fullmatch(line) for line in lines[1:10]]
    assert all(steps), trace
    final = re.fullmatch(r"Final: \\boxed\{([0-4])\}", lines[10])
    assert final and len(lines) == 11, trace
    return lines[0], [m.groups() for m in steps], final.group(1)


def test_trace_boxes_match_columns_and_label(splits):
    for t in splits.values():
        for r in rows(t):
            dec, steps, final = parse_trace(r["trace"])
            assert r["trace"][0] == dec == final == str(r["label"])
            assert [int(n) for n, _, _ in steps] == list(range(1, 10))
            boxed = {int(n): box for n, _, box in steps}
            assert [boxed[s.number] for s in RB.critical] == [r[k] for k in RB.keys]
            assert boxed[9] == str(r["label"])


def test_every_query_has_several_docs_and_two_grades(splits):
    for t in splits.values():
        grades = defaultdict(set)
        sizes = Counter(t.column("query_id").to_pylist())
        for r in rows(t):
            grades[r["query_id"]].add(r["label"])
        assert all(3 <= k <= 6 for k in sizes.values()), sizes
        assert all(len(g) >= 2 for g in grades.values())


def test_longtail_mostly_tail_industry_mostly_head(splits):
    share = {s: float(np.mean(t.column("tail").to_numpy(zero_copy_only=False))) for s, t in splits.items()}
    assert 0.6 <= share["longtail"] <= 0.8, share
    assert share["industry"] < share["train"] < 0.25, share
    assert share["industry"] < 0.12, share


def test_all_satisfiable_rules_appear_in_a_large_train_split():
    t = synthesize(3000, 1, RB, "train")
    seen = set(t.column("rule").to_pylist())
    satisfiable = {r.name for r, c in zip(RB.rules, rule_combos(RB)) if len(c) and r.freq > 0}
    assert seen == satisfiable


def test_rule_combos_partition_the_value_space():
    combos = rule_combos(RB)
    assert sum(len(c) for c in combos) == 4 * 4 * 3 * 4 * 3
    for rule, c in zip(RB.rules, combos):
        for idx in c:
            values = {s.key: s.values[i] for s, i in zip(RB.critical, idx)}
            assert RB.first_rule(values) is rule
    assert len(combos[-1]) == 0      # the default fallback is shadowed by the four intent rules


def test_query_sizes_sum_to_n():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 7, 8, 9, 10, 13, 100, 1001):
        sizes = synthetic.query_sizes(rng, n)
        assert sum(sizes) == n
        assert all(k <= 6 for k in sizes)
        assert all(k >= 3 for k in sizes) or n < 3


# ---------------------------------------------------------------- readable texts

def test_each_value_is_readable_from_exactly_one_cue(splits):
    patterns = cue_patterns()
    for t in splits.values():
        for r in rows(t):
            for key in RB.keys:
                matched = {v for v, p in patterns[key].items() if p.search(r["document"])}
                assert matched == {r[key]}, (key, r["document"])


def test_documents_are_short_and_name_the_entities(splits):
    for r in rows(splits["train"]):
        assert len(r["document"].split()) <= 60
        if r["entity"] in ("consistent", "partial", "conflict"):
            dec, steps, _ = parse_trace(r["trace"])
            assert steps[2][2] in r["document"]        # step 3 boxes the entity the document names


def test_sentence_order_varies(splits):
    firsts, patterns = Counter(), cue_patterns()
    for r in rows(splits["train"]):
        first = r["document"].split(". ")[0] + "."
        key = next(k for k in RB.keys if any(patterns[k][v].match(first) for v in CUES[k]))
        firsts[key] += 1
    assert len(firsts) == 5


def test_rulebook_value_without_cue_is_refused(tmp_path):
    raw = yaml.safe_load(DEFAULT_RULEBOOK.read_text())
    raw["steps"][6]["values"].append("paywalled")
    rb = parse_rulebook(raw, "custom.yaml")
    with pytest.raises(DataError, match=r"custom\.yaml.*'paywalled'.*source"):
        synthesize(10, 0, rb)


def test_custom_rulebook_labels_follow_it():
    raw = yaml.safe_load(DEFAULT_RULEBOOK.read_text())
    raw["rules"] = [{"name": "spam", "when": {"source": ["spam"]}, "label": 0, "freq": 1},
                    {"name": "full", "when": {"intent": ["full"]}, "label": 4, "freq": 1},
                    {"name": "rest", "when": {}, "label": 2, "freq": 1}]
    rb = parse_rulebook(raw, "three.yaml")
    t = synthesize(60, 0, rb)
    for r in rows(t):
        assert rb.expected_label({k: r[k] for k in rb.keys}) == r["label"]
    assert set(t.column("label").to_pylist()) == {0, 2, 4}


# ---------------------------------------------------------------- validation

def good_table(n=6):
    return pa.table({"query_id": [f"q{i // 3}" for i in range(n)], "doc_id": [f"d{i}" for i in range(n)],
                     "query": ["a query"] * n, "document": ["a document"] * n,
                     "label": pa.array([i % 5 for i in range(n)], pa.int64()),
                     "trace": ["2\n..."] * n})


def replaced(table, name, values, type=None):
    arr = pa.array(values, type)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


BAD_CASES = {
    "missing column": (lambda t: t.drop_columns(["label"]), None, "label", False),
    "label as strings": (lambda t: replaced(t, "label", ["1"] * 6), 0, "label", False),
    "label as floats": (lambda t: replaced(t, "label", [1.0] * 6), 0, "label", False),
    "query as ints": (lambda t: replaced(t, "query", [None, 5, 6, 7, 8, 9]), 1, "query", False),
    "grade above 4": (lambda t: replaced(t, "label", [0, 1, 5, 1, 2, 3], pa.int16()), 2, "label", False),
    "grade below 0": (lambda t: replaced(t, "label", [0, 1, 2, 1, -1, 3], pa.int32()), 4, "label", False),
    "null grade": (lambda t: replaced(t, "label", [0, None, 2, 1, 1, 3], pa.int8()), 1, "label", False),
    "blank query": (lambda t: replaced(t, "query", ["q", "q", "q", " \t ", "q", "q"]), 3, "query", False),
    "empty document": (lambda t: replaced(t, "document", ["d", "d", "d", "d", "", "d"]), 4, "document", False),
    "null document": (lambda t: replaced(t, "document", ["d", None, "d", "d", "d", "d"], pa.string()), 1, "document", False),
    "empty doc_id": (lambda t: replaced(t, "doc_id", ["a", "b", "", "c", "d", "e"]), 2, "doc_id", False),
    "empty trace": (lambda t: replaced(t, "trace", ["x", "x", "x", "x", "x", "  "]), 5, "trace", True),
    "missing trace": (lambda t: t.drop_columns(["trace"]), None, "trace", True),
    "duplicate pair": (lambda t: replaced(t, "doc_id", ["d0", "d1", "d1", "d3", "d1", "d1"]), 2, "doc_id", False),
    "tail not bool": (lambda t: replaced(t, "tail", ["yes"] * 6), 0, "tail", False),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_validation_names_file_row_and_column(tmp_path, case):
    make, row, column, require_trace = BAD_CASES[case]
    path = tmp_path / "bad.parquet"
    pq.write_table(make(good_table()), path)
    with pytest.raises(DataError) as err:
        read_pairs(path, require_trace=require_trace)
    msg = str(err.value)
    assert str(path) in msg and repr(column) in msg, msg
    assert (err.value.path, err.value.row, err.value.column) == (str(path), row, column)
    if row is not None:
        assert f"row {row}," in msg


def test_duplicate_message_names_first_occurrence(tmp_path):
    # rows 0-2 are query q0, rows 3-5 query q1: (q0, d1) repeats at row 2, (q1, d1) at row 5
    t = replaced(good_table(), "doc_id", ["d0", "d1", "d1", "d3", "d1", "d1"])
    with pytest.raises(DataError, match=r"row 2, column 'doc_id': duplicate .*first seen at row 1"):
        validate_pairs(t, "mem")
    # same doc_id under a different query is fine
    validate_pairs(replaced(good_table(), "doc_id", ["d0", "d1", "d2", "d0", "d1", "d2"]), "mem")


def test_castable_ints_are_read_as_int8(tmp_path):
    path = tmp_path / "ok.parquet"
    pq.write_table(replaced(good_table(), "label", [0, 1, 2, 3, 4, 4], pa.uint64()), path)
    t = read_pairs(path)
    assert t.schema.field("label").type == pa.int8()
    assert t.column("label").to_pylist() == [0, 1, 2, 3, 4, 4]


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet"):
        read_pairs(junk)
    with pytest.raises(DataError, match="nope.parquet: file not found"):
        read_pairs(tmp_path / "nope.parquet")


def test_validation_is_vectorized_at_a_million_rows():
    n = 1_000_000
    idx = pa.array(np.arange(n))
    qid = pc.binary_join_element_wise("q", pc.cast(pc.divide(idx, 5), pa.string()), "")
    did = pc.binary_join_element_wise("d", pc.cast(idx, pa.string()), "")
    t = pa.table({"query_id": qid, "doc_id": did, "query": pa.array(["q"] * n),
                  "document": pa.array(["doc"] * n), "label": pa.array((np.arange(n) % 5).astype(np.int8))})
    validate_pairs(t, "big")
    # same query (rows n-5..n-1), same doc id: row n-2 repeats row n-4
    bad_did = pc.if_else(pc.equal(idx, n - 2), pa.scalar(f"d{n - 4}"), did)
    with pytest.raises(DataError) as err:
        validate_pairs(t.set_column(1, "doc_id", bad_did), "big")
    assert (err.value.row, err.value.column) == (n - 2, "doc_id")
    assert f"first seen at row {n - 4}" in str(err.value)


# ---------------------------------------------------------------- atomic write

def test_write_table_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "t.parquet"
    write_table(good_table(), path)
    assert os.listdir(path.parent) == ["t.parquet"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask     # not mkstemp's private 0600
    before = path.read_bytes()
    with pytest.raises(Exception):
        write_table({"not": "a table"}, path)    # fails inside the Parquet writer
    assert os.listdir(path.parent) == ["t.parquet"]
    assert path.read_bytes() == before
    write_table(good_table(3), path)             # replaces in place
    assert len(read_pairs(path)) == 3 and os.listdir(path.parent) == ["t.parquet"]


# ---------------------------------------------------------------- CLI

def test_synth_cli_round_trip(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--n", "120", "--seed", "3", "--out", str(out), "--no-progress",
                 "--n-longtail", "50"]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["industry.parquet", "longtail.parquet", "train.parquet"]
    for split, n in (("train", 120), ("industry", 30), ("longtail", 50)):
        t = read_pairs(out / f"{split}.parquet", require_trace=True)
        assert len(t) == n
        assert t.equals(synthesize(n, 3, RB, split))
        assert split in printed
    assert "partial_current_news" in printed and "unsatisfiable" in printed


def test_cli_reports_errors(tmp_path, capsys):
    assert main(["synth", "--n", "0", "--out", str(tmp_path)]) == 2
    assert "n must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trec", "--qrels", "q", "--corpus", "c", "--queries", "q", "--grade-map", "0-0", "--out", "x"])


# ---------------------------------------------------------------- TREC loader

def noveleval_dir() -> Path:
    d = Path(__file__).resolve().parents[1] / "data" / "noveleval"   # vendored: see its SOURCE.md
    if not (d / "qrels.txt").is_file():
        pytest.fail(f"NovelEval data not found at {d}: it is part of the repository")
    return d


NOVELEVAL_MAP = {0: 0, 1: 2, 2: 4}


def load_noveleval():
    d = noveleval_dir()
    return load_trec(d / "qrels.txt", d / "corpus.tsv", d / "queries.tsv", NOVELEVAL_MAP)


def test_noveleval_counts():
    t = load_noveleval()
    assert t.schema == PAIRS_SCHEMA
    assert len(t) == 420
    assert len(set(t.column("query_id").to_pylist())) == 21
    assert Counter(t.column("label").to_pylist()) == {0: 290, 2: 40, 4: 90}


def test_noveleval_matches_the_independent_join():
    t = load_noveleval()
    with open(noveleval_dir() / "noveleval_graded.tsv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        expected = {(r["qid"], r["docid"]): (r["query"], r["passage"], NOVELEVAL_MAP[int(r["grade_0_2"])])
                    for r in reader}
    got = {(r["query_id"], r["doc_id"]): (r["query"], r["document"], r["label"]) for r in rows(t)}
    assert len(expected) == 420
    assert got == expected


def test_noveleval_cli(tmp_path, capsys):
    d = noveleval_dir()
    out = tmp_path / "ne.parquet"
    assert main(["trec", "--qrels", str(d / "qrels.txt"), "--corpus", str(d / "corpus.tsv"),
                 "--queries", str(d / "queries.tsv"), "--grade-map", "0:0,1:2,2:4", "--out", str(out)]) == 0
    assert "420 pairs, 21 queries" in capsys.readouterr().out
    assert read_pairs(out).equals(load_noveleval())


def write_trec(tmp_path, qrels, corpus="d1\tfirst doc\nd2\tsecond doc\n", queries="1\tthe query\n"):
    paths = tmp_path / "qrels.txt", tmp_path / "corpus.tsv", tmp_path / "queries.tsv"
    for p, text in zip(paths, (qrels, corpus, queries)):
        p.write_text(text)
    return paths


def test_trec_unmapped_grade_names_file_line_and_grade(tmp_path):
    q, c, s = write_trec(tmp_path, "1 Q0 d1 0\n\n1 Q0 d2 3\n")
    with pytest.raises(DataError, match=r"qrels\.txt: line 3: grade 3 has no entry in grade_map"):
        load_trec(q, c, s, {0: 0, 1: 4})


def test_trec_missing_doc_and_query_name_file_and_line(tmp_path):
    q, c, s = write_trec(tmp_path, "1 Q0 d1 0\n1 Q0 d9 1\n")
    with pytest.raises(DataError, match=r"qrels\.txt: line 2: doc id 'd9' not found in .*corpus\.tsv"):
        load_trec(q, c, s, {0: 0, 1: 4})
    q, c, s = write_trec(tmp_path, "1 Q0 d1 0\n7 Q0 d2 1\n")
    with pytest.raises(DataError, match=r"qrels\.txt: line 2: query id '7' not found in .*queries\.tsv"):
        load_trec(q, c, s, {0: 0, 1: 4})


def test_trec_malformed_inputs(tmp_path):
    q, c, s = write_trec(tmp_path, "1 Q0 d1\n")
    with pytest.raises(DataError, match=r"qrels\.txt: line 1: expected 'qid Q0 docid grade'"):
        load_trec(q, c, s, {0: 0})
    q, c, s = write_trec(tmp_path, "1 Q0 d1 0\n", corpus="d1\tok\nbroken line\n")
    with pytest.raises(DataError, match=r"corpus\.tsv: line 2: expected 'id<TAB>text'"):
        load_trec(q, c, s, {0: 0})
    q, c, s = write_trec(tmp_path, "1 Q0 d1 0\n", corpus="d1\t   \n")
    with pytest.raises(DataError, match=r"corpus\.tsv: line 1: empty text"):
        load_trec(q, c, s, {0: 0})
    q, c, s = write_trec(tmp_path, "1 Q0 d1 0\n1 Q0 d1 1\n")
    with pytest.raises(DataError, match=r"qrels\.txt: line 2: duplicate judgement"):
        load_trec(q, c, s, {0: 0, 1: 1})
    with pytest.raises(DataError, match="grade_map"):
        load_trec(q, c, s, {})
    with pytest.raises(DataError, match=r"grade 1 maps to 7"):
        load_trec(q, c, s, {0: 0, 1: 7})


def test_trec_more_malformed_inputs(tmp_path):
    q, c, s = write_trec(tmp_path, "1 Q0 d1 high\n")
    with pytest.raises(DataError, match=r"qrels\.txt: line 1: grade 'high' is not an integer"):
        load_trec(q, c, s, {0: 0})
    q, c, s = write_trec(tmp_path, "1 Q0 d1 0\n", corpus="d1\tone\n\nd1\tagain\n")
    with pytest.raises(DataError, match=r"corpus\.tsv: line 3: duplicate id 'd1' \(first at line 1\)"):
        load_trec(q, c, s, {0: 0})
    q, c, s = write_trec(tmp_path, "1 Q0 d1 0\n")
    with pytest.raises(DataError, match=r"missing\.txt: file not found"):
        load_trec(tmp_path / "missing.txt", c, s, {0: 0})
    with pytest.raises(DataError, match=r"nocorpus\.tsv: file not found"):
        load_trec(q, tmp_path / "nocorpus.tsv", s, {0: 0})


def test_all_null_column_and_large_strings(tmp_path):
    t = replaced(good_table(), "document", [None] * 6, pa.null())
    with pytest.raises(DataError, match=r"row 0, column 'document': null"):
        validate_pairs(t, "mem")
    path = tmp_path / "large.parquet"
    pq.write_table(replaced(good_table(), "query", ["a query"] * 6, pa.large_string()), path)
    assert read_pairs(path).schema.field("query").type == pa.string()


def test_rulebook_with_renamed_step_key_is_refused():
    raw = yaml.safe_load(DEFAULT_RULEBOOK.read_text())
    raw["steps"][5]["key"] = "freshness"
    for rule in raw["rules"]:
        if "time" in rule["when"]:
            rule["when"]["freshness"] = rule["when"].pop("time")
    with pytest.raises(DataError, match=r"renamed\.yaml: step key 'freshness' has no cue sentences"):
        synthesize(10, 0, parse_rulebook(raw, "renamed.yaml"))


def test_traces_without_reasons_keep_the_same_boxes():
    full = synthesize(30, 5, None, "train")
    compact = synthesize(30, 5, None, "train", reasons=False)
    box = re.compile(r"\\boxed\{([^{}\n]+)\}")
    for a, b in zip(full.column("trace").to_pylist(), compact.column("trace").to_pylist()):
        assert box.findall(a) == box.findall(b)
        assert len(b) < len(a) and all(line.split(": ", 1)[1].startswith("\\boxed{") for line in b.split("\n")[1:10])


# ---------------------------------------------------------------- the RL pool (labels only)

def test_rl_pool_is_labels_only_disjoint_and_its_tail_share_is_set_apart(tmp_path):
    from afrl_fast.data import RL_POOL, write_synthetic_splits

    tables = write_synthetic_splits(tmp_path, 600, 0, n_industry=20, n_longtail=20, train_tail_share=0.0,
                                    n_rl_pool=600, rl_pool_tail_share=0.6, reasons=False)
    pool = pq.read_table(tmp_path / f"{RL_POOL}.parquet")
    assert pool.num_rows == 600 and "trace" not in pool.column_names and "intent" not in pool.column_names
    assert set(pool.column("query_id").to_pylist()).isdisjoint(tables["train"].column("query_id").to_pylist())
    assert not any(tables["train"].column("tail").to_pylist())                 # tail share 0: no tail rule
    tail = np.mean(pool.column("tail").to_pylist())
    assert 0.5 < tail < 0.7, tail                                             # ~0.6 asked, 600 rows
    assert read_pairs(tmp_path / f"{RL_POOL}.parquet").num_rows == 600          # a valid pairs file


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_tail_share_outside_0_1_is_refused(tmp_path, share):
    from afrl_fast.data import write_synthetic_splits

    with pytest.raises(DataError, match="tail_share"):
        write_synthetic_splits(tmp_path, 10, 0, train_tail_share=share)
    assert not any(tmp_path.iterdir())


def test_labels_only_synth_writes_the_same_pairs_without_traces(tmp_path):
    """`data synth --labels-only`: every split holds the pairs the plain command writes, minus the
    trace and step columns (what synthesis takes as input)."""
    for name, extra in (("full", []), ("labels", ["--labels-only"])):
        assert main(["synth", "--n", "12", "--seed", "4", "--no-progress", "--out", str(tmp_path / name), *extra]) == 0
    for split in ("train", "industry", "longtail"):
        full, labels = (pq.read_table(tmp_path / name / f"{split}.parquet") for name in ("full", "labels"))
        assert "trace" in full.column_names and "trace" not in labels.column_names
        assert not {c for c in labels.column_names if c.startswith("step")}
        assert labels.equals(full.select(labels.column_names)) and labels.num_rows == full.num_rows
        with pytest.raises(DataError, match="trace"):
            read_pairs(tmp_path / "labels" / f"{split}.parquet", require_trace=True)
