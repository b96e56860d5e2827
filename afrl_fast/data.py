r"""The data stage: the pair schema every stage reads, a rule-grounded synthetic generator, and a
loader for TREC-style graded relevance data.

Pair tables (Parquet, written atomically):

    query_id string, doc_id string, query string, document string, label int8 (0-4)

Synthetic tables add the ground truth the generator used:

    rule string        the rulebook rule whose condition produced the label (first match)
    tail bool          whether that rule is a long-tail rule
    intent … coverage  the step 4-8 values (the rulebook's critical-step keys), strings
    trace string       the full AFRL response (afrl_fast.format.render_trace) = the SFT target

The generator is built for a TINY model trained on CPU for minutes: every step 4-8 value has a
short, explicit cue sentence in the document (CUES, a few paraphrases each), so the values can be
read off the text, copied into the trace, and the grade follows from the rulebook's decision list.

CLI:
    python -m afrl_fast.data synth --n 1200 --seed 0 --out data/synth
    python -m afrl_fast.data trec --qrels Q --corpus C --queries Q --grade-map 0:0,1:2,2:4 --out F.parquet
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .files import atomic_write_bytes, atomic_write_many, check_output_path
from .format import render_trace
from .rulebook import LABELS, Rulebook, RulebookError, load_rulebook

# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------

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
SPLITS = ("train", "industry", "longtail")


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


def _bad_value(path, row, column, problem):
    raise DataError(f"{path}: row {row}, column {column!r}: {problem}", path, row, column)


# ----------------------------------------------------------------------------------------------
# Validation (vectorized: a few pyarrow.compute passes, fine at 10^6 rows)
# ----------------------------------------------------------------------------------------------

def _first_true(mask) -> int | None:
    """Index of the first true entry of a boolean (chunked) array; nulls count as false."""
    idx = pc.index(pc.fill_null(mask, False), True).as_py()
    return None if idx is None or idx < 0 else idx


def _is_string_type(t) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _first_non_null(col) -> int:
    return _first_true(pc.is_valid(col)) or 0


def _check_type(table, path, name, expected):
    col = table.column(name)
    t = col.type
    if pa.types.is_null(t) and len(col):
        _bad_value(path, 0, name, "null")
    ok = {"string": _is_string_type, "int": pa.types.is_integer, "bool": pa.types.is_boolean}[expected](t)
    if not ok:
        row = _first_non_null(col)
        shown = col[row].as_py() if len(col) else None
        _bad_value(path, row, name, f"expected {expected} type, column has type {t} (value {shown!r})")


def _check_non_empty_text(table, path, name):
    col = table.column(name)
    row = _first_true(pc.is_null(col))
    if row is not None:
        _bad_value(path, row, name, "null")
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0)
    row = _first_true(blank)
    if row is not None:
        _bad_value(path, row, name, f"empty or whitespace-only text {col[row].as_py()!r}")


def _check_labels(table, path):
    col = table.column("label")
    row = _first_true(pc.is_null(col))
    if row is not None:
        _bad_value(path, row, "label", "null grade")
    outside = pc.or_(pc.less(col, min(LABELS)), pc.greater(col, max(LABELS)))
    row = _first_true(outside)
    if row is not None:
        _bad_value(path, row, "label", f"grade {col[row].as_py()} outside {min(LABELS)}-{max(LABELS)}")


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
        _bad_value(path, row, "doc_id",
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


def read_pairs(path, require_trace: bool = False) -> pa.Table:
    """Read and validate a pairs (or synthetic) Parquet file; label comes back as int8."""
    path = str(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found", path) from None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}", path) from None
    validate_pairs(table, path, require_trace=require_trace)
    return _normalize(table)


def write_table(table: pa.Table, path) -> Path:
    """Write Parquet atomically (afrl_fast.files.atomic_write_bytes): a reader never sees a
    half-written file and a crash leaves the old file intact."""
    path = Path(path)
    atomic_write_bytes(path, lambda f: pq.write_table(table, f))
    return path


# ----------------------------------------------------------------------------------------------
# Synthetic generator: pools, cue sentences, reasons
# ----------------------------------------------------------------------------------------------

BRANDS = ("Zentra", "Orvio", "Kalix", "Brava", "Lumen", "Tessel", "Corvo", "Nimbo")
KINDS = {  # kind (singular, used in "a rival {kind}") -> (broad category, model names)
    "phone": ("phones", ("Z5", "Z7", "Note 4", "Mini 2")),
    "laptop": ("laptops", ("Air 13", "Pro 15", "Flex 3", "Book 2")),
    "camera": ("cameras", ("X100", "R8", "M50", "Snap 6")),
    "smartwatch": ("smartwatches", ("Fit 2", "Run 5", "Pulse", "Halo 3")),
    "tablet": ("tablets", ("Tab 8", "Slate 10", "Pad Go", "Tab S")),
}
ASPECTS = ("battery life", "price", "release date", "user manual", "warranty terms",
           "repair options", "software updates", "screen quality")
UNRELATED_TOPICS = ("sourdough baking", "tax filing deadlines", "marathon training", "houseplant care",
                    "chess openings", "bird migration", "knitting patterns", "city parking rules")
OUTDATED_YEARS = tuple(range(2005, 2013))
QUERY_TEMPLATES = ("{entity} {aspect}", "{aspect} of the {entity}", "{entity} {kind} {aspect}")
# An optional time need: surface variety only; the timeliness value is read from the document.
TIME_NEED_TEMPLATES = ("latest {entity} {aspect}", "{entity} {aspect} news this year")
TIME_NEED_RATE = 0.2

# The cue table: for each step 4-8 value, 3 paraphrased sentence templates. Literal text is the cue;
# placeholders ({aspect}, {entity}, …) carry the content. Within a step the literal parts of
# different values never overlap, so exactly one value's pattern matches a generated document
# (cue_patterns() below; the tests check this for every row).
CUES = {
    "intent": {
        "full": ("This page covers exactly the {aspect}.", "Everything here is about the {aspect}.",
                 "It answers the question on the {aspect}."),
        "partial": ("This page deals instead with the {aspect}.", "Its focus is a different aspect: the {aspect}.",
                    "It mostly discusses the {aspect} instead."),
        "weak": ("This page only talks about {category} in general.", "It gives broad notes on {category} as a whole.",
                 "General background on {category}, nothing specific."),
        "none": ("This page is about {topic}, an unrelated subject.", "Off-topic text on {topic}.",
                 "It discusses {topic} and nothing else."),
    },
    "entity": {
        "consistent": ("It names the {entity} directly.", "The exact product here is the {entity}.",
                       "Written for the {entity} itself."),
        "partial": ("It names the {entity}, a sibling model from the same brand.",
                    "The product here is the {entity}, another model by {brand}.",
                    "Written for the {entity}, a related model."),
        "missing": ("No product name is given.", "The model is never named.", "It does not say which product it is."),
        "conflict": ("It names the {entity}, a rival {kind} from another brand.",
                     "The product here is the {entity}, a competing {kind}.",
                     "Written for the {entity}, a different {kind} altogether."),
    },
    "time": {
        "current": ("Updated this month.", "Last revised this week.", "Fresh information as of this month."),
        "neutral": ("No date is shown.", "The page carries no date.", "Publication date unknown."),
        "outdated": ("Archived {year} page.", "Last updated in {year}.", "An old copy saved in {year}."),
    },
    "source": {
        "high": ("Source: official documentation.", "From the maker's official support site.", "Official manual text."),
        "medium": ("Source: a personal blog.", "Written on a hobbyist blog.", "From a fan's personal blog."),
        "low": ("Source: an anonymous forum post.", "Copied from an unverified forum thread.",
                "An anonymous user posted this."),
        "spam": ("WIN A FREE PRIZE click now!", "CLICK HERE for cheap deals now!", "Free gift card, click now!"),
    },
    "coverage": {
        "complete": ("A detailed guide covering {subject} step by step.", "In-depth coverage of {subject} with full details.",
                     "A complete walkthrough of {subject}."),
        "partial": ("A short overview of {subject}.", "A brief summary of {subject}.", "Some notes on {subject}, not exhaustive."),
        "minimal": ("A one-line mention of {subject}.", "Only a passing remark on {subject}.", "Barely mentions {subject}."),
    },
}
# One reason sentence per value, written before the step's box in the trace.
REASONS = {
    "intent": {"full": "The document covers the {q_aspect} the query asks for.",
               "partial": "The document covers the {d_aspect}, not the {q_aspect}.",
               "weak": "The document only discusses {category} in general.",
               "none": "The document is about {topic}, not the query."},
    "entity": {"consistent": "Both name the {q_entity}.",
               "partial": "The document names the {d_entity}, a sibling of the {q_entity}.",
               "missing": "The document names no product.",
               "conflict": "The document names the {d_entity} instead of the {q_entity}."},
    "time": {"current": "The page was updated this month.", "neutral": "The page shows no date.",
             "outdated": "The page dates from {year}."},
    "source": {"high": "It comes from official documentation.", "medium": "It comes from a personal blog.",
               "low": "It comes from an anonymous forum post.", "spam": "It is spam."},
    "coverage": {"complete": "It treats {subject} in detail.", "partial": "It gives a short overview of {subject}.",
                 "minimal": "It only mentions {subject} once."},
}
PLACEHOLDER_RE = r"[A-Za-z0-9' -]+?"   # every pool value above uses only these characters
# Paper Table 1 label ratios (%), printed next to the synthetic splits for comparison.
PAPER_TABLE1 = {"industry": (21.09, 32.62, 38.76, 6.86, 0.67), "longtail": (24.84, 28.27, 45.48, 1.39, 0.02)}


def cue_patterns() -> dict[str, dict[str, re.Pattern]]:
    """{key: {value: regex}} matching any paraphrase of that value's cue sentence."""
    out = {}
    for key, per_value in CUES.items():
        out[key] = {}
        for value, templates in per_value.items():
            alts = [re.sub(r"\\\{\w+\\\}", PLACEHOLDER_RE, re.escape(t)) for t in templates]
            out[key][value] = re.compile("|".join(f"(?:{a})" for a in alts))
    return out


