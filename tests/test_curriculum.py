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


def test_failed_prompts_join_the_last_stage_once_in_a_fixed_order():
    from afrl_fast.curriculum import Stage, with_failed_prompts
    stage = Stage("rl3", [5, 6, 7], 0.95, 0.05, {"hard": 3})
    grown = with_failed_prompts(stage, [1, 6, 2, 1], seed=0)
    assert sorted(grown.prompts) == [1, 2, 5, 6, 7] and grown.composition == {"hard": 3, "failed": 2}
    assert grown.prompts == with_failed_prompts(stage, [2, 1], seed=0).prompts     # resumable: same order
    assert with_failed_prompts(stage, [], seed=0) is stage


def test_first_token_difficulty_counts_the_first_tokens_a_full_decode_draws():
    """Acc@8 by first token stops each sample after one token; with the same seeds those tokens are
    the ones full decodes start with, so the counts equal the full decodes' first-token counts."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from afrl_fast.config import DEMO_CONFIG, load_config
    from afrl_fast.curriculum import estimate_difficulty
    from afrl_fast.dist import DistInfo
    from afrl_fast.format import label_token_ids, load_tokenizer
    from afrl_fast.engines import EmbeddedEngine
    from afrl_fast.rollouts import STREAM_DIFFICULTY, generate_rollouts, prompt_seed
    from afrl_fast.rulebook import load_rulebook

    tok, rb = load_tokenizer(), load_rulebook()
    torch.manual_seed(0)
    # 20 token ids, the grade digits "0".."4" among them (ids 15-19), so grades are drawn often
    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert max(label_token_ids(tok)) < 20
    engine = EmbeddedEngine(lm, tok)
    prompts = [[1, 2, 3 + i, 4 + i] for i in range(5)]
    labels = [0, 1, 2, 3, 4]
    cfg = load_config(DEMO_CONFIG, ["difficulty.group_size=8", "rl.max_new_tokens=6"])
    info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    counts = estimate_difficulty(engine, tok, rb, prompts, labels, 5, cfg, run_seed=3, info=info)
    full = generate_rollouts(engine, tok, list(range(5)), prompts, labels, group_size=8, temperature=1.0, top_p=1.0,
                             max_new_tokens=6, seeds=[prompt_seed(3, STREAM_DIFFICULTY, 0, i) for i in range(5)])
    label_ids = label_token_ids(tok)
    first = np.array([ids[0] for ids in full.response_ids]).reshape(5, 8)
    want = [(first[i] == label_ids[labels[i]]).sum() for i in range(5)]
    assert counts[:, 0].tolist() == want and sum(want) > 0
    assert (counts[:, 1] == -1).all()      # no format counts: no trace was written
