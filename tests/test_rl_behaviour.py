"""RL learns in the right direction: a toy bandit through the real step API (afrl_fast.rl.step).

The other RL tests compare the loss with the project's own float64 reference, so a sign error shared
by the loss, its reference, the advantages or the optimizer path would pass them. This one asks only
what RL is for: a 1-layer model over a 64-token vocabulary answers 4 prompts; a response whose first
token lies in a fixed set of 8 tokens earns reward +1, any other −1 (the verifier is replaced by
that rule; everything else — rollouts from the embedded engine, group advantages, the fused loss,
AdamW — is the trainer's own). After a few steps the probability of the rewarded set must rise; with
the reward negated it must fall. Each arm runs in seconds.
"""
import copy

import numpy as np
import pytest
import torch

import afrl_fast.rl as rl_module
from afrl_fast.config import DEMO_CONFIG, load_config
from afrl_fast.curriculum import Stage
from afrl_fast.dist import DistInfo
from afrl_fast.format import load_tokenizer
from afrl_fast.observe import Timer
from afrl_fast.optim import make_optimizer
from afrl_fast.rl import RLContext, step
from afrl_fast.rollouts import TrainerEngine
from afrl_fast.rulebook import load_rulebook
from afrl_fast.run_policy import build_policy
from afrl_fast.verify import VerifyResult

INFO = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
VOCAB = 64
REWARDED = list(range(20, 28))                # 8 of 64 tokens: ~1/8 of the first tokens at the start
STEPS = 6
SETTINGS = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.head_dim=16", "model.intermediate_size=64", "rl.group_size=8", "rl.max_new_tokens=2",
            "rl.batch_prompts=4", "rl.temperature=1.0", "rl.top_p=1.0", "rl.lr=3e-2", "rl.kl_coef=0.0",
            "rl.sft_batch=1"]


def bandit_verifier(sign: float, tokenizer):
    """verify_batch's stand-in: reward sign·(+1) when the response's first character is one of the
    rewarded tokens' (ids below 64 are single ASCII characters in the Qwen3 vocabulary), else −sign."""
    rewarded_chars = {tokenizer.decode([i]) for i in REWARDED}
    assert len(rewarded_chars) == len(REWARDED) and all(len(c) == 1 for c in rewarded_chars)

    def verify(texts, labels, rulebook, reward_config):
        n = len(texts)
        hit = np.array([t[:1] in rewarded_chars for t in texts])
        return VerifyResult(fmt=np.zeros(n, bool), cst=np.zeros(n, bool), logic=np.zeros(n, bool),
                            y_dec=np.full(n, -1, np.int8), y_final=np.full(n, -1, np.int8),
                            y_hat=np.full(n, -1, np.int8), values=np.full((n, 5), -1, np.int8),
                            reward=np.where(hit, sign, -sign).astype(np.float32),
                            spans=np.full((n, 7, 2), -1, np.int32))
    return verify


def rewarded_probability(policy, prompts) -> float:
    """Mean over prompts of P(first response token ∈ REWARDED), from the policy's own logits."""
    with torch.no_grad():
        logits = policy.lm(input_ids=torch.tensor(prompts)).logits[:, -1].float()
    return float(torch.softmax(logits, -1)[:, REWARDED].sum(-1).mean())


def train_bandit(mode: str, sign: float, tmp_path, monkeypatch) -> tuple[float, float]:
    tok = load_tokenizer()
    monkeypatch.setattr(rl_module, "verify_batch", bandit_verifier(sign, tok))
    cfg = load_config(DEMO_CONFIG, SETTINGS + [f"rl.mode={mode}"])
    torch.manual_seed(0)
    prompts = torch.randint(30, VOCAB, (4, 6)).tolist()
    policy = build_policy(cfg, VOCAB, INFO)
    ref = build_policy(cfg, VOCAB, INFO, {k[3:]: v for k, v in copy.deepcopy(policy.state_dict()).items()},
                       trainable=False)
    # the SFT anchor (mode_balanced only) teaches a token outside the rewarded set, so it cannot
    # be what raises the rewarded probability; its weight is small against the RL term
    ctx = RLContext(cfg=cfg, info=INFO, policy=policy, ref_policy=ref,
                    engine=TrainerEngine("embedded", policy, tok, INFO, tmp_path / "engine"),
                    optimizer=make_optimizer(policy, cfg.rl.lr, 0.0), tokenizer=tok, rulebook=load_rulebook(),
                    prompts=prompts, labels=[0] * 4, sft_examples=[(p, [40, 41]) for p in prompts], pad_id=0,
                    timer=Timer())
    before = rewarded_probability(policy, prompts)
    stage = Stage("bandit", [0, 1, 2, 3], 1.0, 0.05, {})
    for t in range(STEPS):
        step(ctx, stage, [0, 1, 2, 3], step_no=t + 1)
    return before, rewarded_probability(policy, prompts)


@pytest.mark.parametrize("mode", ["grpo", "stepwise_grpo", "mode_balanced"])
def test_the_rewarded_answer_becomes_more_likely(mode, tmp_path, monkeypatch):
    before, after = train_bandit(mode, +1.0, tmp_path, monkeypatch)
    assert after > before + 0.15, (before, after)


@pytest.mark.parametrize("mode", ["grpo", "mode_balanced"])
def test_with_the_reward_negated_it_becomes_less_likely(mode, tmp_path, monkeypatch):
    before, after = train_bandit(mode, -1.0, tmp_path, monkeypatch)
    assert after < before - 0.05, (before, after)
