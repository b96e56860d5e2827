"""The policy module and one RL update against a plain full-logits computation with the HF model."""
import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from afrl_fast.grpo import rollout_token_advantages
from afrl_fast.policy import LossSettings, PolicyLoss, loss_backward, pack_sequences
from afrl_fast.rl import mode_balanced_rows
from afrl_fast.rollouts import Rollouts
from afrl_fast_kernels.reference import rowwise_loss_reference


def tiny_lm(seed=0, vocab=300):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    return Qwen3ForCausalLM(cfg).double()


def random_sequences(rng, n, vocab=300):
    prompts = [rng.integers(1, vocab, rng.integers(2, 9)).tolist() for _ in range(n)]
    responses = [rng.integers(1, vocab, rng.integers(1, 7)).tolist() for _ in range(n)]
    return prompts, responses


def full_logits_logp(lm, prompts, responses):
    """log p of every response token from one unpadded forward per sequence (the plain way)."""
    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        logits = lm(input_ids=ids).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        out.append(torch.stack([lp[len(p) + j - 1, t] for j, t in enumerate(r)]))
    return torch.cat(out)


def test_pack_sequences_layout():
    b = pack_sequences([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.targets.tolist() == [1, 2, 3, 4, 9]
    assert b.pred_index.tolist() == [2, 3, 5, 6, 7]  # hidden at t-1 predicts token t
    assert b.seq.tolist() == [0, 0, 1, 1, 1] and b.pos.tolist() == [0, 1, 0, 1, 2]


def test_policy_logprobs_match_the_models_own_logits():
    lm = tiny_lm()
    rng = np.random.default_rng(0)
    prompts, responses = random_sequences(rng, 5)
    policy = PolicyLoss(lm, loss_backend="torch")
    with torch.no_grad():
        logp, entropy = policy(pack_sequences(prompts, responses, pad_id=0), mode="logprobs")
        want = full_logits_logp(lm, prompts, responses)
    np.testing.assert_allclose(logp.numpy(), want.numpy(), rtol=1e-6, atol=1e-8)
    assert torch.all(entropy > 0)


@pytest.mark.parametrize("micro_batch", [0, 2])
def test_rl_update_equals_full_logits_objective(micro_batch):
    """α·Σ_RL L_GRPO/#RL + γ·Σ_SFT (−log p)/#SFT, value and gradient, RL and SFT rows in one batch
    (or accumulated over micro-batches of 2 sequences, one of them mixing RL and SFT rows)."""
    rng = np.random.default_rng(1)
    lm = tiny_lm(1)
    rl_prompts, rl_responses = random_sequences(rng, 4)
    sft_examples = list(zip(*random_sequences(rng, 3)))
    n_rl = sum(map(len, rl_responses))
    adv = rng.normal(size=n_rl).astype(np.float32) * 3
    with torch.no_grad():
        cur = full_logits_logp(lm, rl_prompts, rl_responses).float()
    old = cur + torch.tensor(rng.normal(scale=0.3, size=n_rl), dtype=torch.float32)  # ratios far from 1: clipping
    ref = cur + torch.tensor(rng.normal(scale=0.3, size=n_rl), dtype=torch.float32)
    settings = LossSettings(kl_coef=0.05, eps_low=0.2, eps_high=0.28, temperature=1.0)
    alpha, gamma = 0.9, 0.1
    n_sft = sum(len(e[1]) for e in sft_examples)

    policy = PolicyLoss(lm, loss_backend="torch")
    rows = mode_balanced_rows(adv, old, ref, n_sft, grpo_weight=alpha, sft_weight=gamma, n_rl_global=n_rl,
                              n_sft_global=n_sft, world=1)
    stats, pass_logp = loss_backward(policy, rl_prompts + [e[0] for e in sft_examples],
                                     rl_responses + [e[1] for e in sft_examples], rows, settings, pad_id=0,
                                     device=torch.device("cpu"), micro_batch=micro_batch)
    np.testing.assert_allclose(pass_logp[:n_rl].numpy(), cur.numpy(), rtol=1e-5, atol=1e-6)
    got_grad = lm.model.embed_tokens.weight.grad.clone()

    lm.zero_grad()
    lp_rl = full_logits_logp(lm, rl_prompts, rl_responses)
    lp_sft = full_logits_logp(lm, [e[0] for e in sft_examples], [e[1] for e in sft_examples])
    row, _, _ = rowwise_loss_reference(lp_rl, torch.zeros(n_rl, dtype=torch.bool), torch.tensor(adv).double(),
                                       old.double(), ref.double(), settings.kl_coef, settings.eps_low,
                                       settings.eps_high)
    want = alpha * row.sum() / n_rl + gamma * (-lp_sft).sum() / n_sft
    want.backward()
    np.testing.assert_allclose(stats.loss, want.item(), rtol=1e-6)
    np.testing.assert_allclose(got_grad.numpy(), lm.model.embed_tokens.weight.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert stats.n_rl == n_rl and 0 < stats.clipped < n_rl


def test_entropy_at_the_critical_rows_equals_the_full_softmax_entropy_there():
    rng = np.random.default_rng(2)
    lm = tiny_lm(2)
    prompts, responses = random_sequences(rng, 3)
    n = sum(map(len, responses))
    critical = torch.as_tensor(rng.random(n) < 0.3)
    critical[0] = True
    rows = mode_balanced_rows(np.zeros(n, np.float32), None, torch.zeros(n), 0, grpo_weight=1.0, sft_weight=0.0,
                              n_rl_global=n, n_sft_global=0, world=1)
    stats, _ = loss_backward(PolicyLoss(lm, loss_backend="torch"), prompts, responses, rows, LossSettings(),
                             pad_id=0, device=torch.device("cpu"), critical=critical)
    with torch.no_grad():       # independent: every response position's full-vocabulary softmax entropy
        ents = []
        for p, r in zip(prompts, responses):
            logits = lm(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:len(p) + len(r) - 1].double()
            ents.append(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
        ent = torch.cat(ents)
    assert stats.n_critical == int(critical.sum())
    np.testing.assert_allclose(stats.entropy_critical, float(ent[critical].sum()), rtol=1e-5)
    np.testing.assert_allclose(stats.entropy_all, float(ent.sum()), rtol=1e-5)


def test_token_advantages_put_the_weights_on_the_critical_tokens():
    from afrl_fast.format import load_tokenizer
    from afrl_fast.rulebook import load_rulebook
    from afrl_fast.format import render_trace
    from afrl_fast.verify import verify_batch

    tok, rb = load_tokenizer(), load_rulebook()
    values = {"intent": "partial", "entity": "consistent", "time": "current", "source": "high", "coverage": "partial"}
    text = render_trace(rb, rb.expected_label(values), values)
    ids = tok.encode(text, add_special_tokens=False)
    wrong = text.replace("\\boxed{partial}", "\\boxed{full}", 1)
    ids2 = tok.encode(wrong, add_special_tokens=False)
    res = verify_batch([text, wrong], [2, 2], rb)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    # the first response finished on EOS (which keeps weight 1), the second hit the token limit
    ro = Rollouts([0, 0], [[1], [1]], [ids + [eos], ids2], [[], []], [text, wrong], np.array([2, 2]), [True, False],
                  res, group_size=2)
    adv = rollout_token_advantages(ro, tok, std_norm=False, weights=(10.0, 10.0, 5.0))
    first = adv[:len(ids)]
    a0 = (res.reward[0] - res.reward[1]) / 2
    assert adv[len(ids)] == pytest.approx(a0)          # the closing EOS: weight 1
    assert a0 > 0
    weighted = {tok.decode([t]) for t, a in zip(ids, first) if abs(a - a0) > 1e-6}
    assert {"2", "partial", "consistent", "current", "high"} <= weighted
    np.testing.assert_allclose(sorted(set(np.round(first / a0, 4))), [1.0, 5.0, 10.0])
    plain = rollout_token_advantages(ro, tok, std_norm=False, weights=None)
    np.testing.assert_allclose(plain[:len(ids)], a0)


def test_a_format_failure_spreads_its_advantage_evenly():
    """The −1 format penalty says nothing about the grade: no token of a broken trace is up-weighted,
    not even the decision digit the verifier could still read."""
    from afrl_fast.format import load_tokenizer, render_trace
    from afrl_fast.rulebook import load_rulebook
    from afrl_fast.verify import verify_batch

    tok, rb = load_tokenizer(), load_rulebook()
    values = {"intent": "full", "entity": "consistent", "time": "current", "source": "high", "coverage": "complete"}
    good = render_trace(rb, rb.expected_label(values), values)
    broken = good.replace("Step 5", "Step five", 1)
    res = verify_batch([good, broken], [rb.expected_label(values)] * 2, rb)
    assert res.fmt.tolist() == [True, False] and res.y_dec[1] == rb.expected_label(values)
    ids = [tok.encode(t, add_special_tokens=False) for t in (good, broken)]
    ro = Rollouts([0, 0], [[1], [1]], ids, [[], []], [good, broken], np.array([2, 2]), [False, False], res, group_size=2)
    adv = rollout_token_advantages(ro, tok, std_norm=False, weights=(10.0, 10.0, 5.0))
    a1 = (res.reward[1] - res.reward[0]) / 2
    np.testing.assert_allclose(adv[len(ids[0]):], a1)
