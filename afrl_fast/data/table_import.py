"""Labelled pairs from a CSV, TSV, JSON Lines or Parquet file, mapped onto the pairs schema and checked
by the validator every tool reads with (afrl_fast.pairs.checked_pairs), so an imported file and a
Parquet file read back are held to exactly the same rules.

    imported = import_pairs("labels.csv", columns={"doc_id": "pid", "label": "rating"},
                            grade_map={0: 0, 1: 2, 2: 4})
    imported.table      # query_id, doc_id, query, document, label (int8) + optional columns present

Row numbers in errors count records from 0, the CSV/TSV header not counted, as in every pairs error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ..pairs import OPTIONAL_TYPES, PAIR_COLUMNS, DataError, bad_value, checked_pairs, first_true
from ..trec import check_grade_map

FORMATS = ("csv", "tsv", "jsonl", "parquet")
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".parquet": "parquet", ".pq": "parquet"}
FORMAT_NAMES = {"csv": "CSV", "tsv": "TSV", "jsonl": "JSON Lines", "parquet": "Parquet"}
# What a file column can be mapped to: the schema's columns, then the optional ones passed through.
FIELDS = PAIR_COLUMNS + tuple(OPTIONAL_TYPES)
ID_COLUMNS = ("query_id", "doc_id")
# Whole numbers above 2**53 are not exact in a float: no grade or id that large is read as one.
FLOAT_EXACT = float(2 ** 53)
NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


@dataclass
class Imported:
    table: pa.Table                                    # the validated pairs table
    fmt: str                                           # the format it was read as
    converted: list[str] = field(default_factory=list)  # id columns whose numbers became strings
    passed: list[str] = field(default_factory=list)     # optional columns carried over


def file_format(path, fmt: str | None = None) -> str:
    """The format named, or the one the file's suffix says."""
    if fmt:
        if fmt not in FORMATS:
            raise DataError(f"format {fmt!r}: not one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r} "
                        f"({', '.join(SUFFIXES)}); name it with --format {'|'.join(FORMATS)}", str(path))
    return SUFFIXES[suffix]


def check_columns(columns: dict[str, str] | None) -> dict[str, str]:
    """{field: the file's column}; every field one of the schema's."""
    columns = dict(columns or {})
    unknown = [f for f in columns if f not in FIELDS]
    if unknown:
        raise DataError(f"column mapping: {unknown[0]!r} is not a field of the pairs schema (fields: "
                        f"{', '.join(FIELDS)})")
    return columns


def read_file(path, fmt: str, text_columns) -> pa.Table:
    """The file as a table. CSV/TSV cells of `text_columns` stay text as written (an id "007" is not
    the number 7, and the grade text is parsed later with a row-precise error)."""
    path = str(path)
    if not Path(path).is_file():
        raise DataError(f"{path}: {'is a directory, not a file' if Path(path).is_dir() else 'file not found'}", path)
    try:
        if fmt in ("csv", "tsv"):
            # newlines_in_values: a quoted document may span lines
            parse = pa_csv.ParseOptions(delimiter="," if fmt == "csv" else "\t", newlines_in_values=True)
            convert = pa_csv.ConvertOptions(column_types={c: pa.string() for c in text_columns})
            return pa_csv.read_csv(path, parse_options=parse, convert_options=convert)
        if fmt == "jsonl":
            return pa_json.read_json(path)
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not readable as {FORMAT_NAMES[fmt]}: {e}", path) from None


def whole_numbers(col, path, name: str, what: str):
    """A float or number-text column as int64, refusing (with its row) a value that is not a whole
    number: a grade 2.5 or an id 1.5 means the wrong column, not something to round."""
    if _is_text(col.type):
        col = pc.utf8_trim_whitespace(col)
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col)   # a blank cell is a missing value
        row = first_true(pc.invert(pc.match_substring_regex(col, NUMBER)))
        if row is not None:
            bad_value(path, row, name, f"{what} {col[row].as_py()!r} is not an integer")
        col = pc.cast(col, pa.float64())
    whole = pc.and_(pc.is_finite(col), pc.and_(pc.equal(col, pc.floor(col)), pc.less(pc.abs(col), FLOAT_EXACT)))
    row = first_true(pc.invert(whole))
    if row is not None:
        bad_value(path, row, name, f"{what} {col[row].as_py()!r} is not a whole number")
    return pc.cast(col, pa.int64())


def _is_text(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _set(table: pa.Table, name: str, col) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, col)


