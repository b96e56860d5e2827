"""`python -m afrl_fast.data import`: labelled pairs from CSV, TSV, JSON Lines and Parquet into the pairs
schema. Every format is written here by an independent writer (the csv and json modules, pyarrow's
Parquet writer) and the result is compared with a table built by hand, not with the importer's own
output; bad input is one error line naming the file, the row and the field, exit 2, no output."""
import argparse
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from afrl_fast.data import import_pairs, synthesize
from afrl_fast.data.__main__ import _build_parser, main
from afrl_fast.pairs import PAIRS_SCHEMA, DataError, read_pairs

# (query_id, doc_id, query, document, grade on a 0-2 scale, trace): texts with the separators, quotes,
# newlines and non-ASCII that break naive writers and readers; "007" must stay text, not the number 7
ROWS = [
    ("q1", "d1", "cheap phone, 5G", 'A "budget" phone,\nwith 5G.', 2, "4\nStep 1 ..."),
    ("q1", "007", "cheap phone, 5G", "Tablet review \u2014 \u00fcn\u00efcode", 0, "0\nStep 1 ..."),
    ("q1", "d3", "cheap phone, 5G", "Phone\tcase, red", 1, "2\nStep 1 ..."),
    ("q2", "d1", "caf\u00e9 opening hours", "Open 9-5 daily.", 2, "4\nStep 1 ..."),
    ("q2", "d4", "caf\u00e9 opening hours", "Closed on Mondays;\r\nopen Sundays", 1, "2\nStep 1 ..."),
    ("q3", "d5", "'quoted' query", "plain", 0, "0\nStep 1 ..."),
]
GRADE_MAP = {0: 0, 1: 2, 2: 4}
SOURCE = ["qid", "pid", "question", "passage", "rating", "trace"]     # the file's own column names
MAPPING = ["--column", "query_id=qid", "--column", "doc_id=pid", "--column", "query=question",
           "--column", "document=passage", "--column", "label=rating"]


def expected_table(grades=None) -> pa.Table:
    """The pairs table ROWS should become, built by hand."""
    grades = grades if grades is not None else [GRADE_MAP[r[4]] for r in ROWS]
    schema = PAIRS_SCHEMA.append(pa.field("trace", pa.string()))
    cols = list(zip(*ROWS))
    return pa.table([list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]), grades, list(cols[5])], schema=schema)


def write_delimited(path, rows, header=SOURCE, dialect="excel"):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, dialect=dialect)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path, rows, header=SOURCE):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(dict(zip(header, r)), ensure_ascii=False) + "\n")
    return path


def write_parquet(path, rows, header=SOURCE):
    pq.write_table(pa.table({h: list(c) for h, c in zip(header, zip(*rows))}), path)
    return path


WRITERS = {"csv": lambda p, rows, **k: write_delimited(p.with_suffix(".csv"), rows, **k),
           "tsv": lambda p, rows, **k: write_delimited(p.with_suffix(".tsv"), rows, dialect="excel-tab", **k),
           "jsonl": lambda p, rows, **k: write_jsonl(p.with_suffix(".jsonl"), rows, **k),
           "parquet": lambda p, rows, **k: write_parquet(p.with_suffix(".parquet"), rows, **k)}


def run(argv, capsys):
    rc = main(["import", *[str(a) for a in argv]])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_each_format_round_trips_to_the_same_pairs(fmt, tmp_path, capsys):
    src = WRITERS[fmt](tmp_path / "labels", ROWS)
    out = tmp_path / "pairs.parquet"
    rc, printed, err = run(["--input", src, "--out", out, *MAPPING, "--grade-map", "0:0,1:2,2:4"], capsys)
    assert rc == 0, err
    assert read_pairs(out, require_trace=True).equals(expected_table())
    assert f"6 pairs, 3 queries, label counts 0:2, 1:0, 2:2, 3:0, 4:2 (from {src}; read as {fmt};" in printed
    assert "kept trace" in printed and "written as strings" not in printed


def test_the_format_flag_overrides_the_suffix(tmp_path, capsys):
    src = write_delimited(tmp_path / "labels.txt", ROWS, dialect="excel-tab")
    rc, _, err = run(["--input", src, "--out", tmp_path / "p.parquet", *MAPPING, "--grade-map", "0:0,1:2,2:4"], capsys)
    assert rc == 2 and "cannot tell the format from the suffix '.txt'" in err and "--format" in err
    rc, _, err = run(["--input", src, "--out", tmp_path / "p.parquet", *MAPPING, "--grade-map", "0:0,1:2,2:4",
                      "--format", "tsv"], capsys)
    assert rc == 0, err
    assert read_pairs(tmp_path / "p.parquet", require_trace=True).equals(expected_table())


