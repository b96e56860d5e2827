"""The native CPU distill pass (csrc/distill_pass.cpp) against the float64 reference.

The reference is `afrl_fast_kernels.reference.distill_pass_reference`: log_softmax of the float64
logits of both models at τ, the divergence with 0·log(0/q) = 0, the CE at τ = 1, and float64
autograd of Σ coef·D + ce_coef·Σ CE w.r.t. the student's raw logits for the gradient the kernel
writes in place. Every case draws fresh random logits; the extreme ones sit at ±1e4 or are peaked.
NaN / ±inf cases are in tests/test_nonfinite.py (shared with the torch backend).

No skips: CI has g++, so an extension that does not build is a failure.
"""
import pytest
import torch

from afrl_fast import native_build as native
from afrl_fast.distill_pass import distill_pass_native
from afrl_fast_kernels.constants import DISTILL_KINDS
from afrl_fast_kernels.reference import IGNORE_INDEX, distill_pass_reference

KINDS = DISTILL_KINDS


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.native_available(), f"native extension failed to build: {native.native_unavailable_reason()}"


def make_inputs(c, v, *, seed=0, center=0.0, spread=3.0, ignore_frac=0.2, teacher_shift=0.0):
    """Student and teacher logits of the same spread; `teacher_shift` moves the teacher's by a
    constant (a softmax no-op that moves its max away from the student's)."""
    g = torch.Generator().manual_seed(seed)
    zs = center + spread * torch.randn(c, v, generator=g)
    zt = center + teacher_shift + spread * torch.randn(c, v, generator=g)
    targets = torch.randint(0, v, (c,), generator=g)
    targets[torch.rand(c, generator=g) < ignore_frac] = IGNORE_INDEX
    coef = torch.rand(c, generator=g) + 0.05
    return zs, zt, targets, coef


def term_scale(zs, zt, targets, coef, ce_coef, inv_temp):
    """Per entry [C, V], the size of the terms the gradient entry is formed from before they cancel:
    |coef|·τ⁻¹·max(P_j, Q_j) + ce_coef·max(softmax(z_s)_j, [j = y]). fp32 log-probabilities carry an
    error of ~ulp(|log q|), which reaches an entry through its own probabilities: the kernel's error
    is relative to this, not to the (possibly cancelled) entry itself."""
    f = lambda z, t: torch.softmax(z.double() * t, -1).nan_to_num(0.0)   # noqa: E731
    onehot = torch.zeros(zs.shape, dtype=torch.float64)
    onehot[targets >= 0, targets[targets >= 0]] = 1.0
    d_part = coef.double().abs()[:, None] * inv_temp * torch.maximum(f(zs, inv_temp), f(zt, inv_temp))
    return d_part + ce_coef * torch.maximum(f(zs, 1.0), onehot)


def run_and_compare(zs, zt, targets, coef, *, kind, ce_coef=0.2, beta=0.3, inv_temp=1.0, with_grad=True,
                    rtol=3e-5, grad_rtol=2e-5):
    want_d, want_ce, want_g = distill_pass_reference(zs, zt, targets, coef, ce_coef, kind=kind, beta=beta,
                                                     inv_temp=inv_temp)
    work, teacher = zs.clone(), zt.clone()
    got_d, got_ce = distill_pass_native(work, teacher, targets, coef, ce_coef, kind, beta, inv_temp, with_grad)
    assert torch.equal(teacher, zt), "the teacher's logits are only read"
    for name, g, w in (("div", got_d, want_d), ("ce", got_ce, want_ce)):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        # D and CE on their own scale: an absolute floor of rtol·max|·| for the near-zero divergences
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=rtol * max(w.abs().max().item(), 1.0),
                                   msg=lambda m: f"{kind} {name}: {m}")
    if with_grad:
        bound = 1e-30 + grad_rtol * (term_scale(zs, zt, targets, coef, ce_coef, inv_temp) + want_g.abs())
        excess = (work.double() - want_g).abs() - bound
        assert (excess <= 0).all(), f"{kind} grad: max excess {excess.max().item():.3g}"
    else:
        assert torch.equal(work, zs), "forward-only must leave the logits untouched"
    return (got_d, got_ce), work


# ---- accuracy ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("v", [1, 7, 8, 16, 33, 1025, 2049, 5003])
def test_various_vocab_sizes(kind, v):
    """V below, at and off the vector width (8 lanes on AVX2, 16 on AVX-512) and the tile (128 lanes'
    worth: 1024 or 2048)."""
    run_and_compare(*make_inputs(9, v, seed=v), kind=kind)


