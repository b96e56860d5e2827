"""The reward settings of paper Eq. 6 (weights, ordinal slope, gate), checked on construction.

Apart from the numba verifier (afrl_fast.verify) that applies them, so that checking a config does not
compile or import numba.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .rulebook import LABELS

GATES = ("literal", "pred")
MAX_DISTANCE = LABELS[-1] - LABELS[0]   # the largest |y_pred − y_gt|


@dataclass(frozen=True)
class RewardConfig:
    """Coefficients of Eq. 6 and the gate.

    alpha, beta: the paper's weights of R_res and R_cot (0.72 / 0.28).
    gamma: the ordinal slope (the paper does not give its value): R_res = 1 − γ·d with
        d = |y_pred − y_gt|, so γ = 0.5 spans +1 (exact) to −1 (four grades off).
    format_penalty: the reward of a response that breaks the format (replaces Eq. 6).
    gate: "literal" is the paper's I_logic (ŷ == y_pred and ŷ == y_gt). A passing gate then
        implies d = 0, and rewards are exactly the paper's: α + β (= 1.0), 0 for a failed gate,
        or the penalty.
        "pred" checks only ŷ == y_pred (the trace supports the answer given), which makes the
        ordinal term reachable. One ordering rule holds over every outcome:

            format failure  <  cst or logic gate failure  <  passing, d = 4 < … < d = 1 < d = 0

        passing:      R = α·(1 − γ·d) + β·[d = 0]   (R_cot is granted only to a correct answer:
                      the trace supports the correct conclusion)
        gate failure: halfway between the format penalty and the worst passing value α·(1 − 4γ),
                      so breaking the reasoning never pays more than a consistent answer, however
                      far off, and never as little as breaking the format.

        With the defaults (α 0.72, β 0.28, γ 0.5, penalty −1):

            outcome              literal   pred
            format fails         −1        −1
            cst/logic fails       0        −0.86
            passes, d = 0         1.0       1.0
            passes, d = 1         —         0.36
            passes, d = 2         —         0.0
            passes, d = 3         —        −0.36
            passes, d = 4         —        −0.72

        Eq. 7 as printed (R_res = −γ·d when wrong) would give a gate failure (0) more than a
        consistent answer one grade off (−0.08) and put four grades off (−1.16) below the format
        penalty; hence the shifted slope and the placed gate-failure value. A config whose worst
        passing value α·(1 − 4γ) is not above the penalty (γ above 0.597 with the other defaults),
        or with α = 0 or γ = 0 (no ordering by distance), is rejected.
    An unknown label (y_gt = −1) fails the gate under both settings: the literal gate cannot hold,
    and under "pred" R_res would be undefined, so the response earns the gate-failure value unless
    the format fails.
    """
    alpha: float = 0.72
    beta: float = 0.28
    gamma: float = 0.5
    format_penalty: float = -1.0
    gate: str = "literal"

    def __post_init__(self):
        for name in ("alpha", "beta", "gamma", "format_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RewardConfig.{name} must be a finite number, got {value!r}")
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise ValueError(f"RewardConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.gate not in GATES:
            raise ValueError(f"RewardConfig.gate must be one of {GATES}, got {self.gate!r}")
        if self.gate == "pred":
            if self.alpha <= 0 or self.gamma <= 0:
                raise ValueError(f"RewardConfig: gate 'pred' orders answers by their distance to the label, which "
                                 f"needs alpha > 0 and gamma > 0 (got {self.alpha!r}, {self.gamma!r})")
            if not self.worst_passing_reward > self.format_penalty:
                raise ValueError(f"RewardConfig: with gate 'pred' an answer {MAX_DISTANCE} grades off earns "
                                 f"alpha*(1 - {MAX_DISTANCE}*gamma) = {self.worst_passing_reward:.4g}, not above "
                                 f"format_penalty={self.format_penalty!r}; lower gamma (or the penalty)")
        elif not self.format_penalty < 0:
            raise ValueError(f"RewardConfig.format_penalty must be below 0, the reward of a failed gate, "
                             f"got {self.format_penalty!r}")

    @property
    def worst_passing_reward(self) -> float:
        """α·(1 − γ·d) at the largest distance d between two grades."""
        return self.alpha * (1.0 - self.gamma * MAX_DISTANCE)

    @property
    def gate_failure_reward(self) -> float:
        """The literal gate keeps the paper's 0; "pred" sits halfway between the format penalty and
        the worst passing answer (see the class docstring)."""
        if self.gate == "literal":
            return 0.0
        return 0.5 * (self.format_penalty + self.worst_passing_reward)
