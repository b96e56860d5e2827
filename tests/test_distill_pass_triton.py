"""The Triton distill pass (kernels/distill_pass.py) against the float64 contract (kernels/reference.py).

There is no GPU here, so the kernel runs under the Triton interpreter, in ONE child process (as
tests/test_vocab_pass_triton.py does, for the same reason: TRITON_INTERPRET=1 is read when
@triton.jit decorates, and test_kernel_compile.py in the same pytest process needs the real
JITFunction). Every case's inputs are built here, the child runs the kernel on all of them, and
the outputs are checked here against `distill_pass_reference` (float64, autograd for the gradient).
The NaN / ±inf cases are the shared ones of tests/nonfinite_cases.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest
import torch

from afrl_fast_kernels.constants import DISTILL_KINDS
from afrl_fast_kernels.reference import IGNORE_INDEX, distill_pass_reference
from nonfinite_cases import DISTILL_CASES as NONFINITE_CASES, assert_same_nonfinite_distill, make_distill_case


@dataclass(frozen=True)
class Case:
    rows: int
    vocab: int
    block_v: int | None          # None: the launcher's own choice
    kind: str = "forward_kl"
    temperature: float = 1.0
    ce_coef: float = 0.2
    beta: float = 0.3
    with_grad: bool = True
    logits: str = "normal"       # normal | extreme (±1e4) | ramp (maxima move every tile) | peaked | same
    n_ignored: int = 1
    zero_weight_rows: int = 0


def _cases() -> dict:
    out = {}
    for kind in DISTILL_KINDS:
        out |= {
            f"{kind}/tail_tile": Case(rows=7, vocab=300, block_v=64, kind=kind),          # 300 = 4·64 + 44
            f"{kind}/tau_no_ce": Case(rows=5, vocab=257, block_v=32, kind=kind, temperature=0.7, ce_coef=0.0),
            f"{kind}/tau_ce": Case(rows=5, vocab=200, block_v=64, kind=kind, temperature=1.6, zero_weight_rows=2),
            f"{kind}/extreme": Case(rows=5, vocab=300, block_v=64, kind=kind, logits="extreme", temperature=0.8),
            f"{kind}/ramp": Case(rows=4, vocab=400, block_v=64, kind=kind, logits="ramp", temperature=1.3),
            f"{kind}/peaked": Case(rows=4, vocab=200, block_v=64, kind=kind, logits="peaked", n_ignored=0),
            f"{kind}/forward_only": Case(rows=5, vocab=300, block_v=64, kind=kind, with_grad=False, temperature=1.1),
            f"{kind}/launcher_block": Case(rows=2, vocab=2100, block_v=None, kind=kind),   # BLOCK_V=2048, 8 warps
        }
    out |= {
        "all_ignored": Case(rows=3, vocab=100, block_v=32, kind="jsd", n_ignored=3),
        "jsd_small_beta": Case(rows=4, vocab=300, block_v=64, kind="jsd", beta=0.02, temperature=0.5),
        "jsd_large_beta": Case(rows=4, vocab=300, block_v=64, kind="jsd", beta=0.97),
        "same_models": Case(rows=4, vocab=300, block_v=64, kind="reverse_kl", logits="same", ce_coef=0.0),
    }
    return out


CASES = _cases()


# --- inputs ----------------------------------------------------------------------------------

def make_inputs(case: Case, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(case.rows, case.vocab, generator=g) * 2.0
    zt = torch.randn(case.rows, case.vocab, generator=g) * 2.0
    targets = torch.randint(0, case.vocab, (case.rows,), generator=g)
    if case.logits == "extreme":
        # Clusters at ±1e4, the teacher's 300 above the student's: the softmax lives in the top cluster.
        sign = torch.where(torch.rand(case.rows, case.vocab, generator=g) < 0.5, -1.0, 1.0)
        zs, zt = sign * 1.0e4 + zs, sign * 1.0e4 + 300.0 + zt
    elif case.logits == "ramp":
        ramp = torch.linspace(-20.0, 20.0, case.vocab)
        zs, zt = zs * 0.1 + ramp, zt * 0.1 + ramp.flip(0) * 0.5      # both maxima move, in opposite tiles
    elif case.logits == "peaked":
        rows = torch.arange(case.rows)
        zs[rows, targets] += 25.0
        zt[rows, targets] += 24.0
    elif case.logits == "same":
        zt = zs.clone()
    targets[torch.randperm(case.rows, generator=g)[:case.n_ignored]] = IGNORE_INDEX
    coef = torch.rand(case.rows, generator=g) + 0.05
    coef[: case.zero_weight_rows] = 0.0
    return {"student_logits": zs, "teacher_logits": zt, "targets": targets, "coef": coef}


def reference(case: Case, inp: dict) -> tuple:
    return distill_pass_reference(inp["student_logits"], inp["teacher_logits"], inp["targets"], inp["coef"],
                                  case.ce_coef, kind=case.kind, beta=case.beta, inv_temp=1.0 / case.temperature)


# --- the child process -------------------------------------------------------------------------

def _child(in_path: str, out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from afrl_fast_kernels.distill_pass import distill_pass_triton
    results = {}
    for name, (settings, inp) in torch.load(in_path).items():
        zs, zt = inp["student_logits"].clone(), inp["teacher_logits"].clone()
        div, ce = distill_pass_triton(zs, zt, inp["targets"], inp["coef"], settings["ce_coef"], settings["kind"],
                                      settings["beta"], 1.0 / settings["temperature"], settings["with_grad"],
                                      block_v=settings["block_v"])
        results[name] = {"div": div, "ce": ce, "student_after": zs, "teacher_after": zt}
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def inputs():
    return {name: make_inputs(case, seed=2000 + i) for i, (name, case) in enumerate(CASES.items())}


NONFINITE_VOCAB, NONFINITE_BLOCK = 300, 64      # five tiles, the last one partial


@pytest.fixture(scope="module")
def nonfinite_inputs():
    return {(name, kind): make_distill_case(name, NONFINITE_VOCAB, kind, seed=i)
            for i, name in enumerate(NONFINITE_CASES) for kind in DISTILL_KINDS}


@pytest.fixture(scope="module")
def kernel_outputs(inputs, nonfinite_inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill_pass")
    in_path, out_path = tmp / "inputs.pt", tmp / "outputs.pt"
    payload = {name: (asdict(CASES[name]), inp) for name, inp in inputs.items()}
    for (name, kind), case in nonfinite_inputs.items():
        settings = {"kind": kind, "beta": case["beta"], "temperature": 1.0 / case["inv_temp"],
                    "ce_coef": case["ce_coef"], "with_grad": True, "block_v": NONFINITE_BLOCK}
        payload[f"nonfinite/{name}/{kind}"] = (settings, case["inputs"])
    torch.save(payload, in_path)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, str(in_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out_path)


# --- checks ------------------------------------------------------------------------------------

def term_scale(case: Case, inp: dict) -> torch.Tensor:
    """Per entry, the size of the terms a gradient entry is formed from (see
    tests/test_distill_pass_native.py: fp32 log-probabilities reach an entry through its own P_j, Q_j)."""
    t = 1.0 / case.temperature
    f = lambda z, s: torch.softmax(z.double() * s, -1)   # noqa: E731
    zs, zt, targets = inp["student_logits"], inp["teacher_logits"], inp["targets"]
    onehot = torch.zeros(zs.shape, dtype=torch.float64)
    onehot[targets >= 0, targets[targets >= 0]] = 1.0
    d_part = inp["coef"].double()[:, None] * t * torch.maximum(f(zs, t), f(zt, t))
    return d_part + case.ce_coef * torch.maximum(f(zs, 1.0), onehot)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, inputs, kernel_outputs):
    case, inp, got = CASES[name], inputs[name], kernel_outputs[name]
    want_d, want_ce, _ = reference(case, inp)
    # An fp32 logit of 1e4 is only good to its ulp (~1e-3): D and CE inherit that, times τ⁻¹.
    ulp = 2.0 ** -23 * inp["student_logits"].abs().amax(1).double() / case.temperature
    for key, w in (("div", want_d), ("ce", want_ce)):
        g = got[key]
        assert g.dtype == torch.float32 and g.shape == (case.rows,), key
        bound = 3e-5 * (1.0 + w.abs()) + 4 * ulp
        excess = (g.double() - w).abs() - bound
        assert torch.all(excess <= 0), f"{key}: max excess {excess.max().item():.3g}\n{g}\n{w}"
    assert torch.equal(got["teacher_after"], inp["teacher_logits"]), "the teacher's logits are only read"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.with_grad])
def test_gradient_written_in_place(name, inputs, kernel_outputs):
    case, inp, got = CASES[name], inputs[name], kernel_outputs[name]
    want = reference(case, inp)[2]
    grad = got["student_after"]
    ignored = inp["targets"] == IGNORE_INDEX
    assert torch.all(grad[ignored] == 0), "ignored rows must get a zero gradient row"
    # Relative to the terms each entry is made of; at ±1e4 the logits' own ulp (×τ⁻¹) is the floor
    # of every log-probability difference.
    ulp = 2.0 ** -23 * inp["student_logits"].abs().amax(1, keepdim=True).double() / case.temperature
    bound = 1e-30 + (3e-5 + 8 * ulp) * (term_scale(case, inp) + want.abs())
    excess = (grad.double() - want).abs() - bound
    assert torch.all(excess <= 0), f"max excess {excess.max().item():.3g}"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.with_grad])
def test_forward_only_leaves_logits_untouched(name, inputs, kernel_outputs):
    assert torch.equal(kernel_outputs[name]["student_after"], inputs[name]["student_logits"])


@pytest.mark.parametrize("kind", DISTILL_KINDS)
@pytest.mark.parametrize("name", NONFINITE_CASES)
def test_nonfinite_values_propagate_like_the_reference(name, kind, nonfinite_inputs, kernel_outputs):
    """NaN / ±inf in either model's logits, in zero-weight and ignored rows: outputs and the in-place
    gradient are non-finite exactly where the float64 reference's are (tests/nonfinite_cases.py)."""
    got = kernel_outputs[f"nonfinite/{name}/{kind}"]
    assert_same_nonfinite_distill(name, (got["div"], got["ce"]), got["student_after"], nonfinite_inputs[(name, kind)])


