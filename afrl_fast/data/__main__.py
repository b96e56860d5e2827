"""python -m afrl_fast.data: synthetic splits (synth) and TREC conversion (trec), written atomically."""
from __future__ import annotations

import argparse
import sys

import pyarrow.compute as pc

from afrl_fast.cli import Parser
from afrl_fast.data import __doc__ as data_doc, write_synthetic_splits
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
    s.add_argument("--seed", type=int, default=0, help="seed of the generator (the same seed writes the same splits)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--rulebook", default=None, help="rulebook YAML (default: configs/rulebook/default.yaml)")
    s.add_argument("--n-industry", type=int, default=None, help="rows of the industry split (default N/4)")
    s.add_argument("--n-longtail", type=int, default=None, help="rows of the longtail split (default N/4)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--no-reasons", action="store_true", help="box the step values without reason sentences")
    t = sub.add_parser("trec", help="convert TREC qrels + corpus.tsv + queries.tsv into a pairs Parquet file")
    t.add_argument("--qrels", required=True, help="TREC qrels file: QUERY_ID ITERATION DOC_ID GRADE per line")
    t.add_argument("--corpus", required=True, help="corpus TSV: DOC_ID<tab>TEXT per line")
    t.add_argument("--queries", required=True, help="queries TSV: QUERY_ID<tab>TEXT per line")
    t.add_argument("--grade-map", required=True, type=parse_grade_map,
                   help="the qrels grades mapped to labels 0-4, SRC:DST,… e.g. 0:0,1:2,2:4")
    t.add_argument("--out", required=True, help="output pairs Parquet file")
    return p


def _run_synth(args) -> None:
    synth_sizes(args.n, args.n_industry, args.n_longtail, names=("--n", "--n-industry", "--n-longtail"))
    check_synth_seed("--seed", args.seed)
    check_output_path(args.out, DataError, kind="dir")
    rb = load_rulebook(args.rulebook)
    check_cue_coverage(rb)
    tables = write_synthetic_splits(args.out, args.n, args.seed, rb, n_industry=args.n_industry,
                                    n_longtail=args.n_longtail, progress=not args.no_progress,
                                    reasons=not args.no_reasons)
    print(f"wrote {', '.join(f'{s}.parquet' for s in tables)} to {args.out} (seed {args.seed}, rulebook {rb.path})")
    print(synth_summary(tables, rb))


def _run_trec(args) -> None:
    check_output_path(args.out, DataError)
    table = load_trec(args.qrels, args.corpus, args.queries, args.grade_map)
    write_table(table, args.out)
    counts = label_distribution(table)
    print(f"wrote {args.out}: {len(table)} pairs, {len(pc.unique(table.column('query_id')))} queries, "
          f"grade map {args.grade_map}, label counts " + ", ".join(f"{k}:{c}" for k, c in zip(LABELS, counts)))


def main(argv=None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        _run_synth(args) if args.cmd == "synth" else _run_trec(args)
    except (DataError, RulebookError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:        # the disk filled up, a folder vanished: nothing was left half-written
        print(f"error: {e.filename or ''}: {e.strerror or e}".lstrip(": "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
