"""python -m afrl_fast.report: a run folder's or an experiment folder's figures and summary."""
from __future__ import annotations

import sys
from pathlib import Path

from afrl_fast.cli import Parser
from afrl_fast.experiment_results import copy_small_files
from afrl_fast.files import check_output_path
from afrl_fast.report import draw_experiment, draw_report

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    parser = Parser(prog="python -m afrl_fast.report",
                    description="Draw PNG plots from RUN_DIR/metrics.jsonl, or compare the "
                                "runs of an experiment folder (afrl_fast.experiments).")
    parser.add_argument("run_dir", type=Path, help="training run folder holding metrics.jsonl, or an experiment folder")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: RUN_DIR/plots; an experiment's: RUN_DIR/summary)")
    parser.add_argument("--copy-runs", action="store_true",
                        help="an experiment: also copy its manifest, evaluation splits and each finished run's "
                             "results.json, metrics.jsonl and config.yaml into --out (paths made relative), so the "
                             "summary can be recomputed from --out alone: python -m afrl_fast.report OUT")
    args = parser.parse_args(argv)
    try:
        experiment = (args.run_dir / "experiment.json").is_file()
        out = args.out or args.run_dir / ("summary" if experiment else "plots")
        check_output_path(out, ValueError, kind="dir")
        if args.copy_runs and not experiment:
            raise ValueError(f"--copy-runs: {args.run_dir} is not an experiment folder (no experiment.json)")
        if experiment:                                      # an experiment folder: compare its runs
            paths = draw_experiment(args.run_dir, out)
        else:
            paths = draw_report(args.run_dir, out)
        if args.copy_runs:
            copied = copy_small_files(args.run_dir, out, ROOT)
            print(f"copied {len(copied)} small files of the runs into {out}")
    except (OSError, ValueError, RuntimeError) as err:     # ExperimentError is a RuntimeError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    if not paths:
        print("note: nothing to draw")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
