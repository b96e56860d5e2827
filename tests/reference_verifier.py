r"""Plain-Python reference of the AFRL verifier: the oracle for afrl_fast.verify's numba pass.

It shares no parsing code with afrl_fast.verify: the whole response grammar of afrl_fast.format is
one anchored regular expression over the Python str (so offsets are character offsets for free),
the vocabulary check is a membership test, and ŷ comes from Rulebook.expected_label (the rule
objects, not the compiled bitmask tables).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from afrl_fast.rulebook import CRITICAL_STEPS, Rulebook

NO_SPAN = (-1, -1)


@dataclass
class ReferenceResult:
    fmt: bool
    cst: bool
    logic: bool
    y_dec: int
    y_final: int
    y_hat: int
    values: tuple          # five vocabulary indices (-1 when absent)
    reward: float
    spans: tuple           # seven (start, end) character spans


def response_pattern(rulebook: Rulebook) -> re.Pattern:
    """DEC \n STEP_1 \n … STEP_9 \n FINAL TRAIL as one regex; groups v1..v9 hold the boxed values."""
    parts = [r"(?P<dec>[0-4])\n"]
    for step in rulebook.steps:
        # TEXT: no newline or brace; VALUE: at least one such character (step 9: one grade digit);
        # the box ends the line
        value = "[0-4]" if step.number == 9 else "[^\n{}]+"
        parts.append(rf"Step {step.number} \({re.escape(step.name)}\): [^\n{{}}]*"
                     rf"\\boxed\{{(?P<v{step.number}>{value})\}}\n")
    parts.append(r"Final: \\boxed\{(?P<final>[0-4])\}[ \t\r\n]*")
    return re.compile("".join(parts))


def reward_of(y_dec, y_final, y_hat, y_gt, gate, alpha, beta, gamma, format_penalty, y_verdict=None):
    """(I_cst, I_logic, R) for a response whose format passed (Eq. 6 with the ordering rule of
    RewardConfig: the paper's 1 / 0 under the literal gate; under "pred" a failed gate earns the
    midpoint of the format penalty and the reward of an answer four grades off)."""
    cst = y_dec == y_final and (y_verdict is None or y_verdict == y_final)
    if y_gt == -1:
        logic = False
    elif gate == "pred":
        logic = y_hat == y_dec
    else:
        logic = y_hat == y_dec and y_hat == y_gt
    if not (cst and logic):
        if gate == "literal":
            return cst, logic, 0.0
        four_off = alpha - alpha * gamma * 4      # grades 0 and 4 are four apart
        return cst, logic, (format_penalty + four_off) / 2
    distance = abs(y_dec - y_gt)
    if distance == 0:
        return cst, logic, alpha + beta           # R_res = R_cot = 1
    return cst, logic, alpha - alpha * gamma * distance  # R_cot only for the correct answer


def verify_one(text, y_gt: int, rulebook: Rulebook, pattern: re.Pattern, gate="literal", alpha=0.72,
               beta=0.28, gamma=0.5, format_penalty=-1.0) -> ReferenceResult:
    y_dec = int(text[0]) if isinstance(text, str) and text[:1] in ("0", "1", "2", "3", "4") else -1
    dec_span = (0, 1) if y_dec >= 0 else NO_SPAN
    failed = ReferenceResult(False, False, False, y_dec, -1, -1, (-1,) * 5, format_penalty,
                             (dec_span,) + (NO_SPAN,) * 6)
    if y_dec < 0:
        return failed
    m = pattern.fullmatch(text)
    if m is None:
        return failed
    values, spans = {}, [dec_span]
    for step in rulebook.critical:
        group = f"v{step.number}"
        if m.group(group) not in step.values:
            return failed
        values[step.key] = m.group(group)
        spans.append(m.span(group))
    spans.append(m.span("final"))
    y_final = int(m.group("final"))
    y_hat = rulebook.expected_label(values)
    cst, logic, reward = reward_of(y_dec, y_final, y_hat, y_gt, gate, alpha, beta, gamma, format_penalty,
                                   y_verdict=int(m.group("v9")))
    indices = tuple(step.values.index(values[step.key]) for step in rulebook.critical)
    return ReferenceResult(True, cst, logic, y_dec, y_final, y_hat, indices, reward, tuple(spans))


def verify_all(texts, labels, rulebook: Rulebook, **config) -> list[ReferenceResult]:
    pattern = response_pattern(rulebook)
    return [verify_one(t, int(y), rulebook, pattern, **config) for t, y in zip(texts, labels)]


assert CRITICAL_STEPS == (4, 5, 6, 7, 8), "the reference names its groups after steps 4-8"
