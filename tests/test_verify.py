"""The compiled verifier against the plain-Python reference, the reward formula, spans, token
weights with the real Qwen3 tokenizer, Arrow inputs and the CLI."""
from __future__ import annotations

import itertools
import random
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from afrl_fast.format import load_tokenizer, render_trace
from afrl_fast.rulebook import load_rulebook, parse_rulebook
from afrl_fast.token_spans import response_token_offsets, token_weights
from afrl_fast.verify.__main__ import main
from afrl_fast.verify import RESULT_COLUMNS, RewardConfig, verify_batch
from reference_verifier import response_pattern, verify_all, verify_one

RB = load_rulebook()
FREE_TEXT = ["", "short", "the query asks for 北京 weather", "emoji 😀🎉 here", "e\u0301combining",
             "backslash \\ inside", "tab\tand (parens): Step 3", "日本語のテキスト", "ok \\boxed"]
NOISE_ALPHABET = "abc XYZ0123456789{}\\\n\r\t():Step boxed Final 中文😀\u0301é"


# ---------------------------------------------------------------- generated and mutated responses

def random_values(rng, rulebook=RB):
    return {s.key: rng.choice(s.values) for s in rulebook.critical}


def random_trace(rng, rulebook=RB):
    """A valid trace; its label is ŷ most of the time so that gates pass often."""
    values = random_values(rng, rulebook)
    label = rulebook.expected_label(values) if rng.random() < 0.7 else rng.randrange(5)
    reasons = {n: rng.choice(FREE_TEXT) for n in range(1, 10)}
    free = {n: rng.choice(["n/a", "weather", "中文 text", "x\\y"]) for n in (1, 2, 3)}
    return render_trace(rulebook, label, values, free=free, reasons=reasons), label


def noise(rng, n):
    return "".join(rng.choice(NOISE_ALPHABET) for _ in range(n))


def _lines_op(rng, text, op):
    lines = text.split("\n")
    i, j = rng.randrange(1, len(lines)), rng.randrange(1, len(lines))
    if op == "drop":
        del lines[i]
    elif op == "dup":
        lines.insert(i, lines[i])
    else:
        lines[i], lines[j] = lines[j], lines[i]
    return "\n".join(lines)


def _replace_one(rng, text, old, new):
    hits = [k for k in range(len(text)) if text.startswith(old, k)]
    if not hits:
        return text
    k = rng.choice(hits)
    return text[:k] + new + text[k + len(old):]


def mutate(rng, text):
    """One random corruption (some keep the format valid: trailing whitespace, free-text edits)."""
    op = rng.randrange(24)
    if op == 0:
        return text[:rng.randrange(len(text) + 1)]
    if op in (1, 2, 3):
        return _lines_op(rng, text, ("drop", "dup", "swap")[op - 1])
    if op == 4:
        return _replace_one(rng, text, "}", "")
    if op == 5:
        return _replace_one(rng, text, "{", "")
    if op == 6:
        return _replace_one(rng, text, "}", "{x}}")            # nested braces
    if op == 7:
        return _replace_one(rng, text, f"Step {rng.randrange(1, 10)}", f"Step {rng.randrange(0, 11)}")
    if op == 8:
        step = rng.choice(RB.steps)
        return _replace_one(rng, text, step.name, rng.choice([step.name.lower(), step.name + " ", "X"]))
    if op == 9:
        return _replace_one(rng, text, "}\n", rng.choice(["} extra\n", "}.\n", "} \n", "}}\n"]))
    if op == 10:
        return text + rng.choice([" ", "\n", "\r\n", " \t \n\n", " x", "\n\\boxed{1}", "\u3000"])
    if op == 11:
        return text.replace("\n", "\r\n") if rng.random() < 0.5 else _replace_one(rng, text, "\n", "\r\n")
    if op == 12:
        step = rng.choice(RB.critical)
        return _replace_one(rng, text, "{" + rng.choice(step.values) + "}",
                            "{" + rng.choice(["Full", "none ", " partial", "spam!", "高", "full\\", ""]) + "}")
    if op == 13:
        return rng.choice(["5", "x", " ", "\n", "٣", "２"]) + text[1:]  # not an ASCII label digit
    if op == 14 and text[:1] in ("0", "1", "2", "3", "4"):
        return str((int(text[0]) + rng.randrange(1, 5)) % 5) + text[1:]   # y_dec != y_final
    if op in (14, 15):
        return _replace_one(rng, text, "Final: \\boxed{", "Final: \\boxed{" + rng.choice(["5", "x", "1", ""]))
    if op == 16:
        k = rng.randrange(len(text) + 1)
        return text[:k] + rng.choice("{}\n\\ 0123456789()S:\r\t中😀") + text[k + rng.randrange(2):]
    if op == 17:
        return _replace_one(rng, text, "\\boxed{", rng.choice(["\\boxd{", "boxed{", "\\boxed {", "\\\\boxed{"]))
    if op == 18:
        return _replace_one(rng, text, "}\n", "} \\boxed{more}\n")   # two boxes on one line
    if op == 19:
        return rng.choice([" ", "\n", "\ufeff"]) + text
    if op == 20:
        return _replace_one(rng, text, "): ", rng.choice(["):", ") : ", "):  ", "): 中 "]))
    if op == 21:
        return re.sub(r"\{[^{}\n]*\}", "{}", text, count=1) if rng.random() < 0.3 else \
            _replace_one(rng, text, "{n/a}", "{}")                        # an empty box
    if op == 22:
        k = text.rfind("{")
        return text[:k + 1] + rng.choice("56789x-") + text[k + 2:]       # final digit out of range
    return _replace_one(rng, text, "\n", "")                          # two lines glued together


