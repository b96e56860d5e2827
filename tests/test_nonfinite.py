"""NaN and ±inf are never hidden: every backend propagates them exactly as the float64 reference
does, in the loss, log-probs, entropy, dh and dW of fused_loss, and in the loss, per-row divergence,
CE, dh and dW of fused_distill_loss (Triton: tests/test_vocab_pass_triton.py and
tests/test_distill_pass_triton.py run the same cases under the interpreter). Bad hyper-parameters
are rejected up front, identically for all backends.
"""
import pytest
import torch

from afrl_fast import backends, native_build
from afrl_fast.distill_loss import fused_distill_loss
from afrl_fast.loss import fused_loss, token_logprobs
from afrl_fast_kernels.constants import DISTILL_KINDS
from afrl_fast_kernels.reference import IGNORE_INDEX, fused_distill_loss_reference, fused_loss_reference
from nonfinite_cases import (CASES, DISTILL_CASES, assert_same_nonfinite, assert_same_nonfinite_distill, kind,
                             make_case, make_distill_case)

VOCAB = 5003          # three native tiles of 2048 and a vector tail


def vocab_pass(backend: str):
    return {"torch": backends.vocab_pass_torch, "native": backends.vocab_pass_native}[backend]


def run_case(backend: str, case: dict):
    inp, h = case["inputs"], case["hyper"]
    work = inp["logits"].clone()
    out = vocab_pass(backend)(work, inp["targets"], inp["is_sft"], inp["advantages"], inp["old_logp"],
                              inp["ref_logp"], inp["scale"], h["beta"], h["eps_low"], h["eps_high"],
                              h["inv_temp"], True)
    return out, work


@pytest.fixture(scope="module", autouse=True)
def native_built():
    assert native_build.native_available(), native_build.native_unavailable_reason()


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("name", CASES)
def test_vocab_pass_propagates_like_the_reference(backend, name):
    case = make_case(name, VOCAB, seed=CASES.index(name))
    out, grad = run_case(backend, case)
    assert_same_nonfinite(name, out, grad, case)


@pytest.mark.parametrize("name", ["nan_nontarget_logit_rl", "posinf_target_logit", "nan_logit_zero_scale",
                                  "neginf_masked_tokens", "nan_advantage"])
def test_native_bfloat16_propagates_like_the_reference(name):
    case = make_case(name, VOCAB, dtype=torch.bfloat16, seed=1)
    out, grad = run_case("native", case)
    assert grad.dtype == torch.bfloat16
    assert_same_nonfinite(name, out, grad, case, grad_rtol=1e-2)