def check_cue_coverage(rulebook: Rulebook) -> None:
    """The generator writes texts only for step values it has cues for; say which one is missing."""
    for step in rulebook.critical:
        if step.key not in CUES:
            raise DataError(f"{rulebook.path}: step key {step.key!r} has no cue sentences in afrl_fast.data.CUES "
                            f"(known keys: {sorted(CUES)}); the synthetic generator cannot write its texts")
        for v in step.values:
            if v not in CUES[step.key]:
                raise DataError(f"{rulebook.path}: value {v!r} of step {step.key!r} has no cue sentences in "
                                f"afrl_fast.data.CUES (known: {sorted(CUES[step.key])})")


# ----------------------------------------------------------------------------------------------
# Synthetic generator: rules, splits, sampling
# ----------------------------------------------------------------------------------------------

def rule_combos(rulebook: Rulebook) -> list[np.ndarray]:
    """Per rule, the value-index combos [m, 5] for which it is the FIRST matching rule.

    The vocabularies are tiny (4·4·3·4·3 = 576 combos by default), so enumerating them once replaces
    rejection sampling: a uniform draw from a rule's combos is exactly a rejection-sampled draw of
    uniform values conditioned on "this rule fires". Rules shadowed by earlier ones get no combos."""
    critical = rulebook.critical
    groups: list[list[tuple]] = [[] for _ in rulebook.rules]
    for idx in itertools.product(*(range(len(s.values)) for s in critical)):
        values = {s.key: s.values[i] for s, i in zip(critical, idx)}
        r = next(i for i, rule in enumerate(rulebook.rules) if rule.matches(values))
        groups[r].append(idx)
    return [np.array(g, dtype=np.int64).reshape(-1, len(critical)) for g in groups]