def generated_batch(seed, n):
    """(texts, labels) with valid, mutated, doubly mutated, noise, empty and null entries."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        text, label = random_trace(rng)
        kind = rng.random()
        if kind < 0.35:
            pass
        elif kind < 0.85:
            text = mutate(rng, text)
        elif kind < 0.97:
            text = mutate(rng, mutate(rng, text))
        else:
            text = rng.choice([None, "", noise(rng, rng.randrange(1, 300)),
                               str(rng.randrange(5)) + noise(rng, rng.randrange(300))])
        roll = rng.random()
        y_gt = label if roll < 0.6 else (-1 if roll < 0.65 else rng.randrange(5))
        texts.append(text)
        labels.append(y_gt)
    # a few 100 KB noise responses (and one that starts like a trace) to check bounds and speed
    for k in range(3):
        texts.append(str(k) + "\n" + noise(rng, 100_000))
        labels.append(k)
    return texts, labels


def assert_agree(texts, labels, rulebook=RB, config=RewardConfig()):
    got = verify_batch(texts, labels, rulebook, config)
    ref = verify_all(texts, labels, rulebook, gate=config.gate, alpha=config.alpha, beta=config.beta,
                     gamma=config.gamma, format_penalty=config.format_penalty)
    assert len(got) == len(ref) == len(texts)
    for i, r in enumerate(ref):
        fields = {
            "fmt": (bool(got.fmt[i]), r.fmt), "cst": (bool(got.cst[i]), r.cst),
            "logic": (bool(got.logic[i]), r.logic), "y_dec": (int(got.y_dec[i]), r.y_dec),
            "y_final": (int(got.y_final[i]), r.y_final), "y_hat": (int(got.y_hat[i]), r.y_hat),
            "values": (tuple(got.values[i].tolist()), r.values),
            "reward": (got.reward[i], np.float32(r.reward)),
            "spans": (tuple(map(tuple, got.spans[i].tolist())), tuple(map(tuple, r.spans))),
        }
        bad = {k: v for k, v in fields.items() if v[0] != v[1]}
        assert not bad, f"response {i} label {labels[i]} {texts[i]!r:.300}: numba vs reference {bad}"
    return got


@pytest.fixture(scope="module")
def generated():
    return generated_batch(seed=1234, n=12_000)


@pytest.mark.parametrize("gate", ["literal", "pred"])
def test_agrees_with_reference_on_generated_responses(generated, gate):
    texts, labels = generated
    got = assert_agree(texts, labels, config=RewardConfig(gate=gate))
    # the generator must reach every branch, or agreement proves little
    assert 0.25 < got.fmt.mean() < 0.75
    assert (got.fmt & ~got.cst).sum() > 100 and (got.fmt & got.cst & ~got.logic).sum() > 100
    assert (got.fmt & (got.y_hat != got.y_dec)).sum() > 100
    assert (got.reward > 0).sum() > 1000 and (got.fmt & (got.y_dec < 0)).sum() == 0
    if gate == "literal":
        assert set(np.unique(got.reward).tolist()) <= {1.0, 0.0, -1.0}
    else:
        assert (got.reward < 0)[got.fmt].sum() > 50           # the ordinal term is live


def test_agrees_with_reference_under_other_coefficients(generated):
    texts, labels = generated
    assert_agree(texts[:3000], labels[:3000],
                 config=RewardConfig(alpha=0.6, beta=0.4, gamma=0.3, format_penalty=-2.5, gate="pred"))


def unicode_rulebook():
    """The default rulebook with multi-byte step names and values: spans must count characters."""
    steps = [{"name": f"步骤 {s.name} é"} for s in RB.steps]
    for j, n in enumerate((4, 5, 6, 7, 8)):
        step = RB.steps[n - 1]
        steps[n - 1] |= {"key": step.key, "values": [v + ("中" if k % 2 else "") for k, v in enumerate(step.values)]}
    rename = {s.key: {v: v + ("中" if k % 2 else "") for k, v in enumerate(s.values)} for s in RB.critical}
    rules = [{"name": r.name, "label": r.label,
              "when": {k: [rename[k][v] for v in vs] for k, vs in r.when.items()}} for r in RB.rules]
    return parse_rulebook({"name": "unicode", "steps": steps, "rules": rules})


def test_agrees_with_reference_on_unicode_rulebook():
    rb = unicode_rulebook()
    rng = random.Random(7)
    texts, labels = [], []
    for _ in range(1500):
        values = random_values(rng, rb)
        label = rb.expected_label(values)
        text = render_trace(rb, label, values, reasons={n: rng.choice(FREE_TEXT) for n in range(1, 10)})
        if rng.random() < 0.4:
            text = text[:rng.randrange(len(text))] if rng.random() < 0.5 else text.replace("中", "", 1)
        texts.append(text)
        labels.append(label)
    got = assert_agree(texts, labels, rulebook=rb)
    assert got.fmt.sum() > 500


def test_decision_table_matches_rulebook_on_every_value_combination():
    combos = list(itertools.product(*[s.values for s in RB.critical]))
    texts = [render_trace(RB, 0, dict(zip(RB.keys, c))) for c in combos]
    got = verify_batch(texts, [0] * len(texts))
    assert got.fmt.all()
    expected = [RB.expected_label(dict(zip(RB.keys, c))) for c in combos]
    assert got.y_hat.tolist() == expected
    assert got.values.tolist() == [[s.values.index(v) for s, v in zip(RB.critical, c)] for c in combos]


# ---------------------------------------------------------------- the reward formula by hand

PERFECT = {"intent": "full", "entity": "consistent", "time": "current", "source": "high", "coverage": "complete"}


def one(text, y_gt, **config):
    r = verify_batch([text], [y_gt], config=RewardConfig(**config))
    return bool(r.fmt[0]), bool(r.cst[0]), bool(r.logic[0]), float(r.reward[0])


def test_reward_literal_gate_hand_checked():
    trace = render_trace(RB, 4, PERFECT)                      # ŷ = 4 (rule "perfect")
    assert one(trace, 4) == (True, True, True, 1.0)            # α·1 + β
    assert one(trace, 3) == (True, True, False, 0.0)           # ŷ != y_gt: circuit breaker
    assert one("3" + trace[1:], 3) == (True, False, False, 0.0)  # y_dec != y_final, ŷ != y_pred
    assert one(trace, -1) == (True, True, False, 0.0)          # unknown label never passes
    assert one(trace[:-1], 4) == (False, False, False, -1.0)   # truncated: format penalty
    wrong = render_trace(RB, 2, PERFECT)                       # says 2, the boxes give 4
    assert one(wrong, 2) == (True, True, False, 0.0)


def test_reward_pred_gate_gives_the_ordinal_term():
    """The value table of RewardConfig's docstring, by hand: α·(1 − γ·d) + β·[d = 0] when the gates
    pass, the midpoint of −1 and α·(1 − 4γ) = −0.72 when one fails."""
    trace = render_trace(RB, 4, PERFECT)
    assert one(trace, 4, gate="pred") == (True, True, True, 1.0)
    for y_gt, want in ((3, 0.36), (2, 0.0), (1, -0.36), (0, -0.72)):   # 0.72·(1 − 0.5·d)
        fmt, cst, logic, r = one(trace, y_gt, gate="pred")
        assert (fmt, cst, logic) == (True, True, True) and r == pytest.approx(want, abs=1e-6), y_gt
    _, _, _, r = one(trace, 2, gate="pred", gamma=0.25)        # 0.72·(1 − 0.25·2)
    assert r == pytest.approx(0.36, abs=1e-6)
    gate_failed = pytest.approx(-0.86, abs=1e-6)               # (−1 + −0.72) / 2
    fmt, cst, logic, r = one(trace, -1, gate="pred")
    assert (fmt, cst, logic, r) == (True, True, False, gate_failed)
    fmt, cst, logic, r = one(render_trace(RB, 2, PERFECT), 2, gate="pred")  # ŷ = 4 ≠ y_pred = 2
    assert (fmt, cst, logic, r) == (True, True, False, gate_failed)
    fmt, cst, logic, r = one("3" + trace[1:], 3, gate="pred")  # y_dec = 3 ≠ y_final = 4
    assert (fmt, cst, r) == (True, False, gate_failed)
    assert one("", 3, gate="pred", format_penalty=-1.5)[3] == -1.5


OUTCOME_CONFIGS = [RewardConfig(gate="literal"), RewardConfig(gate="pred"),
                   RewardConfig(gate="literal", alpha=0.6, beta=0.4, format_penalty=-0.3),
                   RewardConfig(gate="pred", alpha=0.6, beta=0.4, gamma=0.3, format_penalty=-2.5),
                   RewardConfig(gate="pred", alpha=1.0, beta=0.0, gamma=0.05, format_penalty=-0.01),
                   RewardConfig(gate="pred", gamma=0.59)]


def all_outcomes():
    """Every (format ok, y_dec, y_final, y_verdict, ŷ, y_gt) a parsed response can have."""
    grades = range(5)
    yield from ((False, d, -1, -1, -1, gt) for d in (-1, 0, 4) for gt in (-1, 0, 2, 4))
    yield from ((True, d, f, v, h, gt) for d in grades for f in grades for v in grades for h in grades
                for gt in range(-1, 5))


@pytest.mark.parametrize("config", OUTCOME_CONFIGS, ids=lambda c: f"{c.gate}-{c.alpha}-{c.gamma}-{c.format_penalty}")
def test_reward_ordering_over_all_outcomes(config):
    """One ordering rule over every outcome, for both gates, the compiled reward against the
    reference: format failure < every gate failure < every passing response, passing ones strictly
    ordered by |y_pred − y_gt|, R_cot (β) only for a correct answer; the literal gate gives exactly
    the paper's three values."""
    from afrl_fast.verify import _reward
    from reference_verifier import reward_of

    classes = {"format": set(), "gate": set()}
    for fmt, dec, fin, verdict, hat, gt in all_outcomes():
        cst, logic, r = _reward(fmt, dec, hat, fin, verdict, gt, config.gate == "pred", config.alpha, config.beta,
                                config.gamma, config.format_penalty, config.gate_failure_reward)
        if not fmt:
            classes["format"].add(r)
            continue
        want = reward_of(dec, fin, hat, gt, config.gate, config.alpha, config.beta, config.gamma,
                         config.format_penalty, y_verdict=verdict)
        assert (cst, logic) == want[:2] and r == pytest.approx(want[2], abs=1e-12), (fmt, dec, fin, verdict, hat, gt)
        assert cst == (dec == fin == verdict)
        if cst and logic:
            classes.setdefault(abs(dec - gt), set()).add(r)
        else:
            classes["gate"].add(r)
    assert all(len(v) == 1 for v in classes.values()), classes   # a value depends only on the class
    value = {k: v.pop() for k, v in classes.items()}
    if config.gate == "literal":
        assert set(value) == {"format", "gate", 0}                 # passing means correct
        assert (value["format"], value["gate"], value[0]) == (config.format_penalty, 0.0,
                                                              config.alpha + config.beta)
    else:
        assert sorted(k for k in value if isinstance(k, int)) == [0, 1, 2, 3, 4]
        ladder = [value["format"], value["gate"], value[4], value[3], value[2], value[1], value[0]]
        assert all(a < b for a, b in zip(ladder, ladder[1:])), ladder
        assert value[1] == pytest.approx(config.alpha * (1 - config.gamma))      # no β when wrong
        assert value[0] == pytest.approx(config.alpha + config.beta)


