"""The public distillation loss (afrl_fast.distill_loss.fused_distill_loss) against the float64 full-logits
reference (afrl_fast_kernels.reference.fused_distill_loss_reference) and against Liger-Kernel.

Every backend runs the same checks on fresh random inputs: "torch" and "native" here, "triton" when
importable (on CPU it needs TRITON_INTERPRET=1 before triton is imported, so
`test_triton_backend_cases_pass_under_the_interpreter` reruns this file's Triton cases in ONE child
pytest with the interpreter on and requires that none skip). NaN / ±inf propagation through the
loss is in tests/test_nonfinite.py, peak memory in tests/test_fused_loss_memory.py.

Liger-Kernel cross-checks (the torch path against both of Liger's distillation losses):
  * `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss` — its torch implementation, run here in
    process (compiled=False);
  * `liger_kernel.transformers.LigerFusedLinearJSD` — its Triton kernel, run under the Triton
    interpreter in one child process (it needs CUDA otherwise).
Both at β = 0 (= our forward_kl), β = 1 (= our reverse_kl) and a middle β (= our jsd), with τ ≠ 1
and ignored rows; Liger divides by the number of non-ignored rows, which is our default denominator.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from afrl_fast import backends as B
from afrl_fast import lm_head as L
from afrl_fast.distill_loss import IGNORE_INDEX, fused_distill_loss
from afrl_fast.lm_head import default_chunk_rows
from afrl_fast_kernels.constants import DISTILL_KINDS
from afrl_fast_kernels.reference import fused_distill_loss_reference

from tolerance import assert_close  # tests/ is on sys.path (conftest.py)

F64 = torch.float64


def _triton_skip_reason():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA; run with TRITON_INTERPRET=1 to use the Triton interpreter on CPU"
    try:
        importlib.import_module("afrl_fast_kernels.distill_pass")
    except ImportError as err:
        return f"afrl_fast_kernels.distill_pass not importable ({err})"
    return None


def _backend_params():
    reason = _triton_skip_reason()
    # native: no skip (CI has g++; a failed build is a failure, see test_distill_pass_native.py)
    return [pytest.param("torch", id="torch"), pytest.param("native", id="native"),
            pytest.param("triton", id="triton", marks=pytest.mark.skipif(reason is not None, reason=str(reason)))]


BACKENDS = _backend_params()


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# Inputs


def make_case(n=29, hs=12, ht=20, v=131, *, ignore=(), logit_scale=1.0, seed=0):
    """Random float64 student and teacher heads; W rows of norm ~logit_scale/√H so logits are
    O(logit_scale). The teacher's logits are correlated with the student's (a teacher worth
    distilling), plus noise of their own."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, hs, generator=g, dtype=F64)
    sw = torch.randn(v, hs, generator=g, dtype=F64) * (logit_scale / hs ** 0.5)
    th = torch.cat([sh, torch.randn(n, ht - hs, generator=g, dtype=F64)], dim=1)
    tw = torch.cat([sw, torch.randn(v, ht - hs, generator=g, dtype=F64) * (logit_scale / ht ** 0.5)], dim=1)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(ignore)] = IGNORE_INDEX
    return dict(student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw, targets=targets,
                row_weight=torch.rand(n, generator=g, dtype=F64) + 0.2)