@pytest.mark.parametrize("position", [0, 20000, 40000])
def test_native_split_rows_see_a_nan_in_any_segment(position):
    """One row, two threads: the row is split into segments whose statistics are merged; a NaN in
    any segment (or one all −inf but for the NaN) must reach the merged row."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for fill in ("normal", "neginf"):
            case = make_case("nan_nontarget_logit_sft", 40001, seed=3)
            inp = case["inputs"]
            keep = torch.tensor([0])
            for key in inp:
                inp[key] = inp[key][keep].clone()
            logits = inp["logits"]
            logits[0] = torch.randn(40001) if fill == "normal" else -float("inf")
            logits[0, inp["targets"][0]] = 0.0
            logits[0, position] = float("nan")
            out, grad = run_case("native", case)
            assert_same_nonfinite(f"segment {position} {fill}", out, grad, case)
            assert grad.isnan().all()
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------- through the fused loss: dh and dW

def fused_inputs(where: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, h, v = 10, 16, 700
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    rows = dict(is_sft=torch.arange(n) % 3 == 0, advantages=torch.randn(n, generator=g),
                old_logp=torch.full((n,), -6.5), ref_logp=torch.full((n,), -6.4),
                scale=torch.full((n,), 1.0 / n))
    if where == "weight_row_nan":                 # the case: one NaN row of the LM head
        weight[int((targets[0] + 1) % v), 3] = float("nan")
    elif where == "weight_row_inf":
        weight[int((targets[0] + 1) % v), 3] = float("inf")
    elif where == "hidden_row_nan":
        hidden[4, 0] = float("nan")
    elif where == "advantage_nan":
        rows["advantages"][1] = float("nan")
    elif where == "finite":
        pass
    else:
        raise KeyError(where)
    return hidden, weight, targets, rows


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("where", ["weight_row_nan", "weight_row_inf", "hidden_row_nan", "advantage_nan", "finite"])
def test_fused_loss_dh_dw_propagate_like_the_reference(backend, where):
    hidden, weight, targets, rows = fused_inputs(where)
    hyper = dict(beta=0.04, eps_low=0.2, eps_high=0.28, temperature=0.9)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = fused_loss(h, w, targets, **rows, **hyper, backend=backend, chunk_rows=4)
    out.loss.backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = fused_loss_reference(h64, w64, targets, **rows, **hyper)
    ref.loss.backward()
    pairs = {"loss": (out.loss, ref.loss), "logp": (out.logp, ref.logp), "entropy": (out.entropy, ref.entropy),
             "dh": (h.grad, h64.grad), "dW": (w.grad, w64.grad)}
    for key, (got, want) in pairs.items():
        assert torch.equal(kind(got), kind(want)), f"{where}/{backend}: {key} non-finite pattern differs"
        fin = kind(want) == 0
        torch.testing.assert_close(got.double()[fin], want[fin], rtol=2e-4, atol=2e-5)
    if where != "finite":
        assert out.loss.isnan() and w.grad.isnan().any() and h.grad.isnan().any()
    lp, ent = token_logprobs(hidden, weight, targets, temperature=0.9, backend=backend, chunk_rows=4)
    assert torch.equal(kind(lp), kind(ref.logp)) or where == "advantage_nan"
    if where == "advantage_nan":      # log-probs do not read advantages
        assert torch.isfinite(lp).all() and torch.isfinite(ent).all()


# ---------------------------------------------------------------- hyper-parameters rejected up front

@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("name,value", [("eps_low", float("nan")), ("eps_low", -0.1), ("eps_high", float("nan")),
                                        ("eps_high", -1.0), ("beta", float("nan")), ("beta", -0.01),
                                        ("beta", float("inf")), ("eps_high", float("inf")),
                                        ("temperature", float("nan")), ("temperature", 0.0),
                                        ("temperature", float("inf"))])
def test_bad_hyper_parameters_are_rejected_before_any_backend_runs(backend, name, value, monkeypatch):
    hidden, weight, targets, rows = fused_inputs("finite")
    calls = []
    monkeypatch.setattr("afrl_fast.loss.resolve_backend", lambda *a: calls.append(a))
    kwargs = dict(beta=0.0, eps_low=0.2, eps_high=0.2, temperature=1.0, backend=backend)
    kwargs[name] = value
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        fused_loss(hidden, weight, targets, **rows, **kwargs)
    if name == "temperature":
        with pytest.raises(ValueError, match=r"^temperature must be a finite number > 0"):
            token_logprobs(hidden, weight, targets, temperature=value, backend=backend)
    assert calls == []


def test_ignored_rows_stay_out_even_when_non_finite():
    """An ignored row's NaN hidden state adds nothing to the loss, log-probs or dh (the contract);
    the dW GEMM multiplies its zero gradient row by its NaN hidden state, as the reference's does."""
    hidden, weight, targets, rows = fused_inputs("hidden_row_nan")
    targets[4] = IGNORE_INDEX
    w64 = weight.double().requires_grad_(True)
    fused_loss_reference(hidden.double(), w64, targets, **rows).loss.backward()
    for backend in ("torch", "native"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = fused_loss(h, w, targets, **rows, backend=backend)
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.logp[4] == 0 and out.entropy[4] == 0
        assert torch.isfinite(h.grad).all() and (h.grad[4] == 0).all()
        assert torch.equal(kind(w.grad), kind(w64.grad))


# ---------------------------------------------------------------- the distill pass and fused_distill_loss

def distill_pass(backend: str):
    return {"torch": backends.distill_pass_torch, "native": backends.distill_pass_native}[backend]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("kind_name", DISTILL_KINDS)
@pytest.mark.parametrize("name", DISTILL_CASES)
def test_distill_pass_propagates_like_the_reference(backend, kind_name, name):
    case = make_distill_case(name, VOCAB, kind_name, seed=DISTILL_CASES.index(name))
    inp = case["inputs"]
    work, teacher = inp["student_logits"].clone(), inp["teacher_logits"].clone()
    out = distill_pass(backend)(work, teacher, inp["targets"], inp["coef"], case["ce_coef"], kind_name,
                                case["beta"], case["inv_temp"], True)
    assert_same_nonfinite_distill(name, out, work, case)
    assert torch.equal(teacher.isnan(), inp["teacher_logits"].isnan())
    assert torch.equal(teacher.nan_to_num(), inp["teacher_logits"].nan_to_num()), "the teacher is only read"


def distill_inputs(where: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, hs, ht, v = 10, 16, 24, 700
    sh, sw = torch.randn(n, hs, generator=g), torch.randn(v, hs, generator=g) * 0.5
    th, tw = torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    other = int((targets[0] + 1) % v)
    if where == "teacher_weight_row_nan":         # one NaN row of the teacher's lm_head: every row NaN
        tw[other, 3] = float("nan")
    elif where == "student_weight_row_inf":
        sw[other, 2] = float("inf")
    elif where == "student_hidden_row_nan":
        sh[4, 0] = float("nan")
    elif where == "teacher_hidden_row_nan":
        th[6, 5] = float("nan")
    elif where != "finite":
        raise KeyError(where)
    return sh, sw, th, tw, targets


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("kind_name", DISTILL_KINDS)
@pytest.mark.parametrize("where", ["teacher_weight_row_nan", "student_weight_row_inf", "student_hidden_row_nan",
                                   "teacher_hidden_row_nan", "finite"])
def test_fused_distill_loss_dh_dw_propagate_like_the_reference(backend, kind_name, where):
    sh, sw, th, tw, targets = distill_inputs(where)
    hyper = dict(kind=kind_name, jsd_beta=0.4, temperature=0.9, hard_label_weight=0.5)
    h, w = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
    out = fused_distill_loss(h, w, th, tw, targets, **hyper, backend=backend, chunk_rows=4)
    out.loss.backward()
    h64, w64 = sh.double().requires_grad_(True), sw.double().requires_grad_(True)
    ref = fused_distill_loss_reference(h64, w64, th.double(), tw.double(), targets, **hyper)
    ref.loss.backward()
    pairs = {"loss": (out.loss, ref.loss), "per_row": (out.per_row, ref.per_row), "ce": (out.ce, ref.ce),
             "dh": (h.grad, h64.grad), "dW": (w.grad, w64.grad)}
    for key, (got, want) in pairs.items():
        assert torch.equal(kind(got), kind(want)), f"{where}/{backend}: {key} non-finite pattern differs"
        fin = kind(want) == 0
        torch.testing.assert_close(got.double()[fin], want[fin], rtol=2e-4, atol=2e-5)
    if where != "finite":
        assert out.loss.isnan() and w.grad.isnan().any() and h.grad.isnan().any()
    if where.startswith("teacher"):               # the CE reads only the student
        assert torch.isfinite(out.ce).all()


def test_distill_ignored_rows_stay_out_even_when_non_finite():
    """Ignored rows' NaN hidden states (student and teacher) add nothing to the loss, D, CE or dh."""
    sh, sw, th, tw, targets = distill_inputs("student_hidden_row_nan")
    th[4, 1] = float("nan")
    targets[4] = IGNORE_INDEX
    for backend in ("torch", "native"):
        h, w = sh.clone().requires_grad_(True), sw.clone().requires_grad_(True)
        out = fused_distill_loss(h, w, th, tw, targets, kind="jsd", hard_label_weight=0.3, backend=backend)
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.per_row[4] == 0 and out.ce[4] == 0
        assert torch.isfinite(h.grad).all() and (h.grad[4] == 0).all()
