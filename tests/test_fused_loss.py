"""The public fused loss (afrl_fast.loss) against the float64 full-logits reference.

Every backend runs the same checks; "native" and "triton" run when importable (triton on CPU needs
TRITON_INTERPRET=1 set before triton is imported). The torch backend is covered on its own.
"""
from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

from afrl_fast import backends as B
from afrl_fast import lm_head as L
from afrl_fast.loss import IGNORE_INDEX, default_chunk_rows, fused_loss, token_logprobs
from afrl_fast_kernels.reference import fused_loss_reference, token_logprobs_reference

from tolerance import assert_close  # tests/ is on sys.path (conftest.py)

F64 = torch.float64


def _native_skip_reason():
    try:
        native = importlib.import_module("afrl_fast.backends")
    except ImportError as err:
        return f"afrl_fast.backends not importable ({err})"
    return None if native.native_available() else "native C++ vocab pass did not build here"


def _triton_skip_reason():
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA; run with TRITON_INTERPRET=1 to use the Triton interpreter on CPU"
    try:
        importlib.import_module("afrl_fast_kernels.vocab_pass")
    except ImportError as err:
        return f"afrl_fast_kernels.vocab_pass not importable ({err})"
    return None


def _backend_params():
    params = [pytest.param("torch", id="torch")]
    for name, reason in (("native", _native_skip_reason()), ("triton", _triton_skip_reason())):
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return params


BACKENDS = _backend_params()


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# Inputs


