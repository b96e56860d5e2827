"""The native CPU vocabulary pass (csrc/vocab_pass.cpp) against the float64 reference.

The reference works at the logits level: torch.log_softmax of the float64 logits·inv_temp (RL rows;
SFT rows at temperature 1) gives
log p and the entropy, afrl_fast_kernels.reference.rowwise_loss_reference the per-row loss, and
float64 autograd of Σ scale·L w.r.t. the raw logits the gradient the kernel writes in place.

No skips: CI has g++, so an extension that does not build is a failure.
"""
import logging
import math

import pytest
import torch

from afrl_fast import native_build as native
from afrl_fast.vocab_pass import vocab_pass_native
from afrl_fast_kernels.reference import IGNORE_INDEX, rowwise_loss_reference

HYPER = dict(beta=0.04, eps_low=0.2, eps_high=0.28)


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.native_available(), f"native extension failed to build: {native.native_unavailable_reason()}"


def reference(logits, targets, is_sft, adv, old, ref, scale, *, beta, eps_low, eps_high, inv_temp):
    """float64 (row_loss, logp, entropy, clipped, k3, grad wrt raw logits); ignored rows zero."""
    x = logits.detach().double().requires_grad_(True)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    # RL rows at the sampling temperature, SFT rows at 1 (plain cross-entropy)
    t = torch.where(is_sft, 1.0, inv_temp).double()[:, None]
    logprobs = torch.log_softmax(x * t, dim=-1)
    logp = logprobs.gather(1, safe[:, None]).squeeze(1)
    probs = logprobs.exp()
    entropy = -(probs * logprobs.masked_fill(probs == 0, 0.0)).sum(-1)  # 0·log 0 = 0 (−inf logits)
    row_loss, clipped, k3 = rowwise_loss_reference(
        logp, is_sft, adv.double(), old.double(), None if ref is None else ref.double(),
        beta, eps_low, eps_high)
    zero = torch.zeros((), dtype=torch.float64)
    row_loss = torch.where(valid, row_loss * scale.double(), zero)
    row_loss.sum().backward()
    return (row_loss.detach(), torch.where(valid, logp, zero).detach(),
            torch.where(valid, entropy, zero).detach(), clipped & valid,
            torch.where(valid, k3, zero).detach(), x.grad)