def natural_tail_share(rulebook: Rulebook, combos) -> float:
    """Fraction of head traffic (by rule freq) that long-tail rules make up."""
    freq = np.array([r.freq if len(c) else 0.0 for r, c in zip(rulebook.rules, combos)])
    tail = np.array([r.tail for r in rulebook.rules])
    total = freq.sum()
    return float(freq[tail].sum() / total) if total > 0 else 0.0


def split_tail_share(split: str, natural: float) -> float:
    """Target share of tail rules: train at natural rarity, industry half of it (standardized head
    traffic), longtail 70% (cold-start queries, paper §4.1); other split names natural."""
    return {"industry": natural / 2, "longtail": 0.7}.get(split, natural)


def rule_probabilities(rulebook: Rulebook, combos, tail_share: float) -> np.ndarray:
    """P(rule): freq-proportional within head and within tail rules, tail rules summing to tail_share.
    Unsatisfiable (fully shadowed) rules get 0."""
    freq = np.array([r.freq if len(c) else 0.0 for r, c in zip(rulebook.rules, combos)])
    tail = np.array([r.tail for r in rulebook.rules])
    head_sum, tail_sum = freq[~tail].sum(), freq[tail].sum()
    if head_sum == 0 and tail_sum == 0:
        raise DataError(f"{rulebook.path}: no satisfiable rule has freq > 0; nothing to synthesize")
    if head_sum == 0 or tail_sum == 0:      # one group only: its own proportions
        return freq / freq.sum()
    share = min(max(tail_share, 0.0), 1.0)
    return np.where(tail, freq * share / tail_sum, freq * (1 - share) / head_sum)


