"""Config loading, dotted overrides and their errors."""
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