@pytest.mark.parametrize("kwargs, message", [
    ({"gate": "pred", "gamma": 0.6}, "4 grades off earns"),            # 0.72·(1 − 2.4) = −1.008 < −1
    ({"gate": "pred", "gamma": 0.5, "format_penalty": -0.5}, "lower gamma"),
    ({"gate": "pred", "gamma": 0.0}, "gamma > 0"),
    ({"gate": "pred", "alpha": 0.0}, "alpha > 0"),
    ({"gate": "literal", "format_penalty": 0.0}, "below 0"),
])
def test_reward_configs_that_break_the_ordering_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_failed_format_keeps_only_the_decision_digit():
    trace = render_trace(RB, 4, PERFECT)
    r = verify_batch([trace.replace("\\boxed{high}", "\\boxed{great}"), "x" + trace[1:]], [4, 4])
    assert not r.fmt.any() and r.y_dec.tolist() == [4, -1]
    assert r.spans[0, 0].tolist() == [0, 1] and (r.spans[0, 1:] == -1).all() and (r.spans[1] == -1).all()
    assert (r.values == -1).all() and (r.y_final == -1).all() and (r.y_hat == -1).all()


def test_spans_point_at_the_boxed_values():
    values = {"intent": "partial", "entity": "missing", "time": "outdated", "source": "low", "coverage": "minimal"}
    text = render_trace(RB, 1, values, reasons={4: "北京 😀 e\u0301", 7: "👩‍👩‍👧 family"}) + " \n"
    r = verify_batch([text], [1])
    assert r.fmt[0]
    pieces = [text[s:e] for s, e in r.spans[0].tolist()]
    assert pieces == ["1", "partial", "missing", "outdated", "low", "minimal", "1"]
    assert text[r.spans[0, 6, 0] - len("Final: \\boxed{"): r.spans[0, 6, 0]] == "Final: \\boxed{"