def split_stream(seed: int, split: str) -> np.random.Generator:
    """An independent numpy stream per (seed, split): the split name is hashed (stable crc32)
    into the seed sequence, so adding or resizing one split never shifts another."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode())])


def query_sizes(rng: np.random.Generator, n: int, low: int = 3, high: int = 6) -> list[int]:
    """Documents per query, each in [low, high], summing to n (the last query takes the rest;
    no query is left with fewer than `low` unless n itself is smaller)."""
    sizes, left = [], n
    while left > 0:
        k = int(rng.integers(low, high + 1))
        if left <= high:
            k = left
        elif left - k < low:
            k = left - low
        sizes.append(k)
        left -= k
    return sizes


def draw_rules(rng, probs, labels, k: int, tries: int = 100) -> np.ndarray:
    """k rule indices for one query, redrawn until at least two grades differ (so Pair-ACC and
    NDCG@3 are defined per query); gives up after `tries` when the rules allow only one grade."""
    for _ in range(tries):
        rules = rng.choice(len(probs), size=k, p=probs)
        if k < 2 or len(set(labels[rules].tolist())) >= 2:
            break
    return rules


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def make_query(rng) -> dict:
    """A query: an entity (brand, model, kind) and an aspect, optionally with a time need."""
    kind = _pick(rng, tuple(KINDS))
    category, models = KINDS[kind]
    q = {"brand": _pick(rng, BRANDS), "model": _pick(rng, models), "kind": kind, "category": category,
         "aspect": _pick(rng, ASPECTS)}
    q["entity"] = f"{q['brand']} {q['model']}"
    templates = TIME_NEED_TEMPLATES if rng.random() < TIME_NEED_RATE else QUERY_TEMPLATES
    q["text"] = _pick(rng, templates).format(entity=q["entity"], aspect=q["aspect"], kind=kind)
    return q


def doc_entity(rng, q: dict, value: str) -> tuple[str, str]:
    """(entity named by the document or "", its brand) for entity value consistent/partial/missing/conflict."""
    models = KINDS[q["kind"]][1]
    if value == "consistent":
        return q["entity"], q["brand"]
    if value == "partial":            # same brand, another model of the same kind
        return f"{q['brand']} {_pick(rng, [m for m in models if m != q['model']])}", q["brand"]
    if value == "conflict":           # a different brand's product of the same kind
        brand = _pick(rng, [b for b in BRANDS if b != q["brand"]])
        return f"{brand} {_pick(rng, models)}", brand
    return "", ""


def doc_subject(rng, q: dict, intent: str) -> tuple[str, str]:
    """(document aspect or "", topic phrase) for intent full/partial/weak/none."""
    if intent == "full":
        return q["aspect"], q["aspect"]
    if intent == "partial":
        a = _pick(rng, [x for x in ASPECTS if x != q["aspect"]])
        return a, a
    if intent == "weak":
        return "", q["category"]
    return "", _pick(rng, UNRELATED_TOPICS)


def make_document(rng, q: dict, values: dict) -> tuple[str, dict]:
    """Document text (one cue sentence per step 4-8 value, order shuffled so the model must read
    rather than count positions) and the fields the trace reasons are filled from."""
    d_aspect, subject = doc_subject(rng, q, values["intent"])
    d_entity, d_brand = doc_entity(rng, q, values["entity"])
    fields = {"aspect": d_aspect, "category": q["category"], "topic": subject, "subject": subject,
              "entity": d_entity, "brand": d_brand, "kind": q["kind"], "year": _pick(rng, OUTDATED_YEARS)}
    sentences = [_pick(rng, CUES[key][values[key]]).format(**fields) for key in DEFAULT_STEP_KEYS]
    order = rng.permutation(len(sentences))
    text = " ".join(sentences[i] for i in order)
    fields.update(q_aspect=q["aspect"], q_entity=q["entity"], d_aspect=d_aspect, d_entity=d_entity)
    return text, fields


def make_trace(rulebook: Rulebook, rule_index: int, values: dict, fields: dict, reasons: bool = True) -> str:
    """The SFT target: grade first, then the nine steps with templated reasons and boxes.
    reasons=False writes the boxes alone (a trace half as long: what a CPU demo can afford)."""
    rule = rulebook.rules[rule_index]
    free = {1: f"{fields['q_aspect']} of {fields['q_entity']}", 2: fields["subject"],
            3: fields["d_entity"] or "none"}
    if not reasons:
        return render_trace(rulebook, rule.label, values, free=free)
    reasons = {1: f"The user wants the {fields['q_aspect']} of the {fields['q_entity']}.",
               2: f"The document is about {fields['subject']}.",
               3: f"The query names the {fields['q_entity']}.",
               9: f"Rule {rule_index + 1} ({rule.name}) is the first that matches, so the grade is {rule.label}."}
    for step in rulebook.critical:
        reasons[step.number] = REASONS[step.key][values[step.key]].format(**fields)
    return render_trace(rulebook, rule.label, values, free=free, reasons=reasons)


def synthesize(n: int, seed: int, rulebook: Rulebook | str | Path | None = None, split: str = "train",
               tail_share: float | None = None, progress: bool = False, reasons: bool = True) -> pa.Table:
    """n synthetic rows (SYNTHETIC_SCHEMA) of split `split`, deterministic in (seed, split).

    Each query gets 3-6 documents with at least two different grades. Each document draws a rule
    (P from rule_probabilities with the split's tail share, or `tail_share` if given), then uniform
    step 4-8 values among the combos for which that rule is the first match; label = the rule's."""
    check_synth_size("synthesize: n", n)
    check_synth_seed("synthesize: seed", seed)
    rb = rulebook if isinstance(rulebook, Rulebook) else load_rulebook(rulebook)
    check_cue_coverage(rb)
    combos = rule_combos(rb)
    share = split_tail_share(split, natural_tail_share(rb, combos)) if tail_share is None else tail_share
    probs = rule_probabilities(rb, combos, share)
    labels = np.array([r.label for r in rb.rules])
    rng = split_stream(seed, split)
    cols = {name: [] for name in synthetic_schema(rb.keys).names}
    sizes = query_sizes(rng, n)
    bar = _progress(len(sizes), f"synth {split}", progress)
    for qi, k in enumerate(sizes):
        q = make_query(rng)
        qid = f"{split}-q{qi:06d}"
        for di, r in enumerate(draw_rules(rng, probs, labels, k)):
            row = _make_row(rng, rb, combos, int(r), q, reasons)
            row.update(query_id=qid, doc_id=f"{qid}-d{di}", query=q["text"])
            for name in cols:
                cols[name].append(row[name])
        bar.update(1)
    bar.close()
    return pa.table(cols, schema=synthetic_schema(rb.keys))


def _make_row(rng, rb: Rulebook, combos, r: int, q: dict, reasons: bool = True) -> dict:
    combo = combos[r][int(rng.integers(len(combos[r])))]
    values = {s.key: s.values[i] for s, i in zip(rb.critical, combo)}
    rule = rb.rules[r]
    if rb.expected_label(values) != rule.label:   # the combo tables guarantee it; keep them honest
        raise RuntimeError(f"values {values} give {rb.expected_label(values)}, rule {rule.name} says {rule.label}")
    document, fields = make_document(rng, q, values)
    return {"document": document, "label": rule.label, "rule": rule.name, "tail": rule.tail, **values,
            "trace": make_trace(rb, r, values, fields, reasons)}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="query", disable=not enabled, file=sys.stderr)


