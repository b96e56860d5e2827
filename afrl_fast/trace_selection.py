"""Which sampled traces a generator keeps: the verifier's reasons to reject a sample, the judge's score,
and the choice of the best kept sample. Pure functions, shared by the synthetic-trace generator
(afrl_fast.synthesize) and distillation (afrl_fast.distill), and checked by the tests against the
verifier's fields.
"""
from __future__ import annotations

import re

from .verify import verify_batch

# Why a sample is rejected, in the order they are checked (the first that applies is recorded).
REASONS = ("request_refused", "truncated", "aborted", "format", "inconsistent", "rules_imply_other_grade",
           "final_not_label")


# the endpoint's fault, not the pair's: such a pair without a verified trace is asked again on --resume
RETRY_REASONS = ("request_refused", "aborted")


def rejection_reasons(texts: list[str], finish_reasons: list[str], label: int, rulebook) -> list[str | None]:
    """None for a kept sample, else the first failed check of REASONS."""
    if not texts:
        return []
    res = verify_batch(texts, [label] * len(texts), rulebook)
    out = []
    for j, finish in enumerate(finish_reasons):
        if finish == "length":
            out.append("truncated")
        elif finish != "stop":            # abort, content_filter, ...: the server did not finish it
            out.append("aborted")
        elif not res.fmt[j]:
            out.append("format")
        elif not res.cst[j]:
            out.append("inconsistent")
        elif res.y_hat[j] != label:
            out.append("rules_imply_other_grade")
        elif res.y_final[j] != label:
            out.append("final_not_label")
        else:
            out.append(None)
    return out


def choose(texts: list[str], kept: list[int], scores: dict[int, float | None]) -> int | None:
    """The best kept sample: highest judge score (unscored last), then shortest, then lowest index."""
    if not kept:
        return None
    return min(kept, key=lambda j: (-scores[j] if scores.get(j) is not None else float("inf"), len(texts[j]), j))


_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_judge_score(reply: str) -> float | None:
    """The judge's 0–10 score: the last "Score: x" in the reply, or a reply that is only a number."""
    hits = _SCORE.findall(reply or "")
    text = hits[-1] if hits else (reply or "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0.0 <= value <= 10.0 else None


def trace_columns(text: str, rulebook) -> dict:
    """The step columns, rule and tail of a kept trace (what the synthetic generator writes)."""
    res = verify_batch([text], [-1], rulebook)
    values = {step.key: res.value_strings(j)[0] for j, step in enumerate(rulebook.critical)}
    rule = rulebook.first_rule(values)
    return {"rule": rule.name, "tail": rule.tail, **values}