# ---------------------------------------------------------------- inputs and validation

def test_arrow_inputs_sliced_large_chunked_and_nulls():
    rng = random.Random(3)
    texts = [random_trace(rng)[0] for _ in range(40)]
    texts[5], texts[17] = None, ""
    labels = list(range(40))
    labels = [x % 5 for x in labels]
    base = verify_batch(texts, labels)
    arr = pa.array(["pad", "pad"] + texts, type=pa.string()).slice(2)    # non-zero array offset
    cases = [arr, pa.array(texts, type=pa.large_string()), pa.chunked_array([texts[:13], texts[13:]]),
             pa.array(texts, type=pa.string_view()), pa.chunked_array([arr])]
    for responses in cases:
        got = verify_batch(responses, np.array(labels, dtype=np.int8))
        for name in ("fmt", "cst", "logic", "y_dec", "y_final", "y_hat", "values", "reward", "spans"):
            assert np.array_equal(getattr(got, name), getattr(base, name)), (type(responses), name)
    assert not base.fmt[5] and base.y_dec[5] == -1 and base.reward[5] == -1.0
    assert verify_batch(pa.array(["0"] * 3, pa.string()).slice(1, 0), []).reward.shape == (0,)
    assert len(verify_batch([], [])) == 0


def test_label_and_response_validation():
    with pytest.raises(ValueError, match="2 responses but 3 labels"):
        verify_batch(["a", "b"], [1, 2, 3])
    with pytest.raises(ValueError, match="label 7 at index 1"):
        verify_batch(["a", "b"], [1, 7])
    with pytest.raises(TypeError, match="integers"):
        verify_batch(["a"], [1.5])
    with pytest.raises(TypeError, match="string"):
        verify_batch(pa.array([1, 2]), [1, 2])
    with pytest.raises(TypeError, match="single string"):
        verify_batch("0\nStep", [1])