def make_case(n=29, h=12, v=131, *, sft_frac=0.3, ignore=(), logit_scale=1.0, with_ref=True, seed=0,
              temperature=1.0, on_policy=False):
    """Random float64 inputs. old/ref log-probs sit near the true log p so ratios straddle the
    clip range and k3 stays finite even at extreme logits."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    # Rows of W of norm ~logit_scale/|h| so logits are O(logit_scale).
    weight = torch.randn(v, h, generator=g, dtype=F64) * (logit_scale / h ** 0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        targets[i] = IGNORE_INDEX
    is_sft = torch.rand(n, generator=g) < sft_frac
    with torch.no_grad():
        true_lp = token_logprobs_reference(hidden, weight, targets, temperature=temperature)[0]
    case = dict(
        hidden=hidden, weight=weight, targets=targets, is_sft=is_sft,
        advantages=torch.randn(n, generator=g, dtype=F64),
        old_logp=None if on_policy else true_lp + 0.3 * torch.randn(n, generator=g, dtype=F64),
        ref_logp=(true_lp + 0.3 * torch.randn(n, generator=g, dtype=F64)) if with_ref else None,
        scale=torch.rand(n, generator=g, dtype=F64) / n,
    )
    return case


def run_reference(case, **kw):
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    out = fused_loss_reference(h, w, case["targets"], is_sft=case["is_sft"], advantages=case["advantages"],
                               old_logp=case["old_logp"], ref_logp=case["ref_logp"], scale=case["scale"], **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def run_ours(case, backend, dtype=torch.float32, **kw):
    dev = _device(backend)
    h = case["hidden"].to(dev, dtype).requires_grad_()
    w = case["weight"].to(dev, dtype).requires_grad_()
    f = lambda t: None if t is None else t.to(dev, torch.float32)
    out = fused_loss(h, w, case["targets"].to(dev), is_sft=case["is_sft"].to(dev),
                     advantages=f(case["advantages"]), old_logp=f(case["old_logp"]), ref_logp=f(case["ref_logp"]),
                     scale=f(case["scale"]), backend=backend, **kw)
    out.loss.backward()
    return out, h.grad, w.grad


def check_against_reference(case, backend, tol=1e-4, diff_tol=None, dtype=torch.float32, **kw):
    ref, ref_dh, ref_dw = run_reference(case, **{k: v for k, v in kw.items() if k != "chunk_rows"})
    out, dh, dw = run_ours(case, backend, dtype=dtype, **kw)
    assert_close(out.loss, ref.loss, tol, "loss")
    assert_close(out.logp, ref.logp, tol, "logp")
    # Entropy's natural scale is log V (near-one-hot rows have entropy ~0 known only absolutely).
    assert_close(out.entropy, ref.entropy, tol, "entropy", floor=math.log(case["weight"].shape[0]))
    assert_close(dh, ref_dh, diff_tol or tol, "dh")
    assert_close(dw, ref_dw, diff_tol or tol, "dW")
    # The clip indicator may flip on a row whose ratio sits within rounding of 1±ε; allow one.
    n_rl = max(int(((case["targets"] != IGNORE_INDEX) & ~case["is_sft"]).sum()), 1)
    assert abs(out.clip_frac.item() - ref.clip_frac.item()) <= 1.0 / n_rl + 1e-6
    assert abs(out.kl.item() - ref.kl.item()) <= (diff_tol or tol) * max(abs(ref.kl.item()), 1e-3)
    return out, ref


# ----------------------------------------------------------------------------------------------
# Against the reference, every backend

CASES = {
    "mixed": dict(make=dict(), kw=dict(beta=0.1)),
    "rl_only": dict(make=dict(sft_frac=0.0), kw=dict(beta=0.05, eps_low=0.15, eps_high=0.3)),
    "sft_only": dict(make=dict(sft_frac=1.0), kw=dict()),
    "ref_none": dict(make=dict(with_ref=False), kw=dict(beta=0.0)),
    "temperature": dict(make=dict(temperature=0.6), kw=dict(beta=0.1, temperature=0.6)),
    "vocab_odd": dict(make=dict(v=1009, n=23), kw=dict(beta=0.1)),          # prime V: no block divides it
    "many_chunks": dict(make=dict(n=41, ignore=(3, 17)), kw=dict(beta=0.1, chunk_rows=4)),
    "ignored_chunk": dict(make=dict(n=20, ignore=tuple(range(5, 10))), kw=dict(beta=0.1, chunk_rows=5)),
    # fp32 logits (and log-probs) of size 1e4 carry ~1e-3 absolute rounding, so the softmax of
    # near-tied tokens (hence the gradient) and ref − log p (hence k3) are only known to ~1e-3
    # relative: a looser tolerance for those, loss/logp/entropy stay tight.
    "extreme_logits": dict(make=dict(logit_scale=1e4, v=257), kw=dict(beta=0.1, chunk_rows=7, diff_tol=1e-2)),
    # on-policy RL rows (no old log-probs: ratio ≡ 1) mixed with SFT rows, at a temperature that
    # applies to the RL rows only
    "on_policy": dict(make=dict(on_policy=True, temperature=0.7), kw=dict(beta=0.1, temperature=0.7)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(backend, name, monkeypatch):
    if backend == "torch" and name in ("mixed", "temperature", "many_chunks", "extreme_logits"):
        # Row blocks of one row, so the block loop inside the torch vocab pass runs many times.
        monkeypatch.setitem(L.TORCH_BLOCK_BYTES, "cpu", 1)
    spec = CASES[name]
    temperature = spec["make"].get("temperature", 1.0)
    case = make_case(seed=list(CASES).index(name), **spec["make"])
    kw = dict(spec["kw"])
    if "temperature" in kw:
        assert kw["temperature"] == temperature
    out, ref = check_against_reference(case, backend, **kw)
    if name == "ignored_chunk":
        assert (out.logp[5:10] == 0).all() and (out.entropy[5:10] == 0).all()


def test_extreme_logits_are_extreme():
    """Guard the guard: the extreme case really has logits near ±1e4 and near-one-hot softmax."""
    case = make_case(logit_scale=1e4, v=257, **{})
    logits = case["hidden"] @ case["weight"].T
    assert logits.abs().max() > 5e3
    ref, _, _ = run_reference(case, beta=0.1)
    assert ref.entropy.min() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend, monkeypatch):
    monkeypatch.setitem(L.TORCH_BLOCK_BYTES, "cpu", 4 * 517 * 5)      # torch: blocks of 5 rows
    case = make_case(n=33, h=32, v=517, seed=3)
    # Compare with the reference evaluated at the bf16-rounded inputs: what remains is our math.
    rounded = dict(case, hidden=case["hidden"].to(torch.bfloat16).to(F64),
                   weight=case["weight"].to(torch.bfloat16).to(F64))
    ref, ref_dh, ref_dw = run_reference(rounded, beta=0.1)
    out, dh, dw = run_ours(case, backend, dtype=torch.bfloat16, beta=0.1, chunk_rows=8)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert_close(out.loss, ref.loss, 1e-3, "loss")
    assert_close(out.logp, ref.logp, 1e-3, "logp")
    assert_close(out.entropy, ref.entropy, 1e-3, "entropy")
    assert_close(dh, ref_dh, 2e-2, "dh")       # bf16 output rounding: 2^-8 relative
    assert_close(dw, ref_dw, 2e-2, "dW")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs(backend):
    case = make_case(n=19, v=211, ignore=(0, 7), seed=5)
    dev = _device(backend)
    h = case["hidden"].float().to(dev).requires_grad_()
    logp, ent = token_logprobs(h, case["weight"].float().to(dev), case["targets"].to(dev),
                               temperature=0.8, backend=backend, chunk_rows=6)
    ref_lp, ref_ent = token_logprobs_reference(case["hidden"], case["weight"], case["targets"], temperature=0.8)
    assert not logp.requires_grad and not ent.requires_grad
    assert_close(logp, ref_lp, 1e-5, "logp")
    assert_close(ent, ref_ent, 1e-5, "entropy")
    assert logp[0] == 0 and ent[7] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_pass_contract(backend):
    """The backend function itself: outputs and the in-place gradient of one chunk of raw logits."""
    case = make_case(n=9, v=97, ignore=(4,), seed=11)
    dev = _device(backend)
    _, vocab_pass = B.resolve_backend(backend, torch.device(dev))
    raw = (case["hidden"] @ case["weight"].T).requires_grad_()
    inv_temp = 1 / 0.9
    # Reference loss of raw logits: the identity as the head (RL rows at 1/τ, SFT rows at 1)
    ref = fused_loss_reference(raw, torch.eye(97, dtype=F64), case["targets"], is_sft=case["is_sft"],
                               advantages=case["advantages"], old_logp=case["old_logp"],
                               ref_logp=case["ref_logp"], scale=case["scale"], beta=0.1, temperature=1 / inv_temp)
    ref.loss.backward()
    f = lambda t: t.to(dev, torch.float32).contiguous()
    logits = f(raw.detach())
    row_loss, logp, ent, clipped, k3 = vocab_pass(
        logits, case["targets"].to(dev), case["is_sft"].to(dev), f(case["advantages"]), f(case["old_logp"]),
        f(case["ref_logp"]), f(case["scale"]), 0.1, 0.2, 0.2, inv_temp, True)
    assert_close(row_loss.sum(), ref.loss, 1e-5, "sum of row_loss")
    assert_close(logp, ref.logp, 1e-5, "logp")
    assert_close(ent, ref.entropy, 1e-5, "entropy")
    assert_close(logits, raw.grad, 1e-5, "in-place gradient")
    assert (logits[4] == 0).all() and row_loss[4] == 0


# ----------------------------------------------------------------------------------------------
# Torch backend: structure of the autograd wrapper


def test_finite_differences_float64():
    """Analytic dh, dW of our own forward (float64 torch path) against central differences."""
    case = make_case(n=6, h=5, v=13, ignore=(2,), seed=21)
    kw = dict(is_sft=case["is_sft"], advantages=case["advantages"], old_logp=case["old_logp"],
              ref_logp=case["ref_logp"], scale=case["scale"], beta=0.3, temperature=0.8, backend="torch",
              chunk_rows=4)
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    (fused_loss(h, w, case["targets"], **kw).loss * 2.5).backward()    # grad_output ≠ 1 too
    f = lambda hh, ww: 2.5 * fused_loss(hh, ww, case["targets"], **kw).loss.item()
    step = 1e-6
    for tensor, grad, other_first in ((case["hidden"], h.grad, True), (case["weight"], w.grad, False)):
        for idx in [(0, 0), (1, 3), (5, 4), (3, 2)]:
            plus, minus = tensor.clone(), tensor.clone()
            plus[idx] += step
            minus[idx] -= step
            if other_first:
                fd = (f(plus, case["weight"]) - f(minus, case["weight"])) / (2 * step)
            else:
                fd = (f(case["hidden"], plus) - f(case["hidden"], minus)) / (2 * step)
            assert abs(fd - grad[idx].item()) <= 1e-6 + 1e-5 * abs(fd), (idx, fd, grad[idx].item())
    assert h.grad[2].abs().max() == 0          # an ignored row gets no gradient


def test_tied_embeddings():
    """W is the input embedding too: its grad sums the lm_head path and the embedding path."""
    torch.manual_seed(0)
    v, d, n = 151, 16, 24
    case = make_case(n=n, h=d, v=v, seed=4)
    ids = torch.randint(0, v, (n,))
    mix = torch.randn(d, d, dtype=F64) / d ** 0.5

    def grads(dtype, use_ours):
        emb = torch.nn.Embedding(v, d).to(dtype)
        with torch.no_grad():
            emb.weight.copy_(case["weight"] * 3)
        hidden = torch.tanh(emb(ids) @ mix.to(dtype))
        args = dict(is_sft=case["is_sft"], advantages=case["advantages"].to(dtype),
                    old_logp=case["old_logp"].to(dtype), ref_logp=case["ref_logp"].to(dtype),
                    scale=case["scale"].to(dtype), beta=0.1)
        if use_ours:
            out = fused_loss(hidden, emb.weight, case["targets"], backend="torch", chunk_rows=5, **args)
        else:
            out = fused_loss_reference(hidden, emb.weight, case["targets"], **args)
        out.loss.backward()
        return out.loss, emb.weight.grad

    ref_loss, ref_grad = grads(F64, False)
    loss, grad = grads(torch.float32, True)
    assert_close(loss, ref_loss, 1e-4, "loss")
    assert_close(grad, ref_grad, 1e-4, "tied weight grad")


def test_frozen_weight_and_no_grad():
    case = make_case(n=10, v=61, seed=8)
    h = case["hidden"].float().requires_grad_()
    w = case["weight"].float()                             # frozen lm_head: no dW work, no dW
    f = lambda t: None if t is None else t.float()
    kw = dict(is_sft=case["is_sft"], advantages=f(case["advantages"]), old_logp=f(case["old_logp"]),
              ref_logp=f(case["ref_logp"]), scale=f(case["scale"]), beta=0.1, backend="torch")
    fused_loss(h, w, case["targets"], **kw).loss.backward()
    _, ref_dh, _ = run_reference(case, beta=0.1)
    assert_close(h.grad, ref_dh, 1e-4, "dh")
    assert w.grad is None
    with torch.no_grad():
        out = fused_loss(h, w, case["targets"], **kw)
    assert not out.loss.requires_grad


def test_backward_twice_is_a_clear_error():
    case = make_case(n=4, v=11)
    h = case["hidden"].float().requires_grad_()
    f = lambda t: None if t is None else t.float()
    out = fused_loss(h, case["weight"].float(), case["targets"], is_sft=case["is_sft"],
                     advantages=f(case["advantages"]), old_logp=f(case["old_logp"]), ref_logp=None,
                     scale=f(case["scale"]), backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()


def test_chunk_rule():
    v = 151_936
    rows = default_chunk_rows(2048, v)
    assert rows * v * 4 <= L.LOGITS_BUDGET_BYTES
    n_chunks = -(-2048 // rows)
    assert n_chunks == -(-2048 // (L.LOGITS_BUDGET_BYTES // (4 * v)))   # no more chunks than needed
    assert rows * n_chunks - 2048 < n_chunks                              # balanced
    assert default_chunk_rows(3, v) == 3
    assert default_chunk_rows(10, 10**9) == 1                             # at least one row


# ----------------------------------------------------------------------------------------------
# Validation and dispatch


def _valid_kwargs(n):
    z = torch.zeros(n)
    return dict(is_sft=torch.zeros(n, dtype=torch.bool), advantages=z, old_logp=z, ref_logp=None, scale=z)


def test_input_validation_names_the_argument():
    h, w, t = torch.randn(5, 4), torch.randn(9, 4), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="targets must have shape"):
        fused_loss(h, w, t[:4], **_valid_kwargs(5), backend="torch")
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 4"):
        fused_loss(h, torch.randn(9, 3), t, **_valid_kwargs(5), backend="torch")
    with pytest.raises(ValueError, match="is_sft must be a bool"):
        fused_loss(h, w, t, **dict(_valid_kwargs(5), is_sft=torch.zeros(5)), backend="torch")
    with pytest.raises(ValueError, match="advantages must have shape"):
        fused_loss(h, w, t, **dict(_valid_kwargs(5), advantages=torch.zeros(5, 1)), backend="torch")
    with pytest.raises(ValueError, match="ref_logp must have shape"):
        fused_loss(h, w, t, **dict(_valid_kwargs(5), ref_logp=torch.zeros(4)), backend="torch")
    with pytest.raises(ValueError, match="targets must be in"):
        fused_loss(h, w, torch.full((5,), 9), **_valid_kwargs(5), backend="torch")
    with pytest.raises(ValueError, match="share one floating dtype"):
        fused_loss(h, w.double(), t, **_valid_kwargs(5), backend="torch")
    with pytest.raises(ValueError, match="temperature"):
        fused_loss(h, w, t, **_valid_kwargs(5), backend="torch", temperature=0.0)


def test_backend_dispatch():
    with pytest.raises(ValueError, match="unknown backend 'cuda_magic'"):
        B.resolve_backend("cuda_magic", torch.device("cpu"))
    name, fn = B.resolve_backend("torch", torch.device("cpu"))
    assert name == "torch" and fn is B.vocab_pass_torch
    auto, _ = B.resolve_backend("auto", torch.device("cpu"))
    assert auto == ("native" if _native_skip_reason() is None else "torch")
    if _native_skip_reason() is not None:
        with pytest.raises(RuntimeError, match="backend 'native' is unavailable"):
            B.resolve_backend("native", torch.device("cpu"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            B.resolve_backend("triton", torch.device("cpu"))
    if _native_skip_reason() is None:
        with pytest.raises(ValueError, match="float64 inputs run on the torch backend only"):
            fused_loss(torch.randn(2, 3, dtype=F64), torch.randn(5, 3, dtype=F64), torch.zeros(2, dtype=torch.long),
                       **_valid_kwargs(2), backend="native")


# ----------------------------------------------------------------------------------------------
# Cross-check with Liger-Kernel's chunked GRPO loss


def test_matches_liger_grpo():
    """Same loss in a configuration both express: per-sequence advantages broadcast to tokens,
    token-mean over the batch (Liger's "dapo"), asymmetric clip, k3 KL to given ref log-probs."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is a dev extra")
    torch.manual_seed(0)
    b, t, d, v, beta, eps_lo, eps_hi, tau = 4, 6, 16, 203, 0.04, 0.2, 0.28, 0.9
    x = torch.randn(b, t, d)
    w = torch.randn(v, d) * 0.5
    ids = torch.randint(0, v, (b, t))
    mask = torch.ones(b, t)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(b)
    with torch.no_grad():
        lp = torch.log_softmax((x @ w.T) / tau, -1).gather(2, ids[..., None]).squeeze(2)
    old = lp + 0.3 * torch.randn(b, t)
    ref = lp + 0.3 * torch.randn(b, t)

    x_l, w_l = x.clone().requires_grad_(), w.clone().requires_grad_()
    liger = chunked.LigerFusedLinearGRPOLoss(beta=beta, compiled=False, use_ref_model=True, chunk_size=2,
                                              epsilon_low=eps_lo, epsilon_high=eps_hi, loss_type="dapo",
                                              temperature=tau)
    liger_loss, (liger_kl, liger_clip) = liger(x_l, w_l, ids, mask, adv, ref_per_token_logps=ref,
                                               old_per_token_logps=old)
    liger_loss.backward()

    x_o, w_o = x.clone().requires_grad_(), w.clone().requires_grad_()
    n = b * t
    targets = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX)).reshape(n)
    out = fused_loss(x_o.reshape(n, d), w_o, targets, is_sft=torch.zeros(n, dtype=torch.bool),
                     advantages=adv[:, None].expand(b, t).reshape(n), old_logp=old.reshape(n),
                     ref_logp=ref.reshape(n), scale=torch.full((n,), 1.0 / mask.sum().item()),
                     beta=beta, eps_low=eps_lo, eps_high=eps_hi, temperature=tau, backend="torch", chunk_rows=5)
    out.loss.backward()

    assert 0 < out.clip_frac.item() < 1, "the case should clip some tokens and not others"
    torch.testing.assert_close(out.loss, liger_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl, liger_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.clip_frac, liger_clip, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_o.grad, x_l.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w_o.grad, w_l.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the interpreter run itself")
def test_triton_backend_cases_pass_under_the_interpreter():
    """The Triton-parametrized cases of this file skip in a plain CPU run (Triton needs CUDA or
    TRITON_INTERPRET=1 set before import). Run them here in a child pytest with the interpreter on,
    so the Triton backend of fused_loss is exercised on every CI run, and require that none skip."""
    import subprocess
    import sys
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton and not interpreter",
                           "-rs"], env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, summary


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_equals_the_recomputed_old_logprobs(backend):
    """One update per rollout batch: old = the current policy's log-probs. Passing old_logp=None
    (the ratio is 1 inside the pass) gives the loss and gradients of passing those log-probs
    recomputed by a separate forward — without the forward."""
    case = make_case(n=23, sft_frac=0.3, seed=5, temperature=0.8)
    dev = _device(backend)
    h32, w32 = case["hidden"].to(dev, torch.float32), case["weight"].to(dev, torch.float32)
    old, _ = token_logprobs(h32, w32, case["targets"].to(dev), temperature=0.8, backend=backend)
    recomputed, dh_r, dw_r = run_ours({**case, "old_logp": old.double().cpu()}, backend, beta=0.1, temperature=0.8)
    shortcut, dh_s, dw_s = run_ours({**case, "old_logp": None}, backend, beta=0.1, temperature=0.8)
    assert_close(shortcut.loss, recomputed.loss.detach().double().cpu(), 1e-5, "loss")
    assert_close(dh_s, dh_r.double().cpu(), 1e-5, "dh")
    assert_close(dw_s, dw_r.double().cpu(), 1e-5, "dW")
    assert shortcut.clip_frac.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_rows_ignore_the_sampling_temperature(backend):
    """The SFT anchor is cross-entropy on expert tokens: the rollouts' temperature is not its business."""
    case = make_case(n=17, sft_frac=1.0, seed=6)
    at_1, dh_1, dw_1 = run_ours(case, backend)
    at_06, dh_06, dw_06 = run_ours(case, backend, temperature=0.6)
    assert_close(at_06.loss, at_1.loss.detach().double().cpu(), 1e-6, "loss")
    assert_close(dw_06, dw_1.double().cpu(), 1e-6, "dW")
