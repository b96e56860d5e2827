r"""The compiled batch rule verifier and the AFRL reward (paper §3.4, Eq. 6–7).

One response is checked against the grammar in `afrl_fast.format` (its module docstring), byte for
byte: the decision digit, nine `Step i (NAME_i): TEXT\boxed{VALUE}` lines in order with the
rulebook's exact names, steps 4–8 boxing a value of their closed vocabulary, `Final: \boxed{D}` and
only whitespace after it. From the boxed values the rulebook's decision list gives ŷ, and

    R = I_fmt · I_cst · I_logic · (α·R_res + β·R_cot)                                  (Eq. 6)

with y_pred = y_dec (the first token) and the format penalty (−1 by default) in place of R when
I_fmt fails. Under the paper's literal gate a passing response is always correct, so R is 1, 0 or
the penalty. Under the `pred` gate the ordinal term is live and the values follow one ordering
rule: format failure < any gate failure < any passing response, passing ones ordered by
|y_pred − y_gt| (RewardConfig's docstring has the formula and the value table).

The batch pass takes an Arrow string array as it is: its offsets and UTF-8 data buffer are viewed
as numpy arrays without copying, the rulebook becomes a few integer tables, and one numba
`njit(parallel=True)` loop over the responses fills flat result arrays (gates, labels, value indices,
rewards and the character spans of the tokens the trainer up-weights). `tests/reference_verifier.py`
implements the same rules with `re` and is the oracle the tests compare against.

`response_token_offsets` + `token_weights` turn those spans into per-token advantage weights
(w_decision, w_trace, w_final of the paper's Table 7, Algorithm 1 line 6).

CLI:  python -m afrl_fast.verify --responses IN.parquet --out OUT.parquet [--gate pred]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from numba import njit, prange

from ..format import BOX_OPEN
from ..reward import RewardConfig
from ..rulebook import CRITICAL_STEPS, N_CRITICAL, N_STEPS, Rulebook, load_rulebook
from ..text_arrays import arrow_string_views, as_label_array, as_string_array
from ..token_spans import N_SPANS

SPAN_NAMES = ("dec",) + tuple(f"s{n}" for n in CRITICAL_STEPS) + ("final",)
VALUE_COLUMNS = tuple(f"s{n}_value" for n in CRITICAL_STEPS)
RESULT_COLUMNS = ("fmt", "cst", "logic", "y_dec", "y_final", "y_hat") + VALUE_COLUMNS + ("reward",) + \
    tuple(f"{s}_{side}" for s in SPAN_NAMES for side in ("start", "end"))


# ----------------------------------------------------------------------------------------------
# The rulebook as integer tables
# ----------------------------------------------------------------------------------------------

def _flat_bytes(strings) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all strings back to back (uint8) and their start offsets (int64, len+1)."""
    encoded = [s.encode("utf-8") for s in strings]
    starts = np.zeros(len(encoded) + 1, dtype=np.int64)
    starts[1:] = np.cumsum([len(b) for b in encoded])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), starts


@dataclass(frozen=True)
class CompiledRulebook:
    """What the numba pass needs of a rulebook, as plain arrays.

    prefixes / prefix_starts: the 10 fixed line openings "Step i (NAME_i): " and "Final: \\boxed{"
    prefix_cont:              [10] UTF-8 continuation bytes in each opening (bytes - characters)
    vocab / vocab_starts:     every value of steps 4-8 back to back, and where each one starts
    step_vocab:               [6] value k of critical step j is entry step_vocab[j] + k
    rule_masks, rule_labels:  the decision list (see rulebook.compile_tables)
    """
    prefixes: np.ndarray
    prefix_starts: np.ndarray
    prefix_cont: np.ndarray
    vocab: np.ndarray
    vocab_starts: np.ndarray
    step_vocab: np.ndarray
    rule_masks: np.ndarray
    rule_labels: np.ndarray
    vocab_strings: tuple = field(compare=False)   # [5] tuples of the value strings, for output


def compile_rulebook(rulebook: Rulebook) -> CompiledRulebook:
    openings = [f"Step {s.number} ({s.name}): " for s in rulebook.steps] + [f"Final: {BOX_OPEN}"]
    prefixes, prefix_starts = _flat_bytes(openings)
    prefix_cont = np.array([len(o.encode("utf-8")) - len(o) for o in openings], dtype=np.int64)
    vocab_strings = tuple(s.values for s in rulebook.critical)
    vocab, vocab_starts = _flat_bytes([v for values in vocab_strings for v in values])
    step_vocab = np.zeros(N_CRITICAL + 1, dtype=np.int64)
    step_vocab[1:] = np.cumsum([len(values) for values in vocab_strings])
    return CompiledRulebook(prefixes, prefix_starts, prefix_cont, vocab, vocab_starts, step_vocab,
                            np.ascontiguousarray(rulebook.rule_masks, dtype=np.int64),
                            np.ascontiguousarray(rulebook.rule_labels, dtype=np.int64), vocab_strings)


