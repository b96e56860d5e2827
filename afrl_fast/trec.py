"""TREC-style graded relevance data (qrels, corpus.tsv, queries.tsv) as a pair table, the source grades
mapped onto 0-4 by a grade map."""
from __future__ import annotations

import argparse
import re

import numpy as np
import pyarrow as pa

from .pairs import PAIR_COLUMNS, PAIRS_SCHEMA, DataError, validate_pairs
from .rulebook import LABELS


def check_grade_map(grade_map) -> dict[int, int]:
    """{source grade: grade 0-4}, every target checked (the TREC loader and `data import` share it)."""
    if not grade_map:
        raise DataError("grade_map: required (e.g. {0: 0, 1: 2, 2: 4}); the source scale must be mapped explicitly")
    out = {}
    for src, dst in grade_map.items():
        if not isinstance(dst, (int, np.integer)) or isinstance(dst, bool) or int(dst) not in LABELS:
            raise DataError(f"grade_map: grade {src} maps to {dst!r}, which is not a grade 0-4")
        out[int(src)] = int(dst)
    return out


_UNDECODABLE = re.compile("[\udc80-\udcff]")   # what surrogateescape makes of bytes that are not UTF-8


def text_lines(path, newline=None):
    """(line number, line) of a UTF-8 text file. Undecodable bytes are an error naming the line
    and column (decoding per line keeps the numbers exact, unlike a decode error from a buffered
    reader); a missing file, a directory or an unreadable file is one DataError line too."""
    path = str(path)
    try:
        f = open(path, encoding="utf-8", errors="surrogateescape", newline=newline)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", path) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}", path) from None
    with f:
        try:
            for line_no, line in enumerate(f, 1):
                bad = _UNDECODABLE.search(line)
                if bad:
                    raise DataError(f"{path}: line {line_no}: not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} "
                                    f"at column {bad.start() + 1})", path, line_no)
                yield line_no, line
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}", path) from None


def read_id_text_tsv(path) -> dict[str, tuple[str, int]]:
    """{id: (text, line number)} from `id<TAB>text` lines. The text is everything after the first
    tab, verbatim (the TREC/MS MARCO convention; no CSV unquoting)."""
    path = str(path)
    out = {}
    for line_no, line in text_lines(path, newline=""):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t", 1)
        if len(parts) != 2:
            raise DataError(f"{path}: line {line_no}: expected 'id<TAB>text', got {line[:80]!r}", path, line_no)
        key = parts[0].strip()
        if key in out:
            raise DataError(f"{path}: line {line_no}: duplicate id {key!r} (first at line {out[key][1]})",
                            path, line_no)
        out[key] = (parts[1], line_no)
    return out


def read_qrels(path) -> list[tuple[str, str, int, int]]:
    """[(qid, docid, grade, line number)] from TREC qrels lines `qid iter docid grade`; a file
    without any judgement is an error (it would make an empty pairs table)."""
    path = str(path)
    rows, seen = [], {}
    for line_no, line in text_lines(path):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 4:
            raise DataError(f"{path}: line {line_no}: expected 'qid Q0 docid grade', got {line.strip()[:80]!r}",
                            path, line_no)
        qid, _, docid, grade = fields
        try:
            grade = int(grade)
        except ValueError:
            raise DataError(f"{path}: line {line_no}: grade {grade!r} is not an integer", path, line_no) from None
        if (qid, docid) in seen:
            raise DataError(f"{path}: line {line_no}: duplicate judgement ({qid}, {docid}), first at line "
                            f"{seen[qid, docid]}", path, line_no)
        seen[qid, docid] = line_no
        rows.append((qid, docid, grade, line_no))
    if not rows:
        raise DataError(f"{path}: no judgements (expected lines 'qid Q0 docid grade')", path)
    return rows


def load_trec(qrels_path, corpus_path, queries_path, grade_map: dict[int, int]) -> pa.Table:
    """Pairs table (PAIRS_SCHEMA, qrels order) from TREC qrels + corpus.tsv + queries.tsv.

    grade_map maps every source grade found in the qrels to 0-4 (required; a grade without an entry
    is an error naming the qrels file, line and grade)."""
    gmap = check_grade_map(grade_map)
    corpus, queries = read_id_text_tsv(corpus_path), read_id_text_tsv(queries_path)
    cols = {name: [] for name in PAIR_COLUMNS}
    for qid, docid, grade, line_no in read_qrels(qrels_path):
        where = f"{qrels_path}: line {line_no}"
        if grade not in gmap:
            raise DataError(f"{where}: grade {grade} has no entry in grade_map {gmap}", str(qrels_path), line_no)
        if qid not in queries:
            raise DataError(f"{where}: query id {qid!r} not found in {queries_path}", str(qrels_path), line_no)
        if docid not in corpus:
            raise DataError(f"{where}: doc id {docid!r} not found in {corpus_path}", str(qrels_path), line_no)
        for text, src_line, src in ((queries[qid][0], queries[qid][1], queries_path),
                                    (corpus[docid][0], corpus[docid][1], corpus_path)):
            if not text.strip():
                raise DataError(f"{src}: line {src_line}: empty text (judged at {where})", str(src), src_line)
        for name, v in zip(PAIR_COLUMNS, (qid, docid, queries[qid][0], corpus[docid][0], gmap[grade])):
            cols[name].append(v)
    table = pa.table(cols, schema=PAIRS_SCHEMA)
    validate_pairs(table, qrels_path)
    return table


def parse_grade_map(text: str) -> dict[int, int]:
    """"0:0,1:2,2:4" -> {0: 0, 1: 2, 2: 4}."""
    out = {}
    for item in text.split(","):
        src, sep, dst = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(src)] = int(dst)
        except ValueError:
            raise argparse.ArgumentTypeError(f"grade map entry {item!r} is not SRC:DST with integers") from None
    return out
