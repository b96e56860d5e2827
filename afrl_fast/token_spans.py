"""The verifier's character spans (decision digit, the boxed step 4-8 values, the final grade) mapped
onto the tokens of a response, and the stepwise token weights of Stepwise-GRPO that follow from them."""
from __future__ import annotations

import numpy as np

from .rulebook import N_CRITICAL

N_SPANS = 2 + N_CRITICAL            # decision digit, the five critical values, final digit

def _common_prefix_length(piece: str, text: str, at: int) -> int:
    n = min(len(piece), len(text) - at)
    k = 0
    while k < n and piece[k] == text[at + k]:
        k += 1
    return k


def response_token_offsets(tokenizer, token_ids, skip_special_tokens: bool = True,
                           text: str | None = None) -> np.ndarray:
    """Character span [start, end) of each generated token in the decoded response, int32 [T, 2].

    The text is `tokenizer.decode(token_ids, skip_special_tokens=...)` — decode it the same way
    before verifying, so the verifier's spans and these offsets index the same string. A token's
    end is how far the decoded prefix ending with it agrees with the text. A token that stops
    inside a multi-byte character decodes to U+FFFD instead of the character; its span is widened
    over that character, so both tokens sharing a character carry its weight. Skipped special
    tokens get empty spans.

    The prefix is decoded from the last position where the text was complete, so the cost is linear
    for byte-level BPE (Qwen). Tokenizers whose slice decodes are not concatenable (e.g. leading
    spaces dropped at the slice start) fall back to decoding the whole prefix.
    """
    ids = [int(t) for t in token_ids]
    if text is None:
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    offsets = np.zeros((len(ids), 2), dtype=np.int32)
    anchor, anchor_char, prev_end = 0, 0, 0
    for k in range(len(ids)):
        piece = tokenizer.decode(ids[anchor:k + 1], skip_special_tokens=skip_special_tokens)
        matched = _common_prefix_length(piece, text, anchor_char)
        if piece[matched:].strip("\ufffd"):        # not a pending partial character: slice decode
            anchor, anchor_char = 0, 0             # disagrees with the text, use the full prefix
            piece = tokenizer.decode(ids[:k + 1], skip_special_tokens=skip_special_tokens)
            matched = _common_prefix_length(piece, text, 0)
        end = max(anchor_char + matched, prev_end)
        pending = matched < len(piece)
        offsets[k] = prev_end, min(end + 1, len(text)) if pending else end
        if not pending:
            anchor, anchor_char = k + 1, end
        prev_end = end
    return offsets


def token_weights(spans, token_offsets, weights=(10.0, 10.0, 5.0)) -> np.ndarray:
    """Per-token advantage weights float32 [T] (paper Table 7, Algorithm 1 line 6).

    spans: [7, 2] one row of VerifyResult.spans; token_offsets: [T, 2] from response_token_offsets.
    weights: (w_decision, w_trace, w_final). A token overlapping the decision digit gets w_decision,
    one overlapping any step 4-8 value gets w_trace, one overlapping the final digit w_final (the
    largest if it overlaps several); all other tokens get 1.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (3,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be three positive finite numbers (decision, trace, final), got {weights!r}")
    spans = np.asarray(spans).reshape(N_SPANS, 2)
    tok = np.asarray(token_offsets).reshape(-1, 2)
    span_weight = np.array([w[0]] + [w[1]] * N_CRITICAL + [w[2]])
    out = np.full(len(tok), -np.inf)
    for (s, e), ws in zip(spans.tolist(), span_weight):
        if s < 0:
            continue
        hit = (tok[:, 0] < e) & (tok[:, 1] > s)     # half-open intervals overlap
        out[hit] = np.maximum(out[hit], ws)
    out[np.isneginf(out)] = 1.0
    return out.astype(np.float32)
