"""python -m afrl_fast.metrics: the ranking and classification metrics of a predictions Parquet file."""
from __future__ import annotations

import sys

from afrl_fast.cli import Parser
from afrl_fast.files import check_output_path
from afrl_fast.metrics import MetricsError, compute_metrics, format_table, read_predictions, write_json


def main(argv=None) -> int:
    ap = Parser(prog="python -m afrl_fast.metrics",
                                 description="5-ACC, 2-ACC, Pair-ACC, NDCG@3, Macro/Weighted-F1 of first-token predictions")
    ap.add_argument("--predictions", required=True, help="parquet with query_id, label, p0..p4")
    ap.add_argument("--out", help="write the metrics JSON here")
    ap.add_argument("--renormalise", action="store_true", help="divide each p0..p4 row by its sum")
    ap.add_argument("--exp-gain", action="store_true", help="NDCG gain 2^g-1 instead of g")
    ap.add_argument("--ndcg-ties", choices=("pessimistic", "input"), default="pessimistic",
                    help="documents with equal scores in NDCG@3: pessimistic ranks the lower grades first; input keeps "
                         "the file's order")
    args = ap.parse_args(argv)
    try:
        if args.out:
            check_output_path(args.out, MetricsError)      # before the work, not after the table
        labels, probs, qids = read_predictions(args.predictions)
        metrics = compute_metrics(labels, probs, qids, renormalise=args.renormalise,
                                  exp_gain=args.exp_gain, ndcg_ties=args.ndcg_ties)
        if args.out:
            write_json(metrics, args.out)
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