def label_distribution(table: pa.Table) -> np.ndarray:
    """Counts of grades 0-4."""
    return np.bincount(table.column("label").to_numpy().astype(np.int64), minlength=len(LABELS))


def synth_summary(tables: dict[str, pa.Table], rulebook: Rulebook) -> str:
    """Label distribution per split (with the paper's Table 1 ratios where it has them), tail share,
    and per-rule row counts (rules that never fire are flagged)."""
    def row(name, rows, queries, tail, pcts):
        return f"{name:<10}{rows:>7}{queries:>9}{tail:>7}  " + "".join(f"{p:>7}" for p in pcts)

    lines = [row("split", "rows", "queries", "tail%", [f"{k}%" for k in LABELS])]
    for split, t in tables.items():
        pct = 100 * label_distribution(t) / max(len(t), 1)
        tail = 100 * pc.sum(t.column("tail")).as_py() / max(len(t), 1)
        nq = len(pc.unique(t.column("query_id")))
        lines.append(row(split, len(t), nq, f"{tail:.1f}", [f"{p:.1f}" for p in pct]))
        if split in PAPER_TABLE1:
            lines.append(row("  paper", "", "", "", [f"{p:.1f}" for p in PAPER_TABLE1[split]]))
    combos = rule_combos(rulebook)
    per_split = {s: Counter(t.column("rule").to_pylist()) for s, t in tables.items()}
    lines += ["", "rule                      label tail  " + "".join(f"{s:>10}" for s in tables)]
    for rule, c in zip(rulebook.rules, combos):
        note = "" if len(c) else "  (unsatisfiable: shadowed by earlier rules)"
        if len(c) and not any(per_split[s][rule.name] for s in tables):
            note = "  (never drawn)"
        lines.append(f"{rule.name:<26}{rule.label:>5} {'yes' if rule.tail else 'no':>4}  "
                     + "".join(f"{per_split[s][rule.name]:>10}" for s in tables) + note)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# TREC-style graded data