# ----------------------------------------------------------------------------------------------
# The numba pass. Every index into `data` is checked against the response's end first, so no
# input (truncated, noise, megabytes long) can read outside its own bytes.
# ----------------------------------------------------------------------------------------------

_NL, _LBRACE, _RBRACE = 10, 123, 125
_ZERO, _FOUR = 48, 52
_BOX = np.frombuffer(BOX_OPEN.encode(), dtype=np.uint8).copy()     # \boxed{
_BOX_LEN = len(BOX_OPEN)
# byte classes for the free-text scan: 0 plain, 1 UTF-8 continuation byte (10xxxxxx), 2 stops TEXT/VALUE
_STOP = 2
_BYTE_CLASS = np.zeros(256, dtype=np.uint8)
_BYTE_CLASS[0x80:0xC0] = 1
_BYTE_CLASS[[_NL, _LBRACE, _RBRACE]] = _STOP


@njit(cache=True)
def _matches_at(data, p, end, pattern, a, b):
    """data[p:p+(b-a)] == pattern[a:b], staying inside [p, end)."""
    if end - p < b - a:
        return False
    for k in range(b - a):
        if data[p + k] != pattern[a + k]:
            return False
    return True


@njit(cache=True)
def _scan_free_text(data, p, end, byte_class):
    """(first position >= p holding "\\n", "{" or "}" or end if none, UTF-8 continuation bytes
    before it). Free text stops there; counting continuation bytes in the same sweep gives
    character offsets without a second pass (chars = bytes - continuation bytes). One table load
    per byte is this loop's whole cost, about 1.5x faster than comparing against each stop byte."""
    cont = 0
    while p < end:
        k = byte_class[data[p]]
        if k == _STOP:
            return p, cont
        cont += k
        p += 1
    return end, cont


@njit(cache=True)
def _vocab_index(data, a, b, vocab, vocab_starts, first, last):
    """Index k with vocab entry first+k == data[a:b], or -1."""
    for v in range(first, last):
        if vocab_starts[v + 1] - vocab_starts[v] == b - a and _matches_at(data, a, b, vocab, vocab_starts[v],
                                                                          vocab_starts[v + 1]):
            return v - first
    return -1


@njit(cache=True)
def _only_whitespace(data, p, end):
    for q in range(p, end):
        c = data[q]
        if c != 32 and c != 9 and c != 13 and c != 10:
            return False
    return True


@njit(cache=True)
def _expected_label(values, rule_masks, rule_labels):
    """ŷ: label of the first rule whose mask admits every value index (-1 if none does)."""
    for r in range(rule_masks.shape[0]):
        admitted = True
        for j in range(values.shape[0]):
            if (rule_masks[r, j] >> values[j]) & 1 == 0:
                admitted = False
                break
        if admitted:
            return rule_labels[r]
    return -1


