"""Difficulty buckets and the three-stage curriculum (paper §3.6, §4.1, Tables 2 and 8).

Acc@8 of a prompt is how many of G = 8 samples of the SFT model answer its grade right in the first
token. Easy: ≥ 7 correct, Medium: 2–6, Hard: exactly 1; prompts nobody answers right are dropped
(no reliable reward signal). Each stage draws prompts from the buckets in its target composition
(Table 2), scaled to the data at hand, and carries its α_t / γ_t (Table 8).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BUCKETS = ("easy", "medium", "hard")


def difficulty_bucket(n_correct: int, easy_min: int = 7, medium_min: int = 2, drop_unsolved: bool = True) -> str:
    """'easy' | 'medium' | 'hard' | 'dropped' from the count of correct samples.
    drop_unsolved=False keeps never-solved prompts in Hard (smoke tests of an untrained model)."""
    if n_correct >= easy_min:
        return "easy"
    if n_correct >= medium_min:
        return "medium"
    if n_correct >= 1 or not drop_unsolved:
        return "hard"
    return "dropped"


@dataclass
class Stage:
    name: str
    prompts: list[int]        # indices into the RL prompt table
    alpha: float
    gamma: float
    composition: dict         # bucket -> count actually drawn


def stage_size(available: dict, fractions: dict, cap: int = 0) -> int:
    """Largest stage whose composition no bucket can't supply (every bucket drawn without repeats)."""
    sizes = [available[b] / f for b, f in fractions.items() if f > 0]
    n = int(min(sizes)) if sizes else 0
    return min(n, cap) if cap > 0 else n


def build_stages(buckets: dict, stage_cfgs, seed: int, random_order: bool = False) -> list[Stage]:
    """buckets: name -> list of prompt indices. Stages may reuse prompts (the paper's stages total
    more prompts than its pool), but inside a stage each prompt appears once."""
    rng = np.random.default_rng(seed)
    stages = []
    for i, sc in enumerate(stage_cfgs):
        want = {"easy": sc.easy, "medium": sc.medium, "hard": sc.hard}
        have = {b: len(buckets.get(b, [])) for b in BUCKETS}
        usable = {b: f for b, f in want.items() if f > 0 and have[b] > 0}
        if not usable:  # every wanted bucket is empty here: take what exists so the stage still trains
            usable = {b: 1.0 for b in BUCKETS if have[b] > 0}
        total = sum(usable.values())
        fractions = {b: f / total for b, f in usable.items()}
        n = stage_size(have, fractions, sc.size)
        counts = {b: int(round(n * f)) for b, f in fractions.items()}
        picked, drawn = [], {}
        for b, c in counts.items():
            c = min(c, have[b])
            picked += list(rng.choice(buckets[b], size=c, replace=False)) if c else []
            drawn[b] = c
        picked = [int(x) for x in rng.permutation(picked)] if picked else []
        stages.append(Stage(f"rl{i + 1}", picked, sc.alpha, sc.gamma, drawn))
    if random_order:
        # the paper's ablation: same prompts and α/γ schedule, order shuffled across stages
        pool = [p for s in stages for p in s.prompts]
        pool = [int(x) for x in rng.permutation(pool)] if pool else []
        start = 0
        for s in stages:
            s.prompts, start = pool[start:start + len(s.prompts)], start + len(s.prompts)
    return stages


def stage_schedule(stages: list[Stage], batch_prompts: int, epochs: list[float]) -> list[tuple[int, int]]:
    """(stage index, batch index within the stage) for every RL step, in order."""
    plan = []
    for i, (s, ep) in enumerate(zip(stages, epochs)):
        n_steps = int(np.ceil(len(s.prompts) * ep / batch_prompts)) if s.prompts else 0
        plan += [(i, j) for j in range(n_steps)]
    return plan


def stage_batch(stage: Stage, batch_index: int, batch_prompts: int) -> list[int]:
    """The prompts of one step: consecutive slices of the stage, wrapping for extra epochs."""
    n = len(stage.prompts)
    start = batch_index * batch_prompts
    return [stage.prompts[(start + k) % n] for k in range(batch_prompts)]
