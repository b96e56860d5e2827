"""Config loading and overrides, group advantages, difficulty buckets and the curriculum."""
import re

import numpy as np
import pytest

from afrl_fast.config import DEMO_CONFIG, ConfigError, StageConfig, load_config
from afrl_fast.curriculum import build_stages, difficulty_bucket, stage_batch, stage_schedule
from afrl_fast.grpo import group_advantages, token_advantages
from afrl_fast.sft import lr_at, sft_batches


def test_demo_and_gpu_configs_load(tmp_path):
    demo = load_config(DEMO_CONFIG)
    assert demo.model.tokenizer == "qwen3" and demo.rl.group_size == 8
    gpu = load_config(DEMO_CONFIG.parent / "gpu_qwen3.yaml")
    # the paper's Table 7 and Table 8 values
    assert (gpu.rl.lr, gpu.rl.batch_prompts, gpu.rl.group_size, gpu.rl.beta) == (1e-6, 256, 8, 0.001)
    assert (gpu.rl.eps_low, gpu.rl.eps_high, gpu.rl.temperature) == (0.2, 0.2, 1.0)
    assert gpu.rl.token_weights == [10.0, 10.0, 5.0]
    assert [(s.alpha, s.gamma) for s in gpu.rl.stages] == [(0.85, 0.15), (0.90, 0.10), (0.95, 0.05)]
    assert (gpu.data.max_prompt_tokens, gpu.data.max_response_tokens) == (4096, 1024)


def test_dotted_overrides_and_errors():
    cfg = load_config(DEMO_CONFIG, ["rl.beta=0", "rl.stages.1.alpha=0.5", "rl.token_weights=[1,2,3]"])
    assert cfg.rl.beta == 0 and cfg.rl.stages[1].alpha == 0.5 and cfg.rl.token_weights == [1, 2, 3]
    assert isinstance(cfg.rl.stages[0], StageConfig)
    for bad, needle in [("rl.betaa=0", "rl.betaa"), ("rl.beta=high", "rl.beta"), ("rl.mode=ppo", "rl.mode"),
                        ("nonsense", "key=value"), ("rl.mini_batches=3", "mini_batches")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(DEMO_CONFIG, [bad])


def test_group_advantages_match_an_explicit_loop():
    rng = np.random.default_rng(1)
    r = rng.normal(size=6 * 8)
    adv = group_advantages(r, 8)
    for g in range(6):
        grp = r[g * 8:(g + 1) * 8]
        want = (grp - grp.mean()) / (np.std(grp, ddof=1) + 1e-6)
        np.testing.assert_allclose(adv[g * 8:(g + 1) * 8], want, rtol=1e-5)
    flat = group_advantages(np.ones(16), 8)
    assert np.all(flat == 0), "equal rewards carry no signal, and no NaN"
    no_std = group_advantages(r, 8, std_norm=False)
    np.testing.assert_allclose(no_std[:8], r[:8] - r[:8].mean(), rtol=1e-5)
    with pytest.raises(ValueError):
        group_advantages(np.ones(7), 8)


def test_token_advantages_scale_by_weights():
    out = token_advantages(np.array([2.0, -1.0]), [np.array([10, 1, 1]), np.array([1, 5])])
    np.testing.assert_allclose(out, [20, 2, 2, -1, -5])


@pytest.mark.parametrize("n, want", [(8, "easy"), (7, "easy"), (6, "medium"), (2, "medium"), (1, "hard"),
                                     (0, "dropped")])
def test_difficulty_buckets_follow_the_paper(n, want):
    assert difficulty_bucket(n) == want
    assert difficulty_bucket(n, drop_unsolved=False) == ("hard" if want == "dropped" else want)


def test_stages_follow_composition_and_schedule():
    buckets = {"easy": list(range(0, 10)), "medium": list(range(10, 110)), "hard": list(range(110, 190))}
    cfgs = [StageConfig(easy=0.044, medium=0.556, hard=0.4, alpha=0.85, gamma=0.15),
            StageConfig(easy=0.033, medium=0.410, hard=0.557, size=50, alpha=0.9, gamma=0.1)]
    stages = build_stages(buckets, cfgs, seed=0)
    s1, s2 = stages
    assert len(set(s1.prompts)) == len(s1.prompts)
    frac_hard = np.mean([p >= 110 for p in s1.prompts])
    assert abs(frac_hard - 0.4) < 0.03 and len(s1.prompts) > 150
    assert abs(len(s2.prompts) - 50) <= 2 and (s1.alpha, s2.gamma) == (0.85, 0.1)
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


def test_sft_batches_are_deterministic_epoch_permutations():
    a = sft_batches(50, 8, 2.0, seed=3)
    assert a == sft_batches(50, 8, 2.0, seed=3) and a != sft_batches(50, 8, 2.0, seed=4)
    assert len(a) == 12 and all(len(b) == 8 for b in a)
    first_epoch = sum(a[:6], [])
    assert len(set(first_epoch)) == 48
    assert sft_batches(50, 8, 0.0, seed=3) == []
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


LIST_KEYS = {"rl.stages.1.alpha": "rl.stages[1].alpha", "rl.stages.0.epochs": "rl.stages[0].epochs",
             "rl.token_weights.2": "rl.token_weights[2]"}   # override syntax -> how the error names it


def _numeric_keys():
    from afrl_fast.config import NUMERIC_RANGES
    return sorted(NUMERIC_RANGES) + list(LIST_KEYS)


@pytest.mark.parametrize("key", _numeric_keys())
def test_every_numeric_field_is_range_checked_at_load(key):
    """Negative, NaN and infinite values fail at config check with the key named, not minutes
    into a run (sft.lr=-1 used to fail after the data and model were built)."""
    from omegaconf import OmegaConf
    default = OmegaConf.select(OmegaConf.structured(load_config(None)), key)
    assert isinstance(default, (int, float)) and not isinstance(default, bool), (key, default)
    bad = ["-1"] + ([".nan", ".inf"] if isinstance(default, float) else [])
    for value in bad:
        with pytest.raises(ConfigError, match=re.escape(LIST_KEYS.get(key, key))):
            load_config(None, [f"{key}={value}"])


def test_numeric_ranges_name_real_fields():
    from afrl_fast.config import NUMERIC_RANGES
    cfg = load_config(None)
    for key in NUMERIC_RANGES:
        section, name = key.split(".")
        assert hasattr(getattr(cfg, section), name), key


def test_pred_gate_reward_is_checked_with_the_config():
    assert load_config(None, ["rl.gate=pred", "rl.reward_gamma=0.5"]).rl.gate == "pred"
    with pytest.raises(ConfigError, match="rl.reward_gamma"):
        load_config(None, ["rl.gate=pred", "rl.reward_gamma=0.7"])
