"""One Mode-Balanced RL step (afrl_fast.rl.step) on a tiny Qwen3 with the real tokenizer: the
on-policy shortcut (old log-probs from the loss pass itself) makes the same update as a separate
forward of the old policy, and the step's record carries every phase's timer."""
import copy

import numpy as np
import pytest
import torch

from afrl_fast.config import DEMO_CONFIG, load_config
from afrl_fast.curriculum import Stage
from afrl_fast.data import synthesize
from afrl_fast.dist import DistInfo
from afrl_fast.format import build_prompt, instructions_text, load_tokenizer
from afrl_fast.observe import Timer
from afrl_fast.optim import make_optimizer
from afrl_fast.rl import RLContext, step
from afrl_fast.rollouts import TrainerEngine
from afrl_fast.rulebook import load_rulebook

INFO = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
        "model.head_dim=16", "model.intermediate_size=64", "rl.group_size=4", "rl.max_new_tokens=8",
        "rl.sft_batch=2", "rl.batch_prompts=2", "rl.temperature=0.9", "rl.lr=1e-3", "rl.kl_coef=0.05"]


@pytest.fixture(scope="module")
def world():
    tok, rb = load_tokenizer(), load_rulebook()
    table = synthesize(4, seed=0, rulebook=rb)
    text = instructions_text(rb, "short")
    prompts = [tok.encode(build_prompt(tok, rb, q, d, text), add_special_tokens=False)
               for q, d in zip(table.column("query").to_pylist(), table.column("document").to_pylist())]
    traces = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in table.column("trace").to_pylist()]
    return tok, rb, prompts, table.column("label").to_pylist(), list(zip(prompts, traces))


def run_step(world, tmp_path, shortcut: bool, mode: str = "mode_balanced"):
    from afrl_fast.run_policy import build_policy
    tok, rb, prompts, labels, sft = world
    cfg = load_config(DEMO_CONFIG, TINY + [f"rl.on_policy_shortcut={str(shortcut).lower()}", f"rl.mode={mode}"])
    torch.manual_seed(0)
    policy = build_policy(cfg, 151936, INFO)
    ref = build_policy(cfg, 151936, INFO, {k[3:]: v for k, v in copy.deepcopy(policy.state_dict()).items()},
                       trainable=False)
    ctx = RLContext(cfg=cfg, info=INFO, policy=policy, ref_policy=ref,
                    engine=TrainerEngine("embedded", policy, tok, INFO, tmp_path / "engine"),
                    optimizer=make_optimizer(policy, cfg.rl.lr, 0.0), tokenizer=tok, rulebook=rb, prompts=prompts,
                    labels=labels, sft_examples=sft, pad_id=tok.pad_token_id, timer=Timer())
    before = {k: v.detach().clone() for k, v in policy.named_parameters()}
    out = step(ctx, Stage("rl1", [0, 1, 2, 3], 0.9, 0.1, {}), [1, 3], step_no=1)
    run_step.before = before
    return out, {k: v.detach().clone() for k, v in policy.named_parameters()}


@pytest.mark.parametrize("mode", ["mode_balanced", "grpo"])
def test_on_policy_shortcut_makes_the_update_of_a_separate_old_policy_forward(world, tmp_path, mode):
    fast, w_fast = run_step(world, tmp_path / "a", shortcut=True, mode=mode)
    slow, w_slow = run_step(world, tmp_path / "b", shortcut=False, mode=mode)
    assert fast.rollouts.texts == slow.rollouts.texts          # same samples
    for k in w_fast:
        torch.testing.assert_close(w_fast[k], w_slow[k], rtol=1e-5, atol=1e-7, msg=k)
    for key in ("loss", "reward/mean", "policy/entropy", "policy/kl", "optim/grad_norm"):
        np.testing.assert_allclose(fast.record[key], slow.record[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert fast.record["policy/clip_frac"] == 0.0
    for phase in ("rollout", "verify", "advantages", "logprobs", "loss", "optimizer", "sync"):
        assert f"time/{phase}" in fast.record


def test_step_changes_the_weights_and_reports_the_engine_gap(world, tmp_path):
    out, after = run_step(world, tmp_path, shortcut=True)
    assert any(not torch.equal(after[k], run_step.before[k]) for k in after)
    assert out.record["policy/dlogp_engine"] < 1e-3       # engine and trainer agree on the sampled tokens
    assert len(out.rollouts.texts) == 2 * 4 and out.record["step"] == 1
    assert 0.0 <= out.record["acc/unsolved_prompts"] <= 1.0


def test_bucket_accuracy_counts_each_prompts_rollouts_in_its_bucket():
    from types import SimpleNamespace

    from afrl_fast.rl import bucket_accuracy

    ro = SimpleNamespace(prompt_index=[0, 0, 1, 1, 2, 2, 9, 9], labels=np.array([1, 1, 2, 2, 3, 3, 4, 4]),
                         result=SimpleNamespace(y_dec=np.array([1, 0, 2, 2, 0, 0, 4, 4])))
    got = bucket_accuracy(ro, {0: "easy", 1: "easy", 2: "hard"}, torch.device("cpu"))
    assert got == {"acc/easy": 3 / 4, "acc/hard": 0.0}     # prompt 9 has no bucket; no medium prompt
