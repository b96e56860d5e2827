"""The pair tables every stage reads and writes: their schema, the checks a file must pass (one
DataError naming the file, row and column), and atomic reads and writes.

    query_id string, doc_id string, query string, document string, label int8 (0-4)

Synthetic tables (afrl_fast.synthetic) add the ground truth the generator used: the rule, whether it
is a long-tail rule, the step 4-8 values and the AFRL trace.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .files import atomic_write_bytes
from .rulebook import LABELS

PAIRS_SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("doc_id", pa.string()),
    ("query", pa.string()),
    ("document", pa.string()),
    ("label", pa.int8()),
])


PAIR_COLUMNS = tuple(PAIRS_SCHEMA.names)


TEXT_COLUMNS = ("query_id", "doc_id", "query", "document")   # must be non-empty strings


DEFAULT_STEP_KEYS = ("intent", "entity", "time", "source", "coverage")


# The splits the bundled synthetic generator writes. A folder of one's own (data.dir) holds train
# plus whichever evaluation splits the config names (eval.splits), so only the generator's data is
# bound to these names.
SYNTHETIC_SPLITS = ("train", "industry", "longtail")


def synthetic_schema(step_keys=DEFAULT_STEP_KEYS) -> pa.Schema:
    """Pairs schema + rule, tail, one string column per critical step key, trace."""
    fields = list(PAIRS_SCHEMA) + [pa.field("rule", pa.string()), pa.field("tail", pa.bool_())]
    fields += [pa.field(k, pa.string()) for k in step_keys]
    fields.append(pa.field("trace", pa.string()))
    return pa.schema(fields)


SYNTHETIC_SCHEMA = synthetic_schema()


# Optional columns whose type is checked when present (a synthetic table read back).
OPTIONAL_TYPES = {"rule": pa.string(), "tail": pa.bool_(), "trace": pa.string(),
                  **{k: pa.string() for k in DEFAULT_STEP_KEYS}}


class DataError(ValueError):
    """Unusable data; the message names the file and, where it applies, the row/line and column."""

    def __init__(self, message: str, path=None, row=None, column=None):
        super().__init__(message)
        self.path, self.row, self.column = path, row, column


def bad_value(path, row, column, problem):
    raise DataError(f"{path}: row {row}, column {column!r}: {problem}", path, row, column)


def first_true(mask) -> int | None:
    """Index of the first true entry of a boolean (chunked) array; nulls count as false."""
    idx = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if idx is None or idx < 0 else idx


def _is_string_type(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _first_non_null(col) -> int:
    return first_true(pc.is_valid(col)) or 0


def _check_type(table, path, name, expected):
    col = table.column(name)
    t = col.type
    if pa.types.is_null(t) and len(col):
        bad_value(path, 0, name, "null")
    ok = {"string": _is_string_type, "int": pa.types.is_integer, "bool": pa.types.is_boolean}[expected](t)
    if not ok:
        row = _first_non_null(col)
        shown = col[row].as_py() if len(col) else None
        bad_value(path, row, name, f"expected {expected} type, column has type {t} (value {shown!r})")


def _check_non_empty_text(table, path, name):
    col = table.column(name)
    row = first_true(pc.is_null(col))
    if row is not None:
        bad_value(path, row, name, "null")
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
    row = first_true(blank)
    if row is not None:
        bad_value(path, row, name, f"empty or whitespace-only text {col[row].as_py()!r}")


def _check_labels(table, path):
    col = table.column("label")
    row = first_true(pc.is_null(col))
    if row is not None:
        bad_value(path, row, "label", "null grade")
    outside = pc.or_(pc.less(col, min(LABELS)), pc.greater(col, max(LABELS)))
    row = first_true(outside)
    if row is not None:
        bad_value(path, row, "label", f"grade {col[row].as_py()} outside {min(LABELS)}-{max(LABELS)}")


def _first_duplicate(qid, did) -> tuple[int, int] | None:
    """(row, earlier row) of the first (query_id, doc_id) seen twice, by sorting on (qid, did, row)."""
    n = len(qid)
    if n < 2:
        return None
    keys = pa.table({"q": qid, "d": did, "i": pa.array(np.arange(n, dtype=np.int64))})
    order = pc.sort_indices(keys, sort_keys=[("q", "ascending"), ("d", "ascending"), ("i", "ascending")])
    sq, sd = pc.take(qid, order), pc.take(did, order)
    same = pc.and_(pc.equal(sq[1:], sq[:-1]), pc.equal(sd[1:], sd[:-1]))
    pos = np.flatnonzero(same.to_numpy(zero_copy_only=False))
    if not len(pos):
        return None
    rows = order.to_numpy()
    later = rows[pos + 1]
    k = int(np.argmin(later))
    # Within a group rows are ascending, so the smallest "later" row is its group's second and
    # its predecessor in sorted order is the group's first occurrence.
    return int(later[k]), int(rows[pos[k]])


def validate_pairs(table: pa.Table, path="<table>", require_trace: bool = False) -> None:
    """Raise DataError (naming file, row and column) for the first bad value of a pairs table."""
    path = str(path)
    for name in PAIR_COLUMNS + (("trace",) if require_trace else ()):
        if name not in table.column_names:
            raise DataError(f"{path}: column {name!r}: missing (columns present: {table.column_names})",
                            path, None, name)
    for name in TEXT_COLUMNS:
        _check_type(table, path, name, "string")
    _check_type(table, path, "label", "int")
    for name, t in OPTIONAL_TYPES.items():
        if name in table.column_names:
            _check_type(table, path, name, "bool" if pa.types.is_boolean(t) else "string")
    for name in TEXT_COLUMNS:
        _check_non_empty_text(table, path, name)
    _check_labels(table, path)
    if require_trace:
        _check_non_empty_text(table, path, "trace")
    dup = _first_duplicate(table.column("query_id"), table.column("doc_id"))
    if dup is not None:
        row, first = dup
        bad_value(path, row, "doc_id",
                  f"duplicate (query_id, doc_id) = ({table.column('query_id')[row].as_py()!r}, "
                  f"{table.column('doc_id')[row].as_py()!r}), first seen at row {first}")


def _normalize(table: pa.Table) -> pa.Table:
    """Cast the checked label column to int8 and large strings to plain strings."""
    i = table.column_names.index("label")
    table = table.set_column(i, "label", pc.cast(table.column("label"), pa.int8()))
    for name in TEXT_COLUMNS + ("trace",):
        if name in table.column_names and not pa.types.is_string(table.column(name).type):
            j = table.column_names.index(name)
            table = table.set_column(j, name, pc.cast(table.column(name), pa.string()))
    return table


def checked_pairs(table: pa.Table, path="<table>", require_trace: bool = False) -> pa.Table:
    """validate_pairs, then the label as int8 and plain strings: what every reader of pairs gets,
    whether the table came from Parquet (read_pairs) or another format (afrl_fast.data import)."""
    validate_pairs(table, path, require_trace=require_trace)
    return _normalize(table)


def read_pairs(path, require_trace: bool = False) -> pa.Table:
    """Read and validate a pairs (or synthetic) Parquet file; label comes back as int8."""
    path = str(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", path) from None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}", path) from None
    return checked_pairs(table, path, require_trace=require_trace)


def write_table(table: pa.Table, path) -> Path:
    """Write Parquet atomically (afrl_fast.files.atomic_write_bytes): a reader never sees a
    half-written file and a crash leaves the old file intact."""
    path = Path(path)
    atomic_write_bytes(path, lambda f: pq.write_table(table, f))
    return path
