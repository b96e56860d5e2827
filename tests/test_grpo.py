"""Group-normalised advantages and per-token advantages (stepwise weights)."""
import numpy as np
import pytest

from afrl_fast.grpo import group_advantages, token_advantages


def test_group_advantages_match_an_explicit_loop():
    rng = np.random.default_rng(1)
    r = rng.normal(size=6 * 8)
    adv = group_advantages(r.reshape(6, 8))
    for g in range(6):
        grp = r[g * 8:(g + 1) * 8]
        want = (grp - grp.mean()) / (np.std(grp, ddof=1) + 1e-6)
        np.testing.assert_allclose(adv[g], want, rtol=1e-5)
    flat = group_advantages(np.ones((2, 8)))
    assert np.all(flat == 0), "equal rewards carry no signal, and no NaN"
    no_std = group_advantages(r.reshape(6, 8), std_norm=False)
    np.testing.assert_allclose(no_std[0], r[:8] - r[:8].mean(), rtol=1e-5)
    with pytest.raises(ValueError):
        group_advantages(np.ones(7))


def test_rollouts_own_their_group_layout():
    from afrl_fast.rollouts import Rollouts

    ro = Rollouts([7, 7, 9, 9, 4, 4], [[]] * 6, [[1]] * 6, [[]] * 6, [""] * 6, np.zeros(6, np.int64), [True] * 6,
                  group_size=2)
    assert ro.n_groups == 3 and ro.group_prompts() == [7, 9, 4]
    assert ro.rows_of([2, 0]) == [4, 5, 0, 1]
    grouped = ro.by_group(np.arange(6))
    assert grouped.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert ro.flat(grouped).tolist() == list(range(6))
    with pytest.raises(ValueError):
        ro.by_group(np.arange(5))


def test_token_advantages_scale_by_weights():
    out = token_advantages(np.array([2.0, -1.0]), [np.array([10, 1, 1]), np.array([1, 5])])
    np.testing.assert_allclose(out, [20, 2, 2, -1, -5])


def test_critical_token_mask_marks_the_decisions_and_nothing_else():
    """The critical tokens are the answered grade (first token) and, in a well-formed trace, the
    boxed values of steps 4-8 and the final grade: decoded, they spell exactly those values."""
    from types import SimpleNamespace

    from afrl_fast.data import synthesize
    from afrl_fast.format import load_tokenizer
    from afrl_fast.grpo import critical_token_mask
    from afrl_fast.rulebook import load_rulebook
    from afrl_fast.verify import RewardConfig, verify_batch

    tok, rb = load_tokenizer(), load_rulebook()
    rows = synthesize(2, seed=3, reasons=False).to_pylist()
    texts = [r["trace"] for r in rows] + ["3 not a trace at all"]
    ids = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    result = verify_batch(texts, np.array([r["label"] for r in rows] + [3]), rb, RewardConfig())
    assert result.fmt.tolist() == [True, True, False]
    ro = SimpleNamespace(response_ids=ids, finished=[True] * 3, texts=texts, result=result)
    mask = critical_token_mask(ro, tok)
    assert mask.dtype == bool and len(mask) == sum(len(x) for x in ids)
    starts = np.cumsum([0] + [len(x) for x in ids])
    for i, row in enumerate(rows):
        m = mask[starts[i]:starts[i + 1]]
        picked = "".join(tok.decode([t]) for t, keep in zip(ids[i], m) if keep)
        expected = str(row["label"]) + "".join(result.value_strings(j)[i] for j in range(5)) + str(row["label"])
        assert picked.replace(" ", "") == expected.replace(" ", ""), (picked, expected)
        assert not m[-1]                                             # the EOS is no decision
    broken = mask[starts[2]:starts[3]]
    assert broken[0] and not broken[1:].any()      # a broken trace: only its answered grade