@njit(cache=True)
def _parse_response(data, start, end, prefixes, prefix_starts, prefix_cont, box, byte_class, vocab,
                    vocab_starts, step_vocab, values, spans):
    """Parse one response occupying data[start:end]; fills values[5] and spans[7, 2] (character
    offsets relative to the response) as it goes. Returns (format ok, y_dec, y_final, y_verdict —
    step 9's boxed grade); y_dec is set whenever the first byte is a label digit, even if the rest
    fails."""
    if end <= start or data[start] < _ZERO or data[start] > _FOUR:
        return False, -1, -1, -1
    y_dec = data[start] - _ZERO
    spans[0, 0], spans[0, 1] = 0, 1
    p = start + 1
    if p >= end or data[p] != _NL:
        return False, y_dec, -1, -1
    p += 1
    # cont: UTF-8 continuation bytes in data[start:p], so byte p is character (p - start - cont)
    cont = 0
    verdict = -1
    for s in range(N_STEPS):
        if not _matches_at(data, p, end, prefixes, prefix_starts[s], prefix_starts[s + 1]):
            return False, y_dec, -1, -1
        text_start = p + prefix_starts[s + 1] - prefix_starts[s]
        cont += prefix_cont[s]
        brace, text_cont = _scan_free_text(data, text_start, end, byte_class)
        cont += text_cont
        # TEXT holds no brace, so the first "{" must close the step's "\boxed{"
        if brace >= end or data[brace] != _LBRACE or brace + 1 - _BOX_LEN < text_start:
            return False, y_dec, -1, -1
        if not _matches_at(data, brace + 1 - _BOX_LEN, end, box, 0, _BOX_LEN):
            return False, y_dec, -1, -1
        v0 = brace + 1
        close, value_cont = _scan_free_text(data, v0, end, byte_class)
        if close >= end or data[close] != _RBRACE or close == v0:
            return False, y_dec, -1, -1
        j = s + 1 - CRITICAL_STEPS[0]
        if 0 <= j < N_CRITICAL:
            k = _vocab_index(data, v0, close, vocab, vocab_starts, step_vocab[j], step_vocab[j + 1])
            if k < 0:
                return False, y_dec, -1, -1
            values[j] = k
            spans[1 + j, 0] = v0 - start - cont
            spans[1 + j, 1] = close - start - cont - value_cont
        elif s == N_STEPS - 1:                               # step 9 boxes the verdict: one grade digit
            if close != v0 + 1 or data[v0] < _ZERO or data[v0] > _FOUR:
                return False, y_dec, -1, -1
            verdict = data[v0] - _ZERO
        cont += value_cont
        if close + 1 >= end or data[close + 1] != _NL:       # the box ends its line
            return False, y_dec, -1, -1
        p = close + 2
    if not _matches_at(data, p, end, prefixes, prefix_starts[N_STEPS], prefix_starts[N_STEPS + 1]):
        return False, y_dec, -1, -1
    d = p + prefix_starts[N_STEPS + 1] - prefix_starts[N_STEPS]
    if d + 1 >= end or data[d] < _ZERO or data[d] > _FOUR or data[d + 1] != _RBRACE:
        return False, y_dec, -1, -1
    if not _only_whitespace(data, d + 2, end):
        return False, y_dec, -1, -1
    spans[N_SPANS - 1, 0], spans[N_SPANS - 1, 1] = d - start - cont, d - start - cont + 1
    return True, y_dec, data[d] - _ZERO, verdict


@njit(cache=True)
def _reward(fmt, y_dec, y_hat, y_final, y_verdict, y_gt, gate_pred, alpha, beta, gamma, penalty, gate_fail):
    """(I_cst, I_logic, R) of Eq. 6 for one parsed response (values: see RewardConfig). I_cst: the
    three statements of the grade agree — the decision token, step 9's verdict and the final box."""
    if not fmt:
        return False, False, penalty
    cst = y_dec == y_final and y_verdict == y_final
    if y_gt < 0:                    # unknown label: no gate can pass (see RewardConfig)
        logic = False
    elif gate_pred:
        logic = y_hat == y_dec
    else:
        logic = y_hat == y_dec and y_hat == y_gt
    if not (cst and logic):
        return cst, logic, gate_fail
    d = abs(y_dec - y_gt)
    r_cot = 1.0 if d == 0 else 0.0
    return cst, logic, alpha * (1.0 - gamma * d) + beta * r_cot