def test_cases_are_what_they_claim(inputs):
    """Guard the guards: the extreme case sits at ±1e4, the peaked one has q_y ≈ 1, the zero-weight
    rows exist, and every kind has a case with and without the hard label."""
    ext = inputs["jsd/extreme"]["student_logits"]
    assert ext.abs().max() > 9e3
    pk = inputs["forward_kl/peaked"]
    q_y = torch.softmax(pk["student_logits"].double(), -1).gather(1, pk["targets"][:, None])
    assert (q_y > 0.9999).all()
    assert (inputs["jsd/tau_ce"]["coef"][:2] == 0).all()
    for kind in DISTILL_KINDS:
        assert CASES[f"{kind}/tau_no_ce"].ce_coef == 0 and CASES[f"{kind}/tail_tile"].ce_coef > 0


def test_rejects_bad_inputs():
    """Validation runs before any launch, so it is safe in this (non-interpreter) process."""
    from afrl_fast_kernels.distill_pass import distill_pass_triton
    c, v = 3, 8
    zs, zt = torch.zeros(c, v), torch.zeros(c, v)
    y, coef = torch.zeros(c, dtype=torch.long), torch.ones(c)
    with pytest.raises(ValueError, match="student_logits must be a contiguous"):
        distill_pass_triton(torch.zeros(v, c).T, zt, y, coef, 0.0, "jsd", 0.5, 1.0, True)
    with pytest.raises(TypeError, match="teacher_logits must be float32"):
        distill_pass_triton(zs, zt.bfloat16(), y, coef, 0.0, "jsd", 0.5, 1.0, True)
    with pytest.raises(ValueError, match="teacher_logits must have the shape"):
        distill_pass_triton(zs, torch.zeros(c, v + 1), y, coef, 0.0, "jsd", 0.5, 1.0, True)
    with pytest.raises(ValueError, match="targets"):
        distill_pass_triton(zs, zt, y.int(), coef, 0.0, "jsd", 0.5, 1.0, True)
    with pytest.raises(ValueError, match="kind must be one of"):
        distill_pass_triton(zs, zt, y, coef, 0.0, "kl", 0.5, 1.0, True)
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        distill_pass_triton(zs, zt, y, coef, 0.0, "jsd", 1.0, 1.0, True)
    with pytest.raises(ValueError, match="inv_temp"):
        distill_pass_triton(zs, zt, y, coef, 0.0, "jsd", 0.5, 0.0, True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
