"""SFT batches: deterministic epoch permutations, so a resumed run sees the same batches."""
from afrl_fast.sft import sft_batches


def test_sft_batches_are_deterministic_epoch_permutations():
    a = sft_batches(50, 8, 2.0, seed=3)
    assert a == sft_batches(50, 8, 2.0, seed=3) and a != sft_batches(50, 8, 2.0, seed=4)
    assert len(a) == 12 and all(len(b) == 8 for b in a)
    first_epoch = sum(a[:6], [])
    assert len(set(first_epoch)) == 48
    assert sft_batches(50, 8, 0.0, seed=3) == []