@pytest.mark.parametrize("kwargs, message", [
    ({"gate": "strict"}, "gate"), ({"alpha": float("nan")}, "alpha"), ({"gamma": -0.1}, "gamma"),
    ({"beta": "0.28"}, "beta"), ({"format_penalty": float("inf")}, "format_penalty"),
])
def test_reward_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardConfig(**kwargs)


def test_reward_config_defaults():
    c = RewardConfig()
    assert (c.alpha, c.beta, c.gamma, c.format_penalty, c.gate) == (0.72, 0.28, 0.5, -1.0, "literal")


# ---------------------------------------------------------------- token weights

def test_token_weights_on_synthetic_offsets():
    spans = np.array([[0, 1], [10, 14], [-1, -1], [-1, -1], [-1, -1], [-1, -1], [30, 31]])
    tokens = np.array([[0, 1], [1, 2], [8, 11], [11, 15], [15, 30], [29, 31], [31, 31], [30, 30]])
    w = token_weights(spans, tokens, (10.0, 8.0, 5.0))
    assert w.dtype == np.float32
    assert w.tolist() == [10.0, 1.0, 8.0, 8.0, 1.0, 5.0, 1.0, 1.0]
    both = token_weights(np.array([[0, 1]] + [[1, 2]] + [[-1, -1]] * 4 + [[2, 3]]), np.array([[0, 3]]),
                         (2.0, 3.0, 7.0))
    assert both.tolist() == [7.0]                                # max over the spans it touches
    with pytest.raises(ValueError, match="weights"):
        token_weights(spans, tokens, (10.0, 0.0, 5.0))


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer()