def run_reference(case, **kw):
    h = case["student_hidden"].clone().requires_grad_()
    w = case["student_weight"].clone().requires_grad_()
    out = fused_distill_loss_reference(h, w, case["teacher_hidden"], case["teacher_weight"], case["targets"], **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def run_ours(case, backend, dtype=torch.float32, teacher_dtype=None, **kw):
    dev = _device(backend)
    h = case["student_hidden"].to(dev, dtype).requires_grad_()
    w = case["student_weight"].to(dev, dtype).requires_grad_()
    td = teacher_dtype or dtype
    if isinstance(kw.get("row_weight"), torch.Tensor):
        kw["row_weight"] = kw["row_weight"].to(dev, torch.float32 if dtype != F64 else F64)
    out = fused_distill_loss(h, w, case["teacher_hidden"].to(dev, td), case["teacher_weight"].to(dev, td),
                             case["targets"].to(dev), backend=backend, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def check_against_reference(case, backend, tol=1e-4, grad_tol=None, chunk_rows=None, **kw):
    ref, ref_dh, ref_dw = run_reference(case, **kw)
    out, dh, dw = run_ours(case, backend, chunk_rows=chunk_rows, **kw)
    assert out.loss.dtype == torch.float32 and out.per_row.dtype == torch.float32 and out.ce.dtype == torch.float32
    assert not out.per_row.requires_grad and not out.ce.requires_grad
    assert_close(out.loss, ref.loss, tol, "loss")
    assert_close(out.per_row, ref.per_row, tol, "per_row")
    assert_close(out.ce, ref.ce, tol, "ce", floor=math.log(case["student_weight"].shape[0]))
    assert_close(dh, ref_dh, grad_tol or tol, "dh")
    assert_close(dw, ref_dw, grad_tol or tol, "dW")
    ignored = case["targets"] == IGNORE_INDEX
    assert (out.per_row.cpu()[ignored] == 0).all() and (out.ce.cpu()[ignored] == 0).all()
    assert (dh.cpu()[ignored] == 0).all(), "ignored rows get no gradient"
    return out, ref


# ----------------------------------------------------------------------------------------------
# Against the reference, every backend and every kind

CASES = {
    "plain": dict(make=dict(), kw=dict()),
    # τ ≠ 1 on D (not on CE) and the hard label: the τ = 1 statistics of the student on the side
    "tau_hard_label": dict(make=dict(ignore=(2, 11)), kw=dict(temperature=0.7, hard_label_weight=0.5)),
    # per-row weights and a global token count (micro-batches / ranks): loss and grads scale by it
    "row_weight_denominator": dict(make=dict(ignore=(0,)), kw=dict(row_weight=True, denominator=91.0,
                                                                   temperature=1.5, hard_label_weight=0.2)),
    # 41 = 5·8 + 1: a one-row last chunk; prime V: no tile divides it
    "partial_last_chunk": dict(make=dict(n=41, v=1009, ignore=(3, 17)), kw=dict(chunk_rows=8, hard_label_weight=0.3)),
    # rows 5..9 are one whole chunk of ignored rows
    "ignored_chunk": dict(make=dict(n=20, ignore=tuple(range(5, 10))), kw=dict(chunk_rows=5, temperature=0.9)),
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding, so log-probability differences (and the
    # gradient made of them) are known to ~1e-3 relative; D, CE and the loss stay tight
    "extreme_logits": dict(make=dict(logit_scale=1e4, v=257), kw=dict(chunk_rows=7, hard_label_weight=0.1),
                           grad_tol=2e-2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", DISTILL_KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(backend, kind, name, monkeypatch):
    if backend == "torch" and name in ("plain", "partial_last_chunk", "extreme_logits"):
        # Row blocks of one row, so the block loop inside the torch distill pass runs many times.
        monkeypatch.setitem(L.TORCH_BLOCK_BYTES, "cpu", 1)
    spec = CASES[name]
    case = make_case(seed=list(CASES).index(name) + 10 * DISTILL_KINDS.index(kind), **spec["make"])
    kw = dict(spec["kw"], kind=kind, jsd_beta=0.35)
    if kw.get("row_weight") is True:
        kw["row_weight"] = case["row_weight"]
    check_against_reference(case, backend, grad_tol=spec.get("grad_tol"), **kw)


def test_extreme_case_is_extreme():
    """Guard the guard: the ±1e4 case really has logits that large and near-one-hot softmaxes."""
    case = make_case(logit_scale=1e4, v=257)
    zs = case["student_hidden"] @ case["student_weight"].T
    zt = case["teacher_hidden"] @ case["teacher_weight"].T
    assert zs.abs().max() > 5e3 and zt.abs().max() > 5e3
    assert torch.softmax(zs, -1).amax(-1).min() > 0.99


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", DISTILL_KINDS)
def test_all_rows_ignored_is_zero_not_nan(backend, kind):
    case = make_case(n=9, ignore=range(9), seed=3)
    out, dh, dw = run_ours(case, backend, kind=kind, hard_label_weight=0.5, chunk_rows=4)
    assert out.loss.item() == 0.0 and not out.per_row.any() and not out.ce.any()
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    out0 = run_ours(case, backend, kind=kind, denominator=0)[0]       # a global count of 0 is fine too
    assert out0.loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", DISTILL_KINDS)
def test_bf16_inputs(backend, kind, monkeypatch):
    """bf16 student and teacher: fp32 math (weights upcast in vocabulary tiles), bf16 gradients.
    Compared with the reference at the bf16-rounded inputs, so what remains is our math."""
    monkeypatch.setattr(L, "UPCAST_TILE_ROWS", 128)        # several upcast tiles at V = 517
    case = make_case(n=33, hs=32, ht=48, v=517, seed=4, ignore=(5,))
    rounded = {k: (t.to(torch.bfloat16).to(F64) if k.endswith(("hidden", "weight")) else t) for k, t in case.items()}
    kw = dict(kind=kind, temperature=1.3, hard_label_weight=0.4)
    ref, ref_dh, ref_dw = run_reference(rounded, **kw)
    out, dh, dw = run_ours(case, backend, dtype=torch.bfloat16, chunk_rows=8, **kw)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert_close(out.loss, ref.loss, 1e-4, "loss")
    assert_close(out.per_row, ref.per_row, 1e-4, "per_row")
    assert_close(dh, ref_dh, 1e-2, "dh")       # bf16 output rounding: 2^-8 relative
    assert_close(dw, ref_dw, 1e-2, "dW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_teacher_fp32_student(backend):
    """A frozen bf16 teacher distilled into an fp32 student: the teacher's dtype is its own."""
    case = make_case(n=17, v=211, seed=5)
    rounded = dict(case, teacher_hidden=case["teacher_hidden"].to(torch.bfloat16).to(F64),
                   teacher_weight=case["teacher_weight"].to(torch.bfloat16).to(F64))
    ref, ref_dh, ref_dw = run_reference(rounded, kind="jsd")
    out, dh, dw = run_ours(case, backend, teacher_dtype=torch.bfloat16, kind="jsd")
    assert dh.dtype == torch.float32
    assert_close(out.loss, ref.loss, 1e-4, "loss")
    assert_close(dw, ref_dw, 1e-4, "dW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_pass_contract(backend):
    """The backend function itself on one chunk of raw logits: D, CE and the in-place gradient."""
    from afrl_fast_kernels.reference import distill_pass_reference
    case = make_case(n=9, v=97, ignore=(4,), seed=11)
    dev = _device(backend)
    _, distill_pass = B.resolve_backend(backend, torch.device(dev), kernel="distill_pass")
    zs = (case["student_hidden"] @ case["student_weight"].T).float()
    zt = (case["teacher_hidden"] @ case["teacher_weight"].T).float()
    coef = case["row_weight"].float() / 8
    for kind in DISTILL_KINDS:
        want = distill_pass_reference(zs, zt, case["targets"], coef, 0.3, kind=kind, beta=0.4, inv_temp=1 / 0.9)
        work = zs.to(dev).clone()
        div, ce = distill_pass(work, zt.to(dev), case["targets"].to(dev), coef.to(dev), 0.3, kind, 0.4, 1 / 0.9, True)
        assert_close(div, want[0], 1e-5, f"{kind} div")
        assert_close(ce, want[1], 1e-5, f"{kind} ce")
        assert_close(work, want[2], 1e-5, f"{kind} in-place gradient")
        assert (work[4] == 0).all() and div[4] == 0


# ----------------------------------------------------------------------------------------------
# The autograd wrapper (torch backend, float64: the exact path)


def test_finite_differences_float64():
    """Analytic dh, dW of our own forward (float64 torch path) against central differences, with
    grad_output ≠ 1, for every kind."""
    case = make_case(n=6, hs=5, ht=7, v=13, ignore=(2,), seed=21)
    for kind in DISTILL_KINDS:
        kw = dict(kind=kind, jsd_beta=0.3, temperature=0.8, hard_label_weight=0.4, row_weight=case["row_weight"],
                  backend="torch", chunk_rows=4)
        args = lambda hh, ww: (hh, ww, case["teacher_hidden"], case["teacher_weight"], case["targets"])  # noqa: E731
        h = case["student_hidden"].clone().requires_grad_()
        w = case["student_weight"].clone().requires_grad_()
        (fused_distill_loss(*args(h, w), **kw).loss * 2.5).backward()
        f = lambda hh, ww: 2.5 * fused_distill_loss(*args(hh, ww), **kw).loss.item()   # noqa: E731
        step = 1e-6
        for tensor, grad, is_hidden in ((case["student_hidden"], h.grad, True), (case["student_weight"], w.grad, False)):
            for idx in [(0, 0), (1, 3), (5, 4), (3, 2)]:
                plus, minus = tensor.clone(), tensor.clone()
                plus[idx] += step
                minus[idx] -= step
                if is_hidden:
                    fd = (f(plus, case["student_weight"]) - f(minus, case["student_weight"])) / (2 * step)
                else:
                    fd = (f(case["student_hidden"], plus) - f(case["student_hidden"], minus)) / (2 * step)
                assert abs(fd - grad[idx].item()) <= 1e-6 + 1e-5 * abs(fd), (kind, idx, fd, grad[idx].item())
        assert h.grad[2].abs().max() == 0          # an ignored row gets no gradient


def test_teacher_gets_no_gradient_and_frozen_student_weight():
    case = make_case(n=10, v=61, seed=8)
    h = case["student_hidden"].float().requires_grad_()
    w = case["student_weight"].float()                        # frozen lm_head: no dW work, no dW
    th = case["teacher_hidden"].float().requires_grad_()      # a teacher that happens to require grad
    tw = case["teacher_weight"].float().requires_grad_()
    out = fused_distill_loss(h, w, th, tw, case["targets"], kind="reverse_kl", backend="torch")
    out.loss.backward()
    _, ref_dh, _ = run_reference(case, kind="reverse_kl")
    assert_close(h.grad, ref_dh, 1e-4, "dh")
    assert w.grad is None and th.grad is None and tw.grad is None
    with torch.no_grad():
        out = fused_distill_loss(h, w, th, tw, case["targets"], backend="torch")
    assert not out.loss.requires_grad


def test_backward_twice_is_a_clear_error():
    case = make_case(n=4, v=11)
    h = case["student_hidden"].float().requires_grad_()
    out = fused_distill_loss(h, case["student_weight"].float(), case["teacher_hidden"].float(),
                             case["teacher_weight"].float(), case["targets"], backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="fused_distill_loss: backward can run only once"):
        out.loss.backward()


def test_denominator_and_row_weight_scale_as_stated():
    """loss(denominator = k·n) = loss/k and row_weight = c everywhere is c·loss (no hard label)."""
    case = make_case(n=15, v=101, ignore=(1,), seed=9)
    kw = dict(kind="jsd", backend="torch")
    base, dh, _ = run_ours(case, **kw)
    half, dh_half, _ = run_ours(case, **kw, denominator=2 * 14)
    assert_close(half.loss, base.loss.detach().double() / 2, 1e-6, "loss / 2")
    assert_close(dh_half, dh.double() / 2, 1e-6, "dh / 2")
    triple, _, _ = run_ours(case, **kw, row_weight=torch.full((15,), 3.0, dtype=F64))
    assert_close(triple.loss, 3 * base.loss.detach().double(), 1e-6, "3·loss")
    assert torch.equal(triple.per_row, base.per_row), "per_row is D itself, unweighted"


def test_chunk_rule():
    v = 151_936
    rows = default_chunk_rows(2048, v, n_buffers=2)
    assert 2 * rows * v * 4 <= L.LOGITS_BUDGET_BYTES            # both fp32 buffers together
    n_chunks = -(-2048 // rows)
    assert n_chunks == -(-2048 // (L.LOGITS_BUDGET_BYTES // (8 * v)))   # no more chunks than needed
    assert rows * n_chunks - 2048 < n_chunks                         # balanced
    assert default_chunk_rows(3, v, n_buffers=2) == 3


# ----------------------------------------------------------------------------------------------
# Validation and dispatch


def _good(n=5, v=9, hs=4, ht=6):
    g = torch.Generator().manual_seed(0)
    return dict(student_hidden=torch.randn(n, hs, generator=g), student_weight=torch.randn(v, hs, generator=g),
                teacher_hidden=torch.randn(n, ht, generator=g), teacher_weight=torch.randn(v, ht, generator=g),
                targets=torch.zeros(n, dtype=torch.long))


BAD = [
    (dict(student_weight=torch.randn(9, 3)), ValueError, r"student_weight must be \[V, H\] with H = 4 \(student_hidden's"),
    (dict(teacher_weight=torch.randn(9, 5)), ValueError, r"teacher_weight must be \[V, H\] with H = 6 \(teacher_hidden's"),
    (dict(teacher_weight=torch.randn(10, 6)), ValueError,
     r"student_weight \[9, 4\] and teacher_weight \[10, 6\] must have the same vocabulary size"),
    (dict(teacher_hidden=torch.randn(4, 6)), ValueError, r"teacher_hidden must have one row per student_hidden row \(5\)"),
    (dict(student_hidden=torch.randn(5)), ValueError, r"student_hidden must be \[N, H\]"),
    (dict(student_weight=torch.randn(9, 4).double()), ValueError,
     "student_hidden and student_weight must share one floating dtype"),
    (dict(teacher_hidden=torch.randn(5, 6).half()), ValueError,
     "teacher_hidden and teacher_weight must share one floating dtype"),
    (dict(student_hidden=[[0.0] * 4] * 5), TypeError, "student_hidden must be a tensor"),
    (dict(teacher_hidden=torch.randn(5, 6, device="meta"), teacher_weight=torch.randn(9, 6, device="meta")),
     ValueError, "teacher_hidden is on meta but student_hidden is on cpu"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), ValueError, r"targets must have shape \[N\] = \[5\]"),
    (dict(targets=torch.zeros(5)), ValueError, "targets must be an integer tensor"),
    (dict(targets=torch.full((5,), 9)), ValueError, r"targets must be in \[0, 9\) or -100"),
    (dict(targets=torch.full((5,), -1)), ValueError, r"targets must be in \[0, 9\) or -100"),
    (dict(targets=[0] * 5), TypeError, "targets must be a tensor"),
    (dict(kind="kl"), ValueError, "kind must be one of 'forward_kl', 'reverse_kl', 'jsd', got 'kl'"),
    (dict(kind="jsd", jsd_beta=0.0), ValueError, r"jsd_beta must be in \(0, 1\) for kind='jsd'"),
    (dict(kind="jsd", jsd_beta=1.0), ValueError, r"jsd_beta must be in \(0, 1\) for kind='jsd'"),
    (dict(kind="jsd", jsd_beta=float("nan")), ValueError, "jsd_beta must be a finite number"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number > 0"),
    (dict(temperature="hot"), ValueError, "temperature must be a number"),
    (dict(hard_label_weight=-0.1), ValueError, "hard_label_weight must be a finite number >= 0"),
    (dict(hard_label_weight=float("nan")), ValueError, "hard_label_weight must be a finite number >= 0"),
    (dict(row_weight=torch.tensor([1.0, 1.0, 1.0, float("nan"), 1.0])), ValueError,
     r"row_weight must be finite; row_weight\[3\] = nan"),
    (dict(row_weight=torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0])), ValueError, r"row_weight\[1\] = inf"),
    (dict(row_weight=torch.ones(4)), ValueError, r"row_weight must have shape \[N\] = \[5\]"),
    (dict(row_weight=torch.ones(5, dtype=torch.long)), ValueError, "row_weight must be a floating-point tensor"),
    (dict(denominator=-1.0), ValueError, "denominator must be a finite number >= 0"),
    (dict(denominator=float("nan")), ValueError, "denominator must be a finite number >= 0"),
    (dict(denominator=0), ValueError, "denominator is 0 but 5 rows are kept"),
    (dict(chunk_rows=0), ValueError, "chunk_rows must be a positive integer"),
    (dict(chunk_rows=2.5), ValueError, "chunk_rows must be a positive integer"),
    (dict(backend="gpu"), ValueError, "unknown backend 'gpu'"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_inputs_raise_clear_errors(change, exc, match):
    args = {**_good(), **change}
    pos = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "targets")]
    with pytest.raises(exc, match=match):
        fused_distill_loss(*pos, **{"backend": "torch", **args})


def test_float64_runs_on_torch_only_and_dispatch():
    args = {k: (t.double() if t.dtype.is_floating_point else t) for k, t in _good().items()}
    with pytest.raises(ValueError, match="float64 inputs run on the torch backend only"):
        fused_distill_loss(*args.values(), backend="native")
    assert B.resolve_backend("auto", torch.device("cpu"), kernel="distill_pass") == ("native", B.distill_pass_native)
    assert B.resolve_backend("torch", torch.device("cpu"), kernel="distill_pass")[1] is B.distill_pass_torch
    with pytest.raises(ValueError, match="unknown kernel 'vocab'"):
        B.resolve_backend("torch", torch.device("cpu"), kernel="vocab")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            B.resolve_backend("triton", torch.device("cpu"), kernel="distill_pass")


# ----------------------------------------------------------------------------------------------
# Liger-Kernel


def liger_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, hs, ht, v = 12, 16, 24, 203
    xs = torch.randn(n, hs, generator=g)
    ws = torch.randn(v, hs, generator=g) * 0.5
    xt = torch.randn(n, ht, generator=g)
    wt = torch.randn(v, ht, generator=g) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[2, 7]] = IGNORE_INDEX
    return xs, ws, xt, wt, labels


# Liger's β at both ends and inside: 0 is forward_kl, 1 reverse_kl, anything between our jsd
LIGER_BETAS = [(0.0, "forward_kl"), (0.4, "jsd"), (1.0, "reverse_kl")]
LIGER_TAU = 2.0


def ours_on(xs, ws, xt, wt, labels, kind, beta, **kw):
    h, w = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = fused_distill_loss(h, w, xt, wt, labels, kind=kind, jsd_beta=beta if kind == "jsd" else 0.5,
                             temperature=LIGER_TAU, backend="torch", chunk_rows=5, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


@pytest.mark.parametrize("beta,kind", LIGER_BETAS)
def test_matches_liger_chunked_jsd_loss(beta, kind):
    """liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (its torch path): loss = a·soft + b·hard,
    soft = Σ D / n_valid at τ, hard = Σ CE / n_valid at τ = 1 — ours with hard_label_weight = b/a, times a."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is a dev extra")
    a, b = 0.7, 0.3
    xs, ws, xt, wt, labels = liger_inputs(seed=int(beta * 10))
    ls, lw = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    liger = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=b, weight_soft_loss=a, beta=beta, temperature=LIGER_TAU,
                                            compiled=False, chunk_size=4, return_soft_hard_loss=True)
    loss, soft, hard = liger(ls, lw, xt, wt, labels)
    loss.backward()
    out, dh, dw = ours_on(xs, ws, xt, wt, labels, kind, beta, hard_label_weight=b / a)
    torch.testing.assert_close(a * out.loss, loss.detach(), rtol=1e-5, atol=1e-6)
    n_valid = int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(out.per_row.sum() / n_valid, soft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.ce.sum() / n_valid, hard, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a * dh, ls.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a * dw, lw.grad, rtol=1e-4, atol=1e-6)
    assert soft.item() > 1e-3 and hard.item() > 1e-1, "the case must have a divergence and a CE to compare"


_LIGER_CHILD = r"""
import json, sys, torch
from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
inputs = torch.load(sys.argv[1])
out = {}
for beta in json.loads(sys.argv[3]):
    xs, ws, xt, wt, labels = inputs
    h, w = xs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=float(sys.argv[4]))(h, w, xt, wt, labels)
    loss.backward()
    out[beta] = {"loss": loss.detach(), "dh": h.grad, "dw": w.grad}
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def liger_triton_outputs(tmp_path_factory):
    """LigerFusedLinearJSD's Triton kernel under the interpreter, every β in ONE child process."""
    pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is a dev extra")
    tmp = tmp_path_factory.mktemp("liger")
    torch.save(liger_inputs(seed=5), tmp / "in.pt")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _LIGER_CHILD, str(tmp / "in.pt"), str(tmp / "out.pt"),
                           json.dumps([b for b, _ in LIGER_BETAS]), str(LIGER_TAU)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(tmp / "out.pt")


@pytest.mark.parametrize("beta,kind", LIGER_BETAS)
def test_matches_liger_fused_linear_jsd_triton(beta, kind, liger_triton_outputs):
    """liger_kernel.transformers.LigerFusedLinearJSD: Σ D / n_valid at τ, no hard label."""
    got = liger_triton_outputs[beta]
    out, dh, dw = ours_on(*liger_inputs(seed=5), kind, beta)
    torch.testing.assert_close(out.loss, got["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dh, got["dh"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, got["dw"], rtol=1e-4, atol=1e-6)
    assert out.loss.item() > 1e-3


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the interpreter run itself")
def test_triton_backend_cases_pass_under_the_interpreter():
    """The Triton-parametrized cases of this file skip in a plain CPU run. Run them here in ONE child
    pytest with the interpreter on, so the Triton backend of fused_distill_loss is exercised on every
    CI run, and require that none skip."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "triton and not interpreter and not liger", "-rs"],
                          env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, summary