# ----------------------------------------------------------------------------------------------

def _check_grade_map(grade_map) -> dict[int, int]:
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
    gmap = _check_grade_map(grade_map)
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


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m afrl_fast.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write DIR/train.parquet, DIR/industry.parquet, DIR/longtail.parquet")
    s.add_argument("--n", type=int, required=True, help="rows of the train split")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--rulebook", default=None, help="rulebook YAML (default: configs/rulebook/default.yaml)")
    s.add_argument("--n-industry", type=int, default=None, help="rows of the industry split (default N/4)")
    s.add_argument("--n-longtail", type=int, default=None, help="rows of the longtail split (default N/4)")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--no-reasons", action="store_true", help="box the step values without reason sentences")
    t = sub.add_parser("trec", help="convert TREC qrels + corpus.tsv + queries.tsv into a pairs Parquet file")
    t.add_argument("--qrels", required=True)
    t.add_argument("--corpus", required=True)
    t.add_argument("--queries", required=True)
    t.add_argument("--grade-map", required=True, type=parse_grade_map, help="SRC:DST,… e.g. 0:0,1:2,2:4")
    t.add_argument("--out", required=True)
    return p


MAX_SYNTH_ROWS = 1_000_000     # per split: ~1 GB of traces in memory; more is a typo, not a data set


def check_synth_size(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"{name} must be >= 1, got {n!r}")
    if n > MAX_SYNTH_ROWS:
        raise DataError(f"{name} must be <= {MAX_SYNTH_ROWS:,} rows per split, got {n:,} (use several seeds "
                        "for more)")


def check_synth_seed(name: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"{name} must be an integer >= 0, got {seed!r}")