def test_token_offsets_and_weights_with_qwen3_tokenizer(qwen):
    rng = random.Random(11)
    for _ in range(6):
        values = random_values(rng)
        label = RB.expected_label(values)
        reasons = {n: rng.choice(FREE_TEXT + ["東京タワー 🗼 and naïve café", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👨‍👩‍👧‍👦"]) for n in range(1, 10)}
        ids = qwen.encode(render_trace(RB, label, values, reasons=reasons), add_special_tokens=False)
        ids = ids + [qwen.eos_token_id]                         # generation ends with a special token
        text = qwen.decode(ids, skip_special_tokens=True)
        offsets = response_token_offsets(qwen, ids)
        assert offsets[-1].tolist() == [len(text), len(text)]    # skipped special token: empty span
        assert offsets[0, 0] == 0 and (np.diff(offsets[:, 0]) >= 0).all() and offsets[:, 1].max() == len(text)
        covered = np.zeros(len(text), bool)
        for k, (s, e) in enumerate(offsets.tolist()):
            covered[s:e] = True
            piece = qwen.decode([ids[k]], skip_special_tokens=True)
            if "\ufffd" not in piece:                            # whole characters: exact text
                assert text[s:e] == piece, (k, piece, text[s:e])
        assert covered.all()
        r = verify_batch([text], [label])
        assert r.fmt[0]
        w = token_weights(r.spans[0], offsets)
        heavy = "".join(text[s:e] for (s, e), wk in zip(offsets.tolist(), w) if wk > 1)
        # the weighted tokens spell exactly the digit and the values (Qwen splits at "{" and "}")
        assert heavy == str(label) + "".join(values[k] for k in RB.keys) + str(label)
        assert sorted(set(w.tolist())) == [1.0, 5.0, 10.0]


def test_token_offsets_of_characters_split_across_tokens(qwen):
    text = "2\n🗼𝔘 東京 👨‍👩‍👧‍👦 x"
    ids = qwen.encode(text, add_special_tokens=False)
    pieces = [qwen.decode([t]) for t in ids]
    assert any("\ufffd" in p for p in pieces), "needs a token that ends inside a character"
    offsets = response_token_offsets(qwen, ids)
    for k, p in enumerate(pieces):
        s, e = offsets[k]
        assert e > s, (k, p)                                    # every byte-carrying token owns a char
        if "\ufffd" not in p:
            assert text[s:e] == p
    # the tokens that share a split character both cover it
    for c in range(len(text)):
        assert any(s <= c < e for s, e in offsets.tolist()), c


# ---------------------------------------------------------------- CLI

def write_inputs(path, texts, labels, **extra):
    pq.write_table(pa.table({"id": list(range(len(texts))), "response": texts, "label": labels, **extra}), path)


def test_cli_round_trip(tmp_path, capsys):
    texts, labels = generated_batch(seed=99, n=300)
    texts, labels = texts[:300], labels[:300]
    write_inputs(tmp_path / "in.parquet", texts, pa.array(labels, pa.int64()), query_id=["q"] * 300)
    assert main(["--responses", str(tmp_path / "in.parquet"), "--out", str(tmp_path / "out.parquet"),
                 "--gate", "pred"]) == 0
    summary = capsys.readouterr().out
    assert "n=300" in summary and "format_pass=" in summary and "mean_reward=" in summary and "responses/s" in summary
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == ["id", "label", "query_id"] + list(RESULT_COLUMNS)
    assert out.column("id").to_pylist() == list(range(300))
    want = verify_all(texts, labels, RB, gate="pred")
    assert out.column("reward").to_pylist() == [float(np.float32(r.reward)) for r in want]
    assert out.column("fmt").to_pylist() == [r.fmt for r in want]
    for j, step in enumerate(RB.critical):
        col = out.column(f"s{step.number}_value").to_pylist()
        assert col == [step.values[r.values[j]] if r.fmt else None for r in want]
    assert out.column("s8_end").to_pylist() == [r.spans[5][1] for r in want]
    assert out.column("final_start").to_pylist() == [r.spans[6][0] for r in want]


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["0"], "label": [0]}), path)
    proc = subprocess.run([sys.executable, "-m", "afrl_fast.verify", "--responses", str(path), "--out",
                           str(tmp_path / "o.parquet")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "missing column 'response'" in proc.stderr and str(path) in proc.stderr
    assert "Traceback" not in proc.stderr
    pq.write_table(pa.table({"response": ["0"], "label": ["zero"]}), path)
    assert main(["--responses", str(path), "--out", str(tmp_path / "o.parquet")]) == 2
    assert "'label' must be integers" in capsys.readouterr().err
    assert main(["--responses", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o.parquet")]) == 2
    assert "file not found" in capsys.readouterr().err
    pq.write_table(pa.table({"response": ["0"], "label": [9]}), path)
    assert main(["--responses", str(path), "--out", str(tmp_path / "o.parquet")]) == 2
    assert "label 9 at index 0" in capsys.readouterr().err


def test_reference_regex_is_anchored():
    """Guard the oracle itself: a valid trace plus garbage must not match."""
    pattern = response_pattern(RB)
    trace = render_trace(RB, 4, PERFECT)
    assert verify_one(trace, 4, RB, pattern).fmt
    assert not verify_one(trace + " x", 4, RB, pattern).fmt
    assert not verify_one("x" + trace, 4, RB, pattern).fmt


class LeadingSpaceTokenizer:
    """A toy sentencepiece-like decoder: a decode drops the leading space of its first piece, so
    decoding a slice is not a substring of the whole text (forces the full-prefix fallback)."""
    pieces = ["2", "\n", " Step", " 1", " (", "x", ")", " é", "\n", " ok"]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids).lstrip(" ")


def test_token_offsets_fall_back_to_prefix_decoding():
    tok = LeadingSpaceTokenizer()
    ids = list(range(len(tok.pieces)))
    text = tok.decode(ids)
    offsets = response_token_offsets(tok, ids)
    naive = [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]
    assert offsets[:, 1].tolist() == naive
    assert offsets[1:, 0].tolist() == naive[:-1] and offsets[0, 0] == 0
    assert text[offsets[7, 0]:offsets[7, 1]] == " é"
    w = token_weights([[0, 1]] + [[-1, -1]] * 6, offsets)       # failed format: only the decision
    assert w.tolist() == [10.0] + [1.0] * (len(ids) - 1)


def test_step_9_boxes_a_grade_that_agrees_with_the_answer():
    """Step 9 is the verdict: its box must hold one grade digit (else the format fails), and a
    verdict that disagrees with the decision and the final grade fails the consistency gate."""
    from afrl_fast.format import render_trace
    values = {"intent": "full", "entity": "consistent", "time": "current", "source": "high", "coverage": "complete"}
    y = RB.expected_label(values)
    good = render_trace(RB, y, values)
    step9 = good.splitlines()[9]
    assert step9.startswith("Step 9") and step9.endswith(f"\\boxed{{{y}}}")
    other = (y + 1) % 5
    texts = [good, good.replace(step9, step9[:-3] + "{yes}"), good.replace(step9, step9[:-3] + "{12}"),
             good.replace(step9, step9[:-3] + f"{{{other}}}")]
    res = verify_batch(texts, [y] * 4, RB)
    assert res.fmt.tolist() == [True, False, False, True]
    assert res.cst.tolist() == [True, False, False, False]
    ref = verify_all(texts, [y] * 4, RB)
    assert [r.fmt for r in ref] == res.fmt.tolist() and [r.cst for r in ref] == res.cst.tolist()
