"""The control of trace synthesis: the pairs synthesis kept, with the generator's own traces.

Synthesis keeps a verified teacher trace for some of the labelled pairs. To tell what the traces
are worth from what the pairs are worth, the control trains the same recipe on exactly those pairs
(same rows, same order, so the same steps) with the traces the synthetic generator wrote for them.

    python scripts/synthesis_control.py --synth runs/user_path/synth --generator runs/user_path/generator \
        --out runs/user_path/control

--synth: a `python -m afrl_fast.synthesize` output (train.parquet and its held-out splits);
--generator: `python -m afrl_fast.data synth` output for the same pairs, traces included. The held-out
splits are copied from --synth, so both students are evaluated on the same pairs.
"""
import argparse
import sys
from pathlib import Path

import pyarrow as pa

from afrl_fast.files import atomic_copy
from afrl_fast.pairs import DataError, read_pairs, write_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--synth", type=Path, required=True, help="synthesis output folder")
    p.add_argument("--generator", type=Path, required=True, help="data synth output of the same pairs, with traces")
    p.add_argument("--out", type=Path, required=True, help="the control's data folder")
    args = p.parse_args(argv)
    try:
        kept = read_pairs(args.synth / "train.parquet", require_trace=True)
        generated = read_pairs(args.generator / "train.parquet", require_trace=True)
        row_of = {(q, d): i for i, (q, d) in enumerate(zip(generated.column("query_id").to_pylist(),
                                                           generated.column("doc_id").to_pylist()))}
        keys = list(zip(kept.column("query_id").to_pylist(), kept.column("doc_id").to_pylist()))
        missing = [k for k in keys if k not in row_of]
        if missing:
            raise DataError(f"{args.generator / 'train.parquet'}: {len(missing)} kept pairs are not there, e.g. "
                            f"query_id {missing[0][0]!r} doc_id {missing[0][1]!r}: not the same labelled pairs")
        control = generated.take(pa.array([row_of[k] for k in keys]))
        if control.column("label").to_pylist() != kept.column("label").to_pylist():
            raise DataError(f"{args.generator}: the labels differ from {args.synth}'s for the same pairs")
        args.out.mkdir(parents=True, exist_ok=True)
        write_table(control, args.out / "train.parquet")
        for split in sorted(args.synth.glob("*.parquet")):
            if split.stem not in ("train", "rejected", "hard"):
                atomic_copy(split, args.out / split.name)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: the {control.num_rows} pairs synthesis kept, with the generator's traces")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
