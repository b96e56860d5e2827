"""python -m afrl_fast.verify: the verifier over a Parquet file of responses and labels (afrl_fast.verify)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow as pa

from afrl_fast.cli import Parser
from afrl_fast.files import atomic_write_bytes, check_output_path
from afrl_fast.reward import GATES, RewardConfig
from afrl_fast.rulebook import RulebookError, load_rulebook
from afrl_fast.verify import verify_batch


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def read_inputs(path: Path, response_column: str, label_column: str) -> pa.Table:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise CliError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise CliError(f"{path}: cannot read as parquet: {e}") from None
    for col in (response_column, label_column):
        if col not in table.column_names:
            raise CliError(f"{path}: missing column {col!r} (columns: {table.column_names})")
    rtype = table.schema.field(response_column).type
    if not (pa.types.is_string(rtype) or pa.types.is_large_string(rtype) or pa.types.is_string_view(rtype)):
        raise CliError(f"{path}: column {response_column!r} must be strings, got {rtype}")
    ltype = table.schema.field(label_column).type
    if not pa.types.is_integer(ltype):
        raise CliError(f"{path}: column {label_column!r} must be integers, got {ltype}")
    return table


def run_cli(args) -> str:
    import pyarrow.parquet as pq

    out_path = check_output_path(args.out, CliError)
    try:
        config = RewardConfig(gate=args.gate)
        rulebook = load_rulebook(args.rulebook)
    except (RulebookError, ValueError) as e:
        raise CliError(str(e)) from None
    table = read_inputs(Path(args.responses), args.response_column, args.label_column)
    try:
        t0 = time.perf_counter()
        res = verify_batch(table.column(args.response_column), table.column(args.label_column), rulebook, config)
        seconds = time.perf_counter() - t0
    except (ValueError, TypeError) as e:
        raise CliError(f"{args.responses}: {e}") from None
    out = res.to_arrow()
    ids = table.drop_columns([c for c in table.column_names if c == args.response_column or c in out.column_names])
    for name in out.column_names:
        ids = ids.append_column(name, out.column(name))
    atomic_write_bytes(out_path, lambda f: pq.write_table(ids, f))
    n = len(res)
    fmt_rate = float(res.fmt.mean()) if n else 0.0
    mean_reward = float(res.reward.mean()) if n else 0.0
    rate = n / seconds if seconds > 0 else float("inf")
    return (f"verified n={n} format_pass={fmt_rate:.4f} mean_reward={mean_reward:.4f} "
            f"responses/s={rate:,.0f} -> {out_path}")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m afrl_fast.verify", description="Verify AFRL responses and compute their rewards.")
    # --responses, not --pairs: this file holds model responses to check, not labelled pairs to train on
    p.add_argument("--responses", required=True,
                   help="input Parquet of model responses (not a pairs file): a response column and a label column")
    p.add_argument("--out", required=True, help="output parquet, one row per response")
    p.add_argument("--rulebook", default=None, help="rulebook YAML (default: configs/rulebook/default.yaml)")
    p.add_argument("--response-column", default="response", help="the column of --responses holding the responses")
    p.add_argument("--label-column", default="label", help="the column of --responses holding the labels 0-4")
    p.add_argument("--gate", choices=GATES, default="literal",
                   help="literal: the paper's logic gate (derived grade = answer = label); pred: derived grade = "
                        "answer only, so a consistent wrong answer earns a reward by its distance to the label")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run_cli(args))
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:        # e.g. the disk filled up while writing: the old output is intact
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
