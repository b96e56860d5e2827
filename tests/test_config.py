"""Config loading, dotted overrides and their errors."""
import re

import pytest

from afrl_fast.config import DEMO_CONFIG, ConfigError, StageConfig, load_config


def test_demo_and_gpu_configs_load(tmp_path):
    demo = load_config(DEMO_CONFIG)
    assert demo.model.tokenizer == "qwen3" and demo.rl.group_size == 8
    gpu = load_config(DEMO_CONFIG.parent / "gpu_qwen3.yaml")
    # the paper's Table 7 and Table 8 values
    assert (gpu.rl.lr, gpu.rl.batch_prompts, gpu.rl.group_size, gpu.rl.kl_coef) == (1e-6, 256, 8, 0.001)
    assert (gpu.rl.eps_low, gpu.rl.eps_high, gpu.rl.temperature) == (0.2, 0.2, 1.0)
    assert gpu.rl.token_weights == [10.0, 10.0, 5.0]
    assert [(s.grpo_weight, s.sft_weight) for s in gpu.rl.stages] == [(0.85, 0.15), (0.90, 0.10), (0.95, 0.05)]
    assert (gpu.data.max_prompt_tokens, gpu.data.max_response_tokens) == (4096, 1024)
    # paper §3.6: stage 3 trains hard and previously failed samples with more epochs
    assert gpu.rl.stages[2].epochs > 1 and gpu.rl.fold_failed_into_last_stage


def test_dotted_overrides_and_errors():
    cfg = load_config(DEMO_CONFIG, ["rl.kl_coef=0", "rl.stages.1.grpo_weight=0.5", "rl.token_weights=[1,2,3]"])
    assert cfg.rl.kl_coef == 0 and cfg.rl.stages[1].grpo_weight == 0.5 and cfg.rl.token_weights == [1, 2, 3]
    assert isinstance(cfg.rl.stages[0], StageConfig)
    for bad, needle in [("rl.kl_coeff=0", "rl.kl_coeff"), ("rl.kl_coef=high", "rl.kl_coef"), ("rl.mode=ppo", "rl.mode"),
                        ("nonsense", "key=value"), ("rl.mini_batches=3", "mini_batches")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(DEMO_CONFIG, [bad])


LIST_KEYS = {"rl.stages.1.grpo_weight": "rl.stages[1].grpo_weight", "rl.stages.0.epochs": "rl.stages[0].epochs",
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
    assert load_config(None, ["rl.gate=pred", "rl.reward_ordinal_slope=0.5"]).rl.gate == "pred"
    with pytest.raises(ConfigError, match="rl.reward_ordinal_slope"):
        load_config(None, ["rl.gate=pred", "rl.reward_ordinal_slope=0.7"])


def test_every_shipped_training_config_loads_and_validates():
    from afrl_fast.config import load_distill_config

    for path in sorted(DEMO_CONFIG.parent.glob("*.yaml")):
        (load_distill_config if path.name.startswith("distill") else load_config)(path)


def test_the_headroom_recipe_splits_the_roles():
    cfg = load_config(DEMO_CONFIG.parent / "headroom_cpu.yaml")
    assert cfg.data.n_rl_pool > cfg.data.n_train and cfg.data.train_tail_share < cfg.data.rl_pool_tail_share
    assert cfg.difficulty.correct == "verified_trace" and cfg.data.n_eval >= 800


def test_eval_splits_name_any_split_of_a_data_dir_and_only_the_generators_without_one():
    from afrl_fast.config import load_distill_config

    assert load_config(DEMO_CONFIG).eval.splits == ["industry", "longtail"]        # the synthetic default
    assert load_config(DEMO_CONFIG, ["data.dir=mine", "eval.splits=[head,tail]"]).eval.splits == ["head", "tail"]
    assert load_config(DEMO_CONFIG, ["eval.splits=[longtail,train]"]).eval.splits == ["longtail", "train"]
    with pytest.raises(ConfigError) as err:
        load_config(DEMO_CONFIG, ["eval.splits=[head,longtail]"])
    msg = str(err.value)
    assert msg.startswith("eval.splits: 'head':") and "data.dir" in msg and "head.parquet" in msg
    assert "\n" not in msg and "longtail.parquet" not in msg
    for bad, needle in [("[../x]", "'../x' is not a split name"), ("[head,Head]", "names a split twice"),
                        ("['']", "'' is not a split name")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config(DEMO_CONFIG, ["data.dir=mine", f"eval.splits={bad}"])
    # distillation always reads a data.dir: any names there, the same name checks
    distill = ["teacher.path=t", "data.dir=d"]
    assert load_distill_config(None, [*distill, "eval.splits=[head]"]).eval.splits == ["head"]
    with pytest.raises(ConfigError, match="not a split name"):
        load_distill_config(None, [*distill, "eval.splits=[a/b]"])
