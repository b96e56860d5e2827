r"""The rule-grounded synthetic generator of pair tables.

Synthetic tables add the ground truth the generator used:

    rule string        the rulebook rule whose condition produced the label (first match)
    tail bool          whether that rule is a long-tail rule
    intent … coverage  the step 4-8 values (the rulebook's critical-step keys), strings
    trace string       the full AFRL response (afrl_fast.format.render_trace) = the SFT target

The generator is built for a TINY model trained on CPU for minutes: every step 4-8 value has a
short, explicit cue sentence in the document (CUES, a few paraphrases each), so the values can be
read off the text, copied into the trace, and the grade follows from the rulebook's decision list.
"""
from __future__ import annotations

import itertools
import re
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .format import render_trace
from .pairs import DEFAULT_STEP_KEYS, DataError, synthetic_schema
from .rulebook import LABELS, Rulebook, load_rulebook

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