def make_inputs(c, v, *, seed=0, center=0.0, spread=3.0, sft_frac=0.5, ignore_frac=0.2,
                with_ref=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (center + spread * torch.randn(c, v, generator=g)).to(dtype)
    targets = torch.randint(0, v, (c,), generator=g)
    targets[torch.rand(c, generator=g) < ignore_frac] = IGNORE_INDEX
    is_sft = torch.rand(c, generator=g) < sft_frac
    adv = torch.randn(c, generator=g)
    # old / ref near the true log p so ratios straddle the clip range and k3 is O(1)
    true = torch.log_softmax(logits.double() * 1.0, -1).gather(
        1, targets.clamp(min=0)[:, None]).squeeze(1).float()
    old = true + 0.3 * torch.randn(c, generator=g)
    ref = true + 0.5 * torch.randn(c, generator=g) if with_ref else None
    scale = torch.rand(c, generator=g) + 0.1
    return logits, targets, is_sft, adv, old, ref, scale


def run_and_compare(logits, targets, is_sft, adv, old, ref, scale, *, inv_temp=1.0, with_grad=True,
                    rtol=3e-5, grad_rtol=3e-5, grad_atol=0.0, **hyper):
    hyper = {**HYPER, **hyper}
    want = reference(logits, targets, is_sft, adv, old, ref, scale, inv_temp=inv_temp, **hyper)
    work = logits.clone()
    got = vocab_pass_native(work, targets, is_sft, adv, old, ref, scale,
                                   inv_temp=inv_temp, with_grad=with_grad, **hyper)
    names = ("row_loss", "logp", "entropy", "clipped", "k3")
    for name, g, w in zip(names, got, want):
        if name == "clipped":
            assert g.dtype == torch.bool and torch.equal(g, w), f"{name}: {g} vs {w}"
        else:
            assert g.dtype == torch.float32, name
            torch.testing.assert_close(g.double(), w, rtol=rtol, atol=rtol, msg=lambda m: f"{name}: {m}")
    if with_grad:
        ref_grad = want[5]
        atol = max(grad_atol, 1e-7 * ref_grad.abs().max().item(), 1e-30)
        torch.testing.assert_close(work.double(), ref_grad, rtol=grad_rtol, atol=atol,
                                   msg=lambda m: f"grad: {m}")
    else:
        assert torch.equal(work, logits), "forward-only must leave the logits untouched"
    return got, work


# ---- accuracy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("v", [1, 7, 16, 33, 2049, 5003])
def test_mixed_rows_various_vocab_sizes(v):
    """V below, at and off the vector width (8 lanes on AVX2, 16 on AVX-512) and the tile (1024 or 2048)."""
    run_and_compare(*make_inputs(12, v, seed=v), inv_temp=1.0)


def test_full_qwen_vocab_blocked_sums():
    """V = 151936: the row sums span 75 tiles; fp32 sums would drift, blocked double must not."""
    run_and_compare(*make_inputs(4, 151936, seed=1, spread=2.0), inv_temp=1 / 0.7)


@pytest.mark.parametrize("inv_temp", [1 / 0.6, 1 / 1.3, 2.5])
def test_temperature(inv_temp):
    run_and_compare(*make_inputs(10, 3001, seed=2), inv_temp=inv_temp)


@pytest.mark.parametrize("center", [1e4, -1e4])
def test_extreme_logits(center):
    """Logits near ±1e4: the kernel works with x − max, so nothing cancels or overflows."""
    run_and_compare(*make_inputs(10, 4099, seed=3, center=center, spread=5.0), inv_temp=1 / 0.8)


def test_peaked_rows():
    """One dominant logit per row: p_y ≈ 1, entropy ≈ 0; the target gradient c(1−p_y)/τ must not
    cancel."""
    logits, targets, is_sft, adv, old, ref, scale = make_inputs(8, 1000, seed=4, ignore_frac=0.0)
    logits[torch.arange(8), targets] += 30.0
    got, _ = run_and_compare(logits, targets, is_sft, adv, old, ref, scale)
    assert (got[2] < 1e-4).all()  # near-zero entropies, matched to the reference above


def test_rl_only():
    run_and_compare(*make_inputs(12, 777, seed=5, sft_frac=0.0), inv_temp=1.1)


def test_sft_only():
    got, _ = run_and_compare(*make_inputs(12, 777, seed=6, sft_frac=1.0))
    assert got[0].abs().sum() > 0


def test_ref_none_gives_zero_k3():
    got, _ = run_and_compare(*make_inputs(12, 901, seed=7, sft_frac=0.3, with_ref=False))
    assert torch.equal(got[4], torch.zeros(12))


def test_only_ignored_chunk():
    logits, targets, is_sft, adv, old, ref, scale = make_inputs(6, 500, seed=8)
    targets[:] = IGNORE_INDEX
    got, grad = run_and_compare(logits, targets, is_sft, adv, old, ref, scale)
    assert all(not t.any() for t in got)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_forward_only_leaves_logits_untouched():
    for bf16 in (False, True):
        logits, *rest = make_inputs(9, 2500, seed=9)
        if bf16:
            logits = logits.bfloat16()
        run_and_compare(logits, *rest, with_grad=False, inv_temp=1 / 0.9)


def test_clipped_branches_both_sides():
    """Ratios far from 1 on both sides for both advantage signs: the clipped ones have zero
    policy-gradient (β = 0, so a zero gradient row), the others −A·r."""
    c, v = 8, 1003
    logits, targets, is_sft, _, _, _, scale = make_inputs(c, v, seed=10, ignore_frac=0.0, sft_frac=0.0)
    true = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    ratio = torch.tensor([3.0, 0.2, 3.0, 0.2, 1.5, 0.5, 1.05, 0.95], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.5, -0.7, 1.0, -1.0])
    old = (true - ratio.log()).float()
    got, grad = run_and_compare(logits, targets, is_sft, adv, old, None, scale, beta=0.0)
    assert got[3].tolist() == [True, True, False, False, True, True, False, False]
    assert torch.equal(grad[got[3]], torch.zeros(4, v))
    assert (grad[~got[3]].abs().sum(1) > 0).all()


def test_clip_with_kl_keeps_kl_gradient():
    """A clipped row still carries the KL gradient β(1 − e^{ref−log p})."""
    c, v = 4, 515
    logits, targets, is_sft, _, _, ref, scale = make_inputs(c, v, seed=11, ignore_frac=0.0, sft_frac=0.0)
    true = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    old = (true - math.log(3.0)).float()
    got, grad = run_and_compare(logits, targets, is_sft, torch.ones(c), old, ref, scale, beta=0.1)
    assert got[3].all() and (grad.abs().sum(1) > 0).all()


def test_bfloat16_in_place():
    """bf16 logits are read and written natively; the reference sees the same bf16 values, and the
    gradient is compared at bf16 resolution."""
    logits, *rest = make_inputs(10, 3003, seed=12, dtype=torch.bfloat16)
    _, grad = run_and_compare(logits, *rest, inv_temp=1 / 0.7, grad_rtol=8e-3)
    assert grad.dtype == torch.bfloat16


def test_float16_and_noncontiguous_go_through_a_copy():
    logits, *rest = make_inputs(6, 1201, seed=13)
    half = logits.half()
    run_and_compare(half, *rest, grad_rtol=2e-3, grad_atol=1e-7)  # fp16 subnormals: 6e-8 steps
    wide = torch.randn(6, 2402)
    strided = wide[:, ::2]
    strided.copy_(logits)
    run_and_compare(strided, *rest)