def synth_sizes(n_train: int, n_industry: int | None = None, n_longtail: int | None = None,
                names=("n_train", "n_industry", "n_longtail")) -> dict[str, int]:
    """Rows per split, each checked (eval splits default to n_train/4)."""
    check_synth_size(names[0], n_train)
    default_eval = max(1, n_train // 4)
    sizes = {"train": n_train,
             "industry": default_eval if n_industry is None else n_industry,
             "longtail": default_eval if n_longtail is None else n_longtail}
    for name, n in zip(names, sizes.values()):
        check_synth_size(name, n)
    return sizes


RL_POOL = "rl_pool"
LABELS_ONLY_COLUMNS = PAIR_COLUMNS + ("rule", "tail")   # what a labels-only pool keeps: no trace, no steps


def synthetic_splits(n_train: int, seed: int, rulebook=None, n_industry: int | None = None,
                     n_longtail: int | None = None, progress: bool = False, reasons: bool = True,
                     train_tail_share: float | None = None, n_rl_pool: int = 0,
                     rl_pool_tail_share: float | None = None) -> dict[str, pa.Table]:
    """Synthesize train/industry/longtail in memory (eval splits default to n_train/4), every size
    and share checked first.

    The paper's split of roles (§3.3-3.5): SFT learns from a limited set of expert traces, RL from a
    larger labelled pool it never saw. `n_rl_pool` > 0 adds `rl_pool`: labels only (the trace and
    step columns dropped), its own random stream and query ids (`rl_pool-q...`, disjoint from
    `train-q...`). The tail shares set how common long-tail rules are in the SFT set (`train`) and the
    pool (None = the split's default: natural rarity)."""
    sizes = synth_sizes(n_train, n_industry, n_longtail)
    if n_rl_pool:
        check_synth_size("n_rl_pool", n_rl_pool)
        sizes[RL_POOL] = n_rl_pool
    for name, share in (("train_tail_share", train_tail_share), ("rl_pool_tail_share", rl_pool_tail_share)):
        if share is not None and not 0.0 <= share <= 1.0:
            raise DataError(f"{name} must lie in [0, 1], got {share!r}")
    check_synth_seed("seed", seed)
    rb = rulebook if isinstance(rulebook, Rulebook) else load_rulebook(rulebook)
    shares = {"train": train_tail_share, RL_POOL: rl_pool_tail_share}
    tables = {split: synthesize(n, seed, rb, split, tail_share=shares.get(split), progress=progress, reasons=reasons)
              for split, n in sizes.items()}
    if RL_POOL in tables:
        tables[RL_POOL] = tables[RL_POOL].select(list(LABELS_ONLY_COLUMNS))
    return tables


def write_splits(out, tables: dict[str, pa.Table]) -> None:
    """out/{split}.parquet for every table, landing together (all or none); an RL pool left by an
    earlier call without one is removed."""
    atomic_write_many({Path(out) / f"{split}.parquet": (lambda f, t=table: pq.write_table(t, f))
                       for split, table in tables.items()})
    if RL_POOL not in tables:
        (Path(out) / f"{RL_POOL}.parquet").unlink(missing_ok=True)


def write_synthetic_splits(out, n_train: int, seed: int, rulebook=None, **kw) -> dict[str, pa.Table]:
    """synthetic_splits written to out/{split}.parquet; returns the tables. Everything is checked and
    generated before the first byte is written."""
    tables = synthetic_splits(n_train, seed, rulebook, **kw)
    write_splits(out, tables)
    return tables


def configured_splits(data_cfg, rulebook) -> dict[str, pa.Table]:
    """The synthetic splits a run config's `data` section asks for (train and the two evaluation
    splits of n_eval rows, the RL pool when n_rl_pool > 0), in memory. The trainer and the
    experiments runner both build their data with this."""
    d = data_cfg
    return synthetic_splits(d.n_train, d.seed, rulebook, n_industry=d.n_eval, n_longtail=d.n_eval, reasons=d.reasons,
                            train_tail_share=d.train_tail_share, n_rl_pool=d.n_rl_pool,
                            rl_pool_tail_share=d.rl_pool_tail_share)


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