def map_columns(table: pa.Table, path, columns: dict[str, str]) -> pa.Table:
    """The mapped fields taken from the file's columns (one column may feed two fields: query text as
    its own id), then the file's other columns under their own names, so a missing field is reported
    by the validator beside the columns the file does have."""
    for fld, src in columns.items():
        if src not in table.column_names:
            raise DataError(f"{path}: column {src!r} (mapped to {fld!r} by --column {fld}={src}): missing "
                            f"(columns present: {table.column_names})", str(path), None, src)
    out = {fld: table.column(src) for fld, src in columns.items()}
    for name in table.column_names:
        # a file column named like a mapped field gives way to the mapping; a mapped source shows
        # under its field's name only, unless its own name is a field too
        if name not in out and (name not in columns.values() or name in FIELDS):
            out[name] = table.column(name)
    return pa.table(out)


def ids_as_text(table: pa.Table, path) -> tuple[pa.Table, list[str]]:
    """Numeric ids (a JSON number, an int64 Parquet column) as strings: 12 and 12.0 both become "12"."""
    converted = []
    for name in ID_COLUMNS:
        if name not in table.column_names:
            continue
        col, t = table.column(name), table.column(name).type
        if pa.types.is_floating(t):
            col = whole_numbers(col, path, name, "id")
        if pa.types.is_integer(col.type):
            table = _set(table, name, pc.cast(col, pa.string()))
            converted.append(f"{name} ({t})")
    return table, converted


def labels_as_integers(table: pa.Table, path) -> pa.Table:
    """Grades written as text (CSV) or floats (a JSON 3.0, a column with nulls exported from a data
    frame) as integers; any other type is left for the validator to name."""
    if "label" not in table.column_names:
        return table
    col = table.column("label")
    if _is_text(col.type) or pa.types.is_floating(col.type):
        table = _set(table, "label", whole_numbers(col, path, "label", "grade"))
    return table


def map_grades(table: pa.Table, path, grade_map: dict[int, int]) -> pa.Table:
    """Source grades → 0-4 through the grade map; a grade without an entry is an error with its row."""
    col = table.column("label") if "label" in table.column_names else None
    if col is None or not pa.types.is_integer(col.type):
        return table          # the validator names what is wrong with it
    col = pc.cast(col, pa.int64())
    at = pc.index_in(col, value_set=pa.array(list(grade_map), pa.int64()))
    row = first_true(pc.and_(pc.is_valid(col), pc.is_null(at)))
    if row is not None:
        bad_value(path, row, "label", f"grade {col[row].as_py()} has no entry in the grade map {grade_map}")
    return _set(table, "label", pc.take(pa.array(list(grade_map.values()), pa.int64()), at))


def _with_source(e: DataError, columns: dict[str, str]) -> DataError:
    """The validator names the schema's column; add the file's column it came from, or how to map one."""
    if e.column in columns and columns[e.column] != e.column:
        note = f" (the file's column {columns[e.column]!r})"
    elif e.row is None and e.column in FIELDS:
        note = f"; name the file's column with --column {e.column}=NAME"
    else:
        return e
    return DataError(f"{e}{note}", e.path, e.row, e.column)


def import_pairs(path, fmt: str | None = None, columns: dict[str, str] | None = None,
                 grade_map: dict[int, int] | None = None) -> Imported:
    """A pairs table from a CSV, TSV, JSON Lines or Parquet file: `columns` maps schema fields to the
    file's columns (unmapped fields are looked up under their own names), `grade_map` maps the
    file's grades onto 0-4. Everything is checked before anything is returned; nothing is written."""
    path = str(path)
    fmt = file_format(path, fmt)
    columns = check_columns(columns)
    gmap = check_grade_map(grade_map) if grade_map is not None else None
    texts = [columns.get(f, f) for f in FIELDS if f != "tail"]
    table = read_file(path, fmt, texts)
    if table.num_rows == 0:
        raise DataError(f"{path}: no pairs (the file has no records)", path)
    table = map_columns(table, path, columns)
    try:
        table, converted = ids_as_text(table, path)
        table = labels_as_integers(table, path)
        if gmap is not None:
            table = map_grades(table, path, gmap)
        table = checked_pairs(table, path)
    except DataError as e:
        raise _with_source(e, columns) from None
    passed = [f for f in FIELDS if f not in PAIR_COLUMNS and f in table.column_names]
    return Imported(table.select(list(PAIR_COLUMNS) + passed), fmt, converted, passed)