@pytest.mark.parametrize("threads,c,v", [(2, 1, 40001), (4, 3, 33331)])
def test_split_rows_when_fewer_rows_than_threads(threads, c, v):
    """Fewer rows than threads: rows are split into segments whose statistics are merged."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_and_compare(*make_inputs(c, v, seed=14, ignore_frac=0.0), inv_temp=1 / 0.9)
        run_and_compare(*make_inputs(c, v, seed=15, center=-1e4), with_grad=False)
    finally:
        torch.set_num_threads(old)


def test_minus_inf_logits_are_masked_vocab():
    """−inf logits (a masked vocabulary) get probability 0 and gradient 0, not NaN."""
    logits, targets, is_sft, adv, old, ref, scale = make_inputs(5, 300, seed=16, ignore_frac=0.0)
    logits[:, 250:] = float("-inf")
    targets = targets % 250
    run_and_compare(logits, targets, is_sft, adv, old, ref, scale)


def test_fast_exp_accuracy():
    x = torch.linspace(-87.0, 0.0, 200003)
    got = native._load().fast_exp(x).double()
    want = torch.exp(x.double())
    assert ((got - want).abs() / want).max().item() < 1.2e-7  # ≈ 2 ulp
    assert native._load().fast_exp(torch.tensor([-1e4, -100.0])).tolist() == [0.0, 0.0]


# ---- argument errors -----------------------------------------------------------------------------

def _args(c=4, v=50):
    logits, targets, is_sft, adv, old, ref, scale = make_inputs(c, v, seed=17)
    return dict(logits=logits, targets=targets, is_sft=is_sft, advantages=adv, old_logp=old,
                ref_logp=ref, scale=scale, beta=0.0, eps_low=0.2, eps_high=0.2, inv_temp=1.0,
                with_grad=True)


@pytest.mark.parametrize("change,match", [
    (dict(targets=torch.tensor([0, 1, 2, 50])), r"targets\[3\] = 50"),
    (dict(targets=torch.tensor([0, 1, -1, 2])), r"targets\[2\] = -1"),
    (dict(scale=torch.ones(3)), r"scale must have shape \[4\]"),
    (dict(ref_logp=torch.zeros(5)), r"ref_logp must have shape \[4\]"),
    (dict(inv_temp=0.0), r"inv_temp must be finite and > 0"),
    (dict(eps_low=-0.1), r"eps_low and eps_high"),
])
def test_bad_inputs_raise_clear_errors(change, match):
    with pytest.raises(RuntimeError, match=match):
        vocab_pass_native(**{**_args(), **change})


@pytest.mark.parametrize("name,bad,match", [
    ("targets", torch.zeros(4, dtype=torch.int32), r"targets must have dtype Long"),
    ("is_sft", torch.zeros(4), r"is_sft must have dtype Bool"),
    ("advantages", torch.zeros(4, dtype=torch.float64), r"advantages must have dtype Float"),
    ("logits", torch.zeros(4, 50, dtype=torch.float64), r"logits must be float32 or bfloat16"),
    ("logits", torch.zeros(50, 4).t(), r"logits must be contiguous"),
    ("logits", torch.zeros(4, 0), r"V > 0"),
])
def test_extension_checks_name_the_argument(name, bad, match):
    """The C++ checks themselves (the wrapper would convert dtypes)."""
    args = _args()
    args[name] = bad
    with pytest.raises(RuntimeError, match=match):
        native._load().vocab_pass(*args.values())


def test_wrapper_rejects_1d_logits():
    with pytest.raises(ValueError, match="2-D"):
        vocab_pass_native(**{**_args(), "logits": torch.zeros(50)})


# ---- build machinery -----------------------------------------------------------------------------

@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """native with no build attempted yet and the cache under tmp_path."""
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv("AFRL_FAST_CACHE_DIR", str(tmp_path / "cache"))
    return native


def test_failed_build_is_reported_not_raised(fresh_native, monkeypatch, tmp_path, caplog):
    bad = tmp_path / "broken.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(fresh_native, "_SOURCES", [bad])
    with caplog.at_level(logging.WARNING, logger=fresh_native.__name__):
        assert fresh_native.native_available() is False
        assert fresh_native.native_available() is False  # no second build, no second warning
    assert fresh_native.native_unavailable_reason().startswith("build failed")
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1
    assert "Traceback" not in caplog.text
    with pytest.raises(RuntimeError, match="unavailable"):
        vocab_pass_native(**_args())


def test_missing_compiler_is_reported(fresh_native, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert fresh_native.native_available() is False
    assert "no C++ compiler" in fresh_native.native_unavailable_reason()


def test_build_key_follows_the_source(monkeypatch, tmp_path):
    src = tmp_path / "a.cpp"
    src.write_text("int a;\n")
    monkeypatch.setattr(native, "_SOURCES", [src])
    k1 = native._build_key()
    src.write_text("int b;\n")
    assert native._build_key() != k1