@njit(parallel=True, cache=True)
def _verify_kernel(data, offsets, valid, labels,
                   prefixes, prefix_starts, prefix_cont, box, byte_class, vocab, vocab_starts, step_vocab,
                   rule_masks, rule_labels, gate_pred, alpha, beta, gamma, penalty, gate_fail,
                   fmt, cst, logic, y_dec, y_final, y_hat, values, reward, spans):
    """Inputs: the Arrow views, labels; the rulebook tables; the reward config. Outputs: the
    VerifyResult arrays, every entry written (they may come in uninitialised)."""
    for i in prange(labels.shape[0]):
        values[i, :] = -1
        spans[i, :, :] = -1
        ok, dec, fin, verdict = False, -1, -1, -1
        if valid[i]:
            ok, dec, fin, verdict = _parse_response(data, offsets[i], offsets[i + 1], prefixes, prefix_starts,
                                                    prefix_cont, box, byte_class, vocab, vocab_starts,
                                                    step_vocab, values[i], spans[i])
        hat = -1
        if ok:
            hat = _expected_label(values[i], rule_masks, rule_labels)
        else:                       # only the decision digit survives a failed format
            values[i, :] = -1
            spans[i, 1:, :] = -1
        c, g, r = _reward(ok, dec, hat, fin, verdict, labels[i], gate_pred, alpha, beta, gamma, penalty, gate_fail)
        fmt[i], cst[i], logic[i], reward[i] = ok, c, g, r
        y_dec[i], y_final[i], y_hat[i] = dec, fin, hat


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    """Per-response verification, one numpy array per field (n = number of responses).

    fmt, cst, logic  bool [n]       the gates I_fmt, I_cst, I_logic
    y_dec, y_final   int8 [n]       first-token grade / final boxed grade (-1 when absent)
    y_hat            int8 [n]       ŷ from the decision list (-1 when the format fails)
    values           int8 [n, 5]    vocabulary index of steps 4-8 (-1 when the format fails)
    reward           float32 [n]
    spans            int32 [n,7,2]  character [start, end) of the decision digit, the boxed values
                                    of steps 4-8 and the final digit (-1 when absent)
    """
    fmt: np.ndarray
    cst: np.ndarray
    logic: np.ndarray
    y_dec: np.ndarray
    y_final: np.ndarray
    y_hat: np.ndarray
    values: np.ndarray
    reward: np.ndarray
    spans: np.ndarray
    vocab_strings: tuple = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.reward)

    def value_strings(self, j: int) -> list:
        """The boxed value of critical step j (0..4) per response, None where absent."""
        vocab = self.vocab_strings[j]
        return [vocab[k] if k >= 0 else None for k in self.values[:, j].tolist()]

    def to_dict(self) -> dict:
        """Flat columns named as in RESULT_COLUMNS (values as strings, spans split in start/end)."""
        out = {"fmt": self.fmt, "cst": self.cst, "logic": self.logic, "y_dec": self.y_dec,
               "y_final": self.y_final, "y_hat": self.y_hat}
        for j, name in enumerate(VALUE_COLUMNS):
            out[name] = self.value_strings(j)
        out["reward"] = self.reward
        for k, name in enumerate(SPAN_NAMES):
            out[f"{name}_start"] = self.spans[:, k, 0]
            out[f"{name}_end"] = self.spans[:, k, 1]
        return out

    def to_arrow(self) -> pa.Table:
        return pa.table({name: pa.array(col, type=pa.string()) if name in VALUE_COLUMNS else pa.array(col)
                         for name, col in self.to_dict().items()})


def allocate_result(n: int, vocab_strings=()) -> VerifyResult:
    """Uninitialised result arrays; the kernel writes every entry."""
    return VerifyResult(fmt=np.empty(n, np.bool_), cst=np.empty(n, np.bool_), logic=np.empty(n, np.bool_),
                        y_dec=np.empty(n, np.int8), y_final=np.empty(n, np.int8), y_hat=np.empty(n, np.int8),
                        values=np.empty((n, N_CRITICAL), np.int8), reward=np.empty(n, np.float32),
                        spans=np.empty((n, N_SPANS, 2), np.int32), vocab_strings=vocab_strings)


def verify_batch(responses, labels, rulebook: Rulebook | None = None,
                 config: RewardConfig = RewardConfig()) -> VerifyResult:
    """Verify every response against the rulebook and score it with Eq. 6 (values: RewardConfig).

    responses: Arrow string/large_string array (chunked is combined), or a list of str/None;
               a null response fails the format.
    labels:    y_gt per response, integers in -1..4 (-1 = unknown), same length.
    """
    rulebook = rulebook if rulebook is not None else load_rulebook()
    if not isinstance(config, RewardConfig):
        raise TypeError(f"config must be a RewardConfig, got {type(config).__name__}")
    arr = as_string_array(responses)
    y_gt = as_label_array(labels, len(arr))
    tables = compile_rulebook(rulebook)
    res = allocate_result(len(arr), tables.vocab_strings)
    if len(arr) == 0:
        return res
    data, offsets, valid = arrow_string_views(arr)
    _verify_kernel(data, offsets, valid, y_gt,
                   tables.prefixes, tables.prefix_starts, tables.prefix_cont, _BOX, _BYTE_CLASS, tables.vocab,
                   tables.vocab_starts, tables.step_vocab, tables.rule_masks, tables.rule_labels,
                   config.gate == "pred", float(config.alpha), float(config.beta), float(config.gamma),
                   float(config.format_penalty), float(config.gate_failure_reward), res.fmt, res.cst, res.logic,
                   res.y_dec, res.y_final, res.y_hat, res.values, res.reward, res.spans)
    return res


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
