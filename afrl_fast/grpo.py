"""Stepwise-GRPO advantages (paper §3.5.1, Algorithm 1 lines 5–6).

Group-relative advantage of response k of prompt i:  Â_ik = (R_ik − mean_k R_i·) / (std_k R_i· + ε)
(or without the std division: `std_norm=False`). Every token of the response carries Â_ik, times
its stepwise weight w_t: λ at the decision token, at the boxed values of steps 4–8 and at the final
grade (10 / 10 / 5 in Table 7), 1 elsewhere. Plain GRPO uses w_t = 1 everywhere.
"""
from __future__ import annotations

import numpy as np

from .token_spans import response_token_offsets, token_weights

EPS = 1e-6


def group_advantages(rewards: np.ndarray, std_norm: bool = True) -> np.ndarray:
    """rewards [n_prompts, G] → advantages of the same shape, each relative to its own group."""
    g = np.asarray(rewards, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"rewards must be [prompts, G], got shape {g.shape}")
    centred = g - g.mean(axis=1, keepdims=True)
    if std_norm:
        # unbiased std, as GRPO implementations use; a group of equal rewards gives 0, not 0/0
        centred = centred / (g.std(axis=1, ddof=1, keepdims=True) + EPS)
    return centred.astype(np.float32)


def token_advantages(advantages: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """Per-token advantages: each response's Â times its per-token weights, concatenated."""
    if len(advantages) != len(weights):
        raise ValueError(f"{len(advantages)} advantages but {len(weights)} weight vectors")
    parts = [a * np.asarray(w, dtype=np.float32) for a, w in zip(advantages, weights)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def response_weights(ro, i: int, tokenizer, weights: tuple[float, float, float] | None) -> np.ndarray:
    """Per-token weights of response i of a verified `Rollouts` batch: λ at the decision, the boxed
    values of steps 4-8 and the final grade, 1 elsewhere; all 1 when weights is None (plain GRPO) or
    the response failed the format gate.

    The weights come from the verifier's character spans mapped onto the tokens through their
    offsets in the same text the verifier read (the response without its closing EOS, which keeps
    weight 1). A response that fails the format gate gets weight 1 everywhere: its −1 penalty is
    about the trace, not about the grade it answered, so the decision token is not singled out."""
    ids = ro.response_ids[i]
    w = np.ones(len(ids), dtype=np.float32)
    n_body = len(ids) - (1 if ids and ro.finished[i] else 0)
    if weights is not None and n_body > 0 and ro.result.fmt[i]:
        offsets = response_token_offsets(tokenizer, ids[:n_body], skip_special_tokens=False, text=ro.texts[i])
        w[:n_body] = token_weights(ro.result.spans[i], offsets, weights)
    return w


def rollout_token_advantages(ro, tokenizer, std_norm: bool, weights: tuple[float, float, float] | None) -> np.ndarray:
    """Per-token advantages of all responses of a `Rollouts` batch (verified): group advantages from
    the rewards, times each token's stepwise weight (`response_weights`); weights None = plain GRPO."""
    adv = ro.flat(group_advantages(ro.by_group(ro.result.reward), std_norm))
    return token_advantages(adv, [response_weights(ro, i, tokenizer, weights) for i in range(len(ro.response_ids))])


def critical_token_mask(ro, tokenizer) -> np.ndarray:
    """Bool per response token (all responses, concatenated): the tokens where the judge decides —
    the first token (the answered grade, answer-first), and in well-formed responses the boxed values
    of steps 4-8 and the final grade (the tokens Stepwise-GRPO weights). Entropy measured here is
    what the paper's Figure 4 compares; the all-token mean dilutes it ~18x."""
    parts = []
    for i, ids in enumerate(ro.response_ids):
        mask = response_weights(ro, i, tokenizer, (2.0, 2.0, 2.0)) != 1.0
        if len(ids):
            mask[0] = True
        parts.append(mask)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
