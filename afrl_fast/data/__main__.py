"""python -m afrl_fast.data: synthetic splits (synth), TREC conversion (trec) and labelled pairs from
CSV, TSV, JSON Lines or Parquet (import), written atomically."""
from __future__ import annotations

import argparse
import sys

import pyarrow.compute as pc

from afrl_fast.cli import Parser
from afrl_fast.data import __doc__ as data_doc, write_synthetic_splits
from afrl_fast.data.table_import import FIELDS, FORMATS, SUFFIXES, import_pairs
from afrl_fast.files import check_output_path
from afrl_fast.pairs import DataError, write_table
from afrl_fast.rulebook import LABELS, RulebookError, load_rulebook
from afrl_fast.synthetic import check_cue_coverage, check_synth_seed, label_distribution, synth_sizes, synth_summary
from afrl_fast.trec import load_trec, parse_grade_map


def _build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m afrl_fast.data", description=data_doc.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, help="what to write")
    s = sub.add_parser("synth", help="write DIR/train.parquet, DIR/industry.parquet, DIR/longtail.parquet")
    s.add_argument("--n", type=int, required=True, help="rows of the train split")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator (the same seed writes the same bytes)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--rulebook", default=None, help="rulebook YAML (default: configs/rulebook/default.yaml)")
    s.add_argument("--n-industry", type=int, default=None, help="rows of the industry split (default N/4)")
    s.add_argument("--n-longtail", type=int, default=None, help="rows of the longtail split (default N/4)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--no-reasons", action="store_true", help="box the step values without reason sentences")
    s.add_argument("--labels-only", action="store_true",
                   help="drop the trace and step columns: labelled pairs to synthesize traces for (the same pairs)")
    t = sub.add_parser("trec", help="convert TREC qrels + corpus.tsv + queries.tsv into a pairs Parquet file")
    t.add_argument("--qrels", required=True, help="TREC qrels file: QUERY_ID ITERATION DOC_ID GRADE per line")
    t.add_argument("--corpus", required=True, help="corpus TSV: DOC_ID<tab>TEXT per line")
    t.add_argument("--queries", required=True, help="queries TSV: QUERY_ID<tab>TEXT per line")
    t.add_argument("--grade-map", required=True, type=parse_grade_map,
                   help="the qrels grades mapped to labels 0-4, SRC:DST,… e.g. 0:0,1:2,2:4")
    t.add_argument("--out", required=True, help="output pairs Parquet file")
    _add_import_parser(sub)
    return p


def parse_column(text: str) -> tuple[str, str]:
    """"label=rating" -> ("label", "rating")."""
    fld, sep, src = text.partition("=")
    if not sep or not src:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=NAME, e.g. label=rating")
    if fld not in FIELDS:
        raise argparse.ArgumentTypeError(f"{fld!r} is not a field of the pairs schema ({', '.join(FIELDS)})")
    return fld, src


def _add_import_parser(sub) -> None:
    i = sub.add_parser("import", help="convert labelled pairs in CSV, TSV, JSON Lines or Parquet into a pairs Parquet file",
                       description="Read (query, document, grade) pairs from a CSV, TSV, JSON Lines or Parquet file, "
                                   "map its columns onto the pairs schema, check every row with the same validator "
                                   "every tool reads with and write a pairs Parquet file (all or nothing). An error "
                                   "names the file, the row (records counted from 0, a header not counted) and the field.")
    i.add_argument("--input", required=True, help="the labelled pairs: .csv, .tsv, .jsonl or .parquet")
    i.add_argument("--out", required=True, help="the pairs Parquet file to write")
    i.add_argument("--format", choices=FORMATS, default=None,
                   help=f"the input's format (default: from its suffix, {', '.join(SUFFIXES)})")
    i.add_argument("--column", action="append", default=[], type=parse_column, metavar="FIELD=NAME",
                   help="take FIELD from the file's column NAME; repeat per field (e.g. --column label=rating "
                        f"--column doc_id=pid). Fields: {', '.join(FIELDS)}; an unmapped field is read from the "
                        "column of its own name, and optional ones (trace, ...) are kept when present")
    i.add_argument("--grade-map", type=parse_grade_map, default=None,
                   help="map the file's grades onto 0-4, SRC:DST,… e.g. 0:0,1:2,2:4 (default: grades are 0-4 already)")


def _run_synth(args) -> None:
    synth_sizes(args.n, args.n_industry, args.n_longtail, names=("--n", "--n-industry", "--n-longtail"))
    check_synth_seed("--seed", args.seed)
    check_output_path(args.out, DataError, kind="dir")
    rb = load_rulebook(args.rulebook)
    check_cue_coverage(rb)
    tables = write_synthetic_splits(args.out, args.n, args.seed, rb, n_industry=args.n_industry,
                                    n_longtail=args.n_longtail, progress=not args.no_progress,
                                    reasons=not args.no_reasons, labels_only=args.labels_only)
    print(f"wrote {', '.join(f'{s}.parquet' for s in tables)} to {args.out} (seed {args.seed}, rulebook {rb.path})")
    print(synth_summary(tables, rb))


def _run_trec(args) -> None:
    check_output_path(args.out, DataError)
    table = load_trec(args.qrels, args.corpus, args.queries, args.grade_map)
    write_table(table, args.out)
    print(f"wrote {args.out}: {len(table)} pairs, {len(pc.unique(table.column('query_id')))} queries, "
          f"grade map {args.grade_map}, label counts {_label_counts(table)}")


def _columns(pairs: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for fld, src in pairs:
        if fld in out and out[fld] != src:
            raise DataError(f"--column {fld}={src}: {fld!r} is already taken from column {out[fld]!r}")
        out[fld] = src
    return out


def _label_counts(table) -> str:
    return ", ".join(f"{k}:{c}" for k, c in zip(LABELS, label_distribution(table)))


def _run_import(args) -> None:
    check_output_path(args.out, DataError)
    got = import_pairs(args.input, args.format, _columns(args.column), args.grade_map)
    write_table(got.table, args.out)
    notes = [f"read as {got.fmt}"]
    if got.converted:   # say so: a join on these ids elsewhere must use the same strings
        notes.append(f"numeric ids written as strings: {', '.join(got.converted)}")
    if args.grade_map:
        notes.append(f"grade map {args.grade_map}")
    notes.append(f"kept {', '.join(got.passed)}" if got.passed else "no optional columns")
    table = got.table
    print(f"wrote {args.out}: {len(table)} pairs, {len(pc.unique(table.column('query_id')))} queries, label counts "
          f"{_label_counts(table)} (from {args.input}; {'; '.join(notes)})")


RUNS = {"synth": _run_synth, "trec": _run_trec, "import": _run_import}


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        RUNS[args.cmd](args)
    except (DataError, RulebookError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:        # the disk filled up, a folder vanished: nothing was left half-written
        print(f"error: {e.filename or ''}: {e.strerror or e}".lstrip(": "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