@pytest.mark.parametrize("kind", KINDS)
def test_full_qwen_vocab_blocked_sums(kind):
    """V = 151936: the row sums span 75 tiles per model; tile sums folded into doubles must not drift."""
    run_and_compare(*make_inputs(3, 151936, seed=1, spread=2.0, ignore_frac=0.0), kind=kind, inv_temp=1 / 0.7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inv_temp", [1 / 0.6, 1 / 1.3, 2.5])
def test_temperature(kind, inv_temp):
    """τ ≠ 1: D at τ, CE at 1 (its own sum in sweep 1 and its own softmax in the gradient)."""
    run_and_compare(*make_inputs(8, 3001, seed=2), kind=kind, inv_temp=inv_temp)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("center", [1e4, -1e4])
def test_extreme_logits(kind, center):
    """Logits near ±1e4, the teacher's 300 away from the student's: the kernel works with x − max,
    so nothing cancels or overflows."""
    zs, zt, targets, coef = make_inputs(8, 4099, seed=3, center=center, spread=5.0, teacher_shift=300.0)
    run_and_compare(zs, zt, targets, coef, kind=kind, inv_temp=1 / 0.8)


@pytest.mark.parametrize("kind", KINDS)
def test_online_rescaling_max_moves_every_tile(kind):
    """Logits increasing along V (opposite directions in the two models), so both running maxima
    move in every tile and the cross sums are rescaled each time."""
    zs, zt, targets, coef = make_inputs(5, 9000, seed=4, spread=0.3, ignore_frac=0.0)
    ramp = torch.linspace(-20.0, 20.0, 9000)
    run_and_compare(zs + ramp, zt + ramp.flip(0) * 0.5, targets, coef, kind=kind, inv_temp=1 / 1.5)


@pytest.mark.parametrize("kind", KINDS)
def test_peaked_rows_target_entry(kind):
    """Both models put almost all mass on the target: p_y ≈ q_y ≈ 1. The target's gradient entry is
    −Σ of the others, which stays accurate where P_y − Q_y and 1 − q_y cancel in fp32."""
    zs, zt, targets, coef = make_inputs(6, 1000, seed=5, ignore_frac=0.0)
    rows = torch.arange(6)
    zs[rows, targets] += 25.0
    zt[rows, targets] += 24.0
    (d, _), grad = run_and_compare(zs, zt, targets, coef, kind=kind)
    want = distill_pass_reference(zs, zt, targets, coef, 0.2, kind=kind, beta=0.3, inv_temp=1.0)[2]
    # the target entry itself, on its own scale (not the row's)
    torch.testing.assert_close(grad[rows, targets].double(), want[rows, targets], rtol=1e-3, atol=0.0)
    q_y = torch.softmax(zs.double(), -1)[rows, targets]
    assert (q_y > 0.9999).all() and (d < 1e-2).all(), "the case must really be peaked"


@pytest.mark.parametrize("kind", KINDS)
def test_identical_models_give_zero(kind):
    """Student = teacher: D = 0 and, without the hard label, a zero gradient (up to rounding)."""
    zs, _, targets, coef = make_inputs(6, 3000, seed=6)
    (d, _), grad = run_and_compare(zs, zs.clone(), targets, coef, kind=kind, ce_coef=0.0)
    assert d.abs().max() < 1e-6
    assert (grad.abs() <= 1e-6 * term_scale(zs, zs, targets, coef, 0.0, 1.0)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_no_hard_label_and_zero_weight_rows(kind):
    """ce_coef = 0: no CE term in the gradient (CE still reported); coef = 0 rows: a zero gradient row."""
    zs, zt, targets, coef = make_inputs(8, 777, seed=7, ignore_frac=0.0)
    coef[[1, 5]] = 0.0
    (_, ce), grad = run_and_compare(zs, zt, targets, coef, kind=kind, ce_coef=0.0)
    assert (ce > 0).all()
    assert torch.equal(grad[[1, 5]], torch.zeros(2, 777))
    assert (grad[[0, 2, 3, 4, 6, 7]].abs().sum(1) > 0).all()


def test_only_ignored_chunk():
    zs, zt, targets, coef = make_inputs(5, 500, seed=8)
    targets[:] = IGNORE_INDEX
    for kind in KINDS:
        (d, ce), grad = run_and_compare(zs, zt, targets, coef, kind=kind)
        assert not d.any() and not ce.any() and not grad.any()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_only_leaves_logits_untouched(kind):
    run_and_compare(*make_inputs(7, 2500, seed=9), kind=kind, with_grad=False, inv_temp=1 / 0.9)


@pytest.mark.parametrize("beta", [0.01, 0.5, 0.99])
def test_jsd_beta_range(beta):
    """β near both ends: the log M fallback (M below FLT_MIN) and the weights (1 − β), β."""
    zs, zt, targets, coef = make_inputs(6, 2000, seed=10, spread=8.0)
    run_and_compare(zs, zt, targets, coef, kind="jsd", beta=beta, inv_temp=1 / 0.5)


def test_one_row_more_threads():
    """A one-row chunk with two threads (the last chunk of a batch): one thread works, one idles."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for kind in KINDS:
            run_and_compare(*make_inputs(1, 40001, seed=11, ignore_frac=0.0), kind=kind, inv_temp=1 / 0.9)
    finally:
        torch.set_num_threads(old)


def test_float16_and_noncontiguous_go_through_a_copy():
    zs, zt, targets, coef = make_inputs(5, 1201, seed=12)
    half = zs.half()
    want = distill_pass_reference(half, zt, targets, coef, 0.2, kind="jsd", beta=0.3, inv_temp=1.0)
    got = distill_pass_native(half, zt, targets, coef, 0.2, "jsd", 0.3, 1.0, True)
    torch.testing.assert_close(got[0].double(), want[0], rtol=3e-5, atol=3e-5)
    torch.testing.assert_close(half.double(), want[2], rtol=2e-3, atol=1e-7)   # fp16 rounding of the gradient
    wide = torch.randn(5, 2402)
    strided = wide[:, ::2]
    strided.copy_(zs)
    run_and_compare(strided, zt.t().contiguous().t(), targets, coef, kind="reverse_kl")


def test_fast_log_accuracy():
    x = torch.cat([torch.logspace(-37.9, 0.0, 100003), torch.linspace(0.5, 2.0, 10001),
                   torch.tensor([1.0, 2.0, 1e30, 3e38])])
    got = native._load().fast_log(x).double()
    want = torch.log(x.double())
    err = (got - want).abs() / want.abs().clamp(min=1e-3)
    assert err.max().item() < 2.5e-7, err.max().item()          # ≈ 2 ulp, relative (absolute near 1)
    special = native._load().fast_log(torch.tensor([float("nan"), float("inf")]))
    assert special[0].isnan() and special[1] == float("inf")


# ---- argument errors -----------------------------------------------------------------------------

def _args(c=4, v=50):
    zs, zt, targets, coef = make_inputs(c, v, seed=13)
    return dict(student_logits=zs, teacher_logits=zt, targets=targets, coef=coef, ce_coef=0.1, kind=2, beta=0.5,
                inv_temp=1.0, with_grad=True)


@pytest.mark.parametrize("change,match", [
    (dict(targets=torch.tensor([0, 1, 2, 50])), r"distill_pass: targets\[3\] = 50"),
    (dict(targets=torch.tensor([0, -1, 2, 3])), r"targets\[1\] = -1"),
    (dict(coef=torch.ones(3)), r"coef must have shape \[4\]"),
    (dict(coef=torch.ones(4, dtype=torch.float64)), r"coef must have dtype Float"),
    (dict(targets=torch.zeros(4, dtype=torch.int32)), r"targets must have dtype Long"),
    (dict(teacher_logits=torch.zeros(4, 51)), r"teacher_logits must have the shape of student_logits"),
    (dict(student_logits=torch.zeros(4, 50).bfloat16()), r"student_logits must be float32"),
    (dict(teacher_logits=torch.zeros(50, 4).t()), r"teacher_logits must be contiguous"),
    (dict(student_logits=torch.zeros(4, 0), teacher_logits=torch.zeros(4, 0)), r"V > 0"),
    (dict(kind=3), r"kind must be 0 \(forward_kl\), 1 \(reverse_kl\) or 2 \(jsd\)"),
    (dict(beta=1.0), r"beta must be in \(0, 1\) for jsd"),
    (dict(inv_temp=0.0), r"inv_temp must be finite and > 0"),
    (dict(inv_temp=float("inf")), r"inv_temp must be finite and > 0"),
    (dict(ce_coef=float("nan")), r"ce_coef must be finite"),
])
def test_extension_checks_name_the_argument(change, match):
    """The C++ checks themselves (the wrapper would convert dtypes and layouts)."""
    with pytest.raises(RuntimeError, match=match):
        native._load().distill_pass(*{**_args(), **change}.values())


def test_wrapper_rejects_bad_kind_beta_and_shapes():
    args = {**_args(), "kind": "jsd"}
    with pytest.raises(ValueError, match="kind must be one of forward_kl, reverse_kl, jsd"):
        distill_pass_native(**{**args, "kind": "kl"})
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\) for kind='jsd'"):
        distill_pass_native(**{**args, "beta": 0.0})
    with pytest.raises(ValueError, match="student_logits must be a 2-D tensor"):
        distill_pass_native(**{**args, "student_logits": torch.zeros(50)})


# ---- one extension for every native kernel -------------------------------------------------------

def test_one_extension_holds_both_kernels():
    mod = native._load()
    assert callable(mod.vocab_pass) and callable(mod.distill_pass)
    names = {s.name for s in native._SOURCES}
    assert {"vocab_pass.cpp", "distill_pass.cpp", "module.cpp"} <= names


def test_build_key_follows_the_headers(monkeypatch, tmp_path):
    header = tmp_path / "simd.h"
    header.write_text("// a\n")
    monkeypatch.setattr(native, "_HEADERS", [header])
    k1 = native._build_key()
    header.write_text("// b\n")
    assert native._build_key() != k1
    header.unlink()
    assert "sources not found" in (native._missing_toolchain() or "")
