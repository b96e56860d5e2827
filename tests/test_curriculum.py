"""Difficulty buckets (Acc@8) and the three-stage curriculum."""
import numpy as np
import pytest

from afrl_fast.config import StageConfig
from afrl_fast.curriculum import build_stages, difficulty_bucket, stage_batch, stage_schedule


@pytest.mark.parametrize("n, want", [(8, "easy"), (7, "easy"), (6, "medium"), (2, "medium"), (1, "hard"),
                                     (0, "dropped")])
def test_difficulty_buckets_follow_the_paper(n, want):
    assert difficulty_bucket(n) == want
    assert difficulty_bucket(n, drop_unsolved=False) == ("hard" if want == "dropped" else want)


def test_stages_follow_composition_and_schedule():
    buckets = {"easy": list(range(0, 10)), "medium": list(range(10, 110)), "hard": list(range(110, 190))}
    cfgs = [StageConfig(easy=0.044, medium=0.556, hard=0.4, grpo_weight=0.85, sft_weight=0.15),
            StageConfig(easy=0.033, medium=0.410, hard=0.557, size=50, grpo_weight=0.9, sft_weight=0.1)]
    stages = build_stages(buckets, cfgs, seed=0)
    s1, s2 = stages
    assert len(set(s1.prompts)) == len(s1.prompts)
    frac_hard = np.mean([p >= 110 for p in s1.prompts])
    assert abs(frac_hard - 0.4) < 0.03 and len(s1.prompts) > 150
    assert abs(len(s2.prompts) - 50) <= 2 and (s1.grpo_weight, s2.sft_weight) == (0.85, 0.1)
    plan = stage_schedule(stages, 16, [1.0, 2.0])
    assert plan[0] == (0, 0) and plan.count((1, 0)) == 1
    assert sum(1 for s, _ in plan if s == 1) == int(np.ceil(len(s2.prompts) * 2 / 16))
    batch = stage_batch(s2, 3, 16)  # wraps around for the second epoch
    assert batch == [s2.prompts[(48 + k) % len(s2.prompts)] for k in range(16)]
    shuffled = build_stages(buckets, cfgs, seed=0, random_order=True)
    assert sorted(p for s in shuffled for p in s.prompts) == sorted(p for s in stages for p in s.prompts)
    assert [len(s.prompts) for s in shuffled] == [len(s.prompts) for s in stages]


def test_stage_with_an_empty_bucket_still_trains():
    stages = build_stages({"easy": [], "medium": [1, 2, 3], "hard": []},
                          [StageConfig(easy=0.1, medium=0.5, hard=0.4)], seed=0)
    assert sorted(stages[0].prompts) == [1, 2, 3]
