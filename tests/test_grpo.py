"""Group-normalised advantages and per-token advantages (stepwise weights)."""
import numpy as np
import pytest

from afrl_fast.grpo import group_advantages, token_advantages


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