def test_columns_named_like_the_schema_need_no_mapping(tmp_path, capsys):
    """Grades already 0-4, the schema's own column names, an extra column that is left out."""
    rows = [(*r[:4], GRADE_MAP[r[4]], r[5], "extra") for r in ROWS]
    src = write_jsonl(tmp_path / "l.jsonl", rows, header=[*PAIRS_SCHEMA.names, "trace", "annotator"])
    rc, _, err = run(["--input", src, "--out", tmp_path / "p.parquet"], capsys)
    assert rc == 0, err
    got = pq.read_table(tmp_path / "p.parquet")
    assert got.equals(expected_table()) and "annotator" not in got.column_names


def test_one_column_may_feed_two_fields_and_a_mapping_shadows_a_same_named_column(tmp_path):
    """No query ids in the file: the query text is its id. A column named `label` holding something
    else gives way to --column label=rating."""
    rows = [(r[2], r[1], r[3], r[4], "ignored") for r in ROWS]
    src = write_delimited(tmp_path / "l.csv", rows, header=["query", "doc_id", "document", "rating", "label"])
    got = import_pairs(src, columns={"query_id": "query", "label": "rating"}).table
    assert got.column("query_id").to_pylist() == [r[2] for r in ROWS]
    assert got.column("label").to_pylist() == [r[4] for r in ROWS]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_delimited_ids_that_look_like_numbers_stay_as_written(fmt, tmp_path, capsys):
    """A CSV cell is text: the id "0042" is not the number 42 (nothing is converted, nothing is said)."""
    rows = [(f"{100 + i // 2:04d}", f"00{i}", *r[2:]) for i, r in enumerate(ROWS)]
    src = WRITERS[fmt](tmp_path / "l", rows)
    rc, printed, err = run(["--input", src, "--out", tmp_path / "p.parquet", *MAPPING], capsys)
    assert rc == 0, err
    got = read_pairs(tmp_path / "p.parquet")
    assert got.column("query_id").to_pylist() == ["0100", "0100", "0101", "0101", "0102", "0102"]
    assert got.column("doc_id").to_pylist() == [f"00{i}" for i in range(6)]
    assert "written as strings" not in printed


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_numeric_ids_become_strings_and_the_summary_says_so(fmt, tmp_path, capsys):
    rows = [(100 + i // 2, float(7 + i), r[2], r[3], r[4], r[5]) for i, r in enumerate(ROWS)]
    src = WRITERS[fmt](tmp_path / "l", rows)
    rc, printed, err = run(["--input", src, "--out", tmp_path / "p.parquet", *MAPPING, "--grade-map", "0:0,1:2,2:4"],
                           capsys)
    assert rc == 0, err
    got = read_pairs(tmp_path / "p.parquet")
    assert got.column("query_id").to_pylist() == ["100", "100", "101", "101", "102", "102"]
    assert got.column("doc_id").to_pylist() == ["7", "8", "9", "10", "11", "12"]       # 7.0 -> "7", not "7.0"
    assert "numeric ids written as strings: query_id (int64), doc_id (double)" in printed


def test_grades_as_text_or_whole_floats_are_read_and_the_grade_map_applies(tmp_path):
    rows = [(*r[:4], ["2", " 0 ", "1.0", "+2", "1", "0"][i], r[5]) for i, r in enumerate(ROWS)]
    src = write_delimited(tmp_path / "l.csv", rows)
    cols = {"query_id": "qid", "doc_id": "pid", "query": "question", "document": "passage", "label": "rating"}
    got = import_pairs(src, columns=cols, grade_map=GRADE_MAP)
    assert got.table.equals(expected_table())
    # without the map the same grades stay as they are (0-2 is inside 0-4)
    assert import_pairs(src, columns=cols).table.column("label").to_pylist() == [2, 0, 1, 2, 1, 0]


def test_optional_columns_pass_through(tmp_path):
    """A synthetic table (rule, tail, the step columns, trace) through JSON Lines comes back whole."""
    table = synthesize(12, seed=5, split="train")
    src = write_jsonl(tmp_path / "s.jsonl", [tuple(r.values()) for r in table.to_pylist()], header=table.column_names)
    got = import_pairs(src)
    assert sorted(got.passed) == sorted(set(table.column_names) - set(PAIRS_SCHEMA.names))
    assert got.table.select(table.column_names).equals(table)


# ---------------------------------------------------------------- bad input

def bad_rows(**changes):
    """ROWS with cells replaced: {row: (column index, value)}."""
    rows = [list(r) for r in ROWS]
    for row, (col, value) in changes.items():
        rows[int(row[1:])][col] = value
    return rows


# name -> (format, rows, extra flags, row, field named in the error, a fragment of the problem)
BAD = {
    "grade 7": ("csv", bad_rows(r2=(4, 7)), [], 2, "label", "grade 7 outside 0-4"),
    "grade 7 after a map": ("jsonl", bad_rows(r3=(4, 3)), ["--grade-map", "0:0,1:2,2:4,3:7"], None, None,
                            "maps to 7, which is not a grade"),
    "grade without a map entry": ("tsv", bad_rows(r4=(4, 3)), ["--grade-map", "0:0,1:2,2:4"], 4, "label",
                                  "grade 3 has no entry in the grade map"),
    "empty query": ("csv", bad_rows(r1=(2, "  ")), [], 1, "query", "empty or whitespace-only"),
    "empty doc_id": ("jsonl", bad_rows(r5=(1, "")), [], 5, "doc_id", "empty"),
    "label not an integer": ("csv", bad_rows(r3=(4, "high")), [], 3, "label", "grade 'high' is not an integer"),
    "label a fraction": ("jsonl", bad_rows(r1=(4, 2.5)), [], 1, "label", "grade 2.5 is not a whole number"),
    "missing label": ("parquet", bad_rows(r2=(4, None)), [], 2, "label", "null grade"),
    "fractional id": ("jsonl", [[1.5 if i == 3 else float(i), *r[1:]] for i, r in enumerate(bad_rows())], [], 3,
                      "query_id", "id 1.5 is not a whole number"),
    "duplicate pair": ("csv", bad_rows(r2=(1, "d1"), r0=(1, "d1")), [], 2, "doc_id", "duplicate (query_id, doc_id)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_naming_file_row_and_field(name, tmp_path, capsys):
    fmt, rows, extra, row, fld, problem = BAD[name]
    src = WRITERS[fmt](tmp_path / "labels", rows)
    out = tmp_path / "out" / "pairs.parquet"
    rc, printed, err = run(["--input", src, "--out", out, *MAPPING, *extra], capsys)
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert problem in lines[0] and "Traceback" not in err, lines[0]
    if row is not None:
        assert f"{src}: row {row}, column {fld!r}" in lines[0], lines[0]
        if fld in ("label", "query", "doc_id", "query_id"):     # the file's own name for the field
            assert f"the file's column {dict(label='rating', query='question', doc_id='pid', query_id='qid')[fld]!r}" \
                in lines[0], lines[0]
    assert not out.parent.exists() and printed == ""


@pytest.mark.parametrize("argv, needle", [
    (["--column", "label=grade"], "l.csv: column 'grade' (mapped to 'label' by --column label=grade): missing"),
    ([], "l.csv: column 'query_id': missing"),                      # no mapping, no column of that name
    ([], "name the file's column with --column query_id=NAME"),
    (["--column", "label=rating", "--column", "label=pid"], "--column label=pid: 'label' is already taken from "
                                                            "column 'rating'"),
])
def test_a_missing_or_doubly_mapped_column_is_named(argv, needle, tmp_path, capsys):
    src = write_delimited(tmp_path / "l.csv", ROWS)
    rc, _, err = run(["--input", src, "--out", tmp_path / "p.parquet", *argv], capsys)
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.parametrize("name, content, needle", [
    ("l.jsonl", '{"qid": "a"}\n{"qid": "b",\n', "not readable as JSON Lines"),
    ("l.csv", "qid,pid\na,b\nc\n", "not readable as CSV: CSV parse error: Expected 2 columns, got 1"),
    ("l.parquet", "not parquet", "not readable as Parquet"),
    ("l.csv", "qid,pid,question,passage,rating\n", "no pairs"),
    ("l.xlsx", "x", "cannot tell the format"),
])
def test_unreadable_files_are_one_line(name, content, needle, tmp_path, capsys):
    src = tmp_path / name
    src.write_text(content)
    rc, _, err = run(["--input", src, "--out", tmp_path / "p.parquet", *MAPPING], capsys)
    assert rc == 2 and needle in err and str(src) in err and len(err.splitlines()) == 1, err
    rc, _, err = run(["--input", tmp_path / "none.csv", "--out", tmp_path / "p.parquet"], capsys)
    assert rc == 2 and "none.csv: file not found" in err


def test_a_failed_import_leaves_an_earlier_output_as_it_was(tmp_path, capsys):
    out = tmp_path / "pairs.parquet"
    out.write_bytes(b"earlier")
    src = write_delimited(tmp_path / "l.csv", bad_rows(r2=(4, 7)))
    assert run(["--input", src, "--out", out, *MAPPING], capsys)[0] == 2
    assert out.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["l.csv", "pairs.parquet"]


def test_the_importer_and_read_pairs_give_the_same_error(tmp_path):
    """One validator serves both: the same bad table as Parquet fails both readers with one message."""
    table = expected_table([0, 1, 9, 2, 3, 4])
    path = write_parquet(tmp_path / "bad.parquet", [tuple(r.values()) for r in table.to_pylist()],
                         header=table.column_names)
    with pytest.raises(DataError) as via_read:
        read_pairs(path)
    with pytest.raises(DataError) as via_import:
        import_pairs(path)
    assert str(via_read.value) == str(via_import.value)
    assert (via_import.value.row, via_import.value.column) == (2, "label")


def test_every_flag_of_the_data_tool_has_a_help_line():
    sub = next(a for a in _build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert "import" in sub.choices
    missing = [f"{cmd} {a.option_strings}" for cmd, p in sub.choices.items() for a in p._actions
               if a.option_strings and a.help in (None, "", argparse.SUPPRESS)]
    assert not missing, missing
