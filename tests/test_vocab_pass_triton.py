"""The Triton vocabulary pass (kernels/vocab_pass.py) against the float64 contract (kernels/reference.py).

There is no GPU here, so the kernel runs under the Triton interpreter. TRITON_INTERPRET=1 is read
when @triton.jit decorates a function, i.e. when vocab_pass.py is first imported, and the whole
suite shares one pytest process where other modules (test_kernel_compile.py) need the real
JITFunction. So this module never sets the variable in its own process: it builds every case's
inputs here, runs the kernel in ONE child process (this file run as a script, with
TRITON_INTERPRET=1 in the child's environment only), and checks the child's outputs here against
a float64 reference built from `rowwise_loss_reference` with autograd for the gradient.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from afrl_fast_kernels.reference import IGNORE_INDEX, rowwise_loss_reference
from nonfinite_cases import CASES as NONFINITE_CASES, assert_same_nonfinite, make_case


@dataclass(frozen=True)
class Case:
    rows: int
    vocab: int
    block_v: int | None          # None: the launcher's own choice
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    kinds: str = "mixed"         # mixed | rl | sft
    has_ref: bool = True
    with_grad: bool = True
    logits: str = "normal"       # normal | extreme (±1e4) | ramp (max moves to the last tile)
    n_ignored: int = 1
    beta: float = 0.1
    eps_low: float = 0.2
    eps_high: float = 0.28


CASES = {
    "mixed_tail_tile": Case(rows=12, vocab=300, block_v=64),                        # 300 = 4·64 + 44
    "rl_only_no_ref": Case(rows=6, vocab=257, block_v=32, kinds="rl", has_ref=False, temperature=0.8),
    "sft_only_tau": Case(rows=6, vocab=200, block_v=64, kinds="sft", temperature=1.3),
    "all_ignored": Case(rows=4, vocab=100, block_v=32, n_ignored=4),
    "extreme_logits": Case(rows=6, vocab=300, block_v=64, logits="extreme", temperature=0.7),
    "ramp_rescaling": Case(rows=5, vocab=400, block_v=64, logits="ramp"),
    "bf16_mixed": Case(rows=6, vocab=300, block_v=128, dtype=torch.bfloat16, temperature=0.9),
    "forward_only": Case(rows=6, vocab=300, block_v=64, with_grad=False, temperature=1.1),
    "forward_only_bf16": Case(rows=4, vocab=150, block_v=64, dtype=torch.bfloat16, with_grad=False),
    "launcher_block": Case(rows=3, vocab=2100, block_v=None),                    # BLOCK_V=2048, 8 warps
}


# --- inputs ----------------------------------------------------------------------------------

def _make_logits(case: Case, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(case.rows, case.vocab, generator=gen) * 2.0
    if case.logits == "extreme":
        # Two clusters at ±1e4: the softmax lives in the top one, targets may sit in either.
        sign = torch.where(torch.rand(case.rows, case.vocab, generator=gen) < 0.5, -1.0, 1.0)
        x = sign * 1.0e4 + x
    elif case.logits == "ramp":
        # Increasing along V, so the running max is replaced in every tile (online rescaling).
        x = x * 0.1 + torch.linspace(-20.0, 20.0, case.vocab)
    return x.to(case.dtype)


def _kinds(case: Case, gen: torch.Generator) -> torch.Tensor:
    if case.kinds == "sft":
        return torch.ones(case.rows, dtype=torch.bool)
    if case.kinds == "rl":
        return torch.zeros(case.rows, dtype=torch.bool)
    kinds = torch.rand(case.rows, generator=gen) < 0.5
    kinds[0], kinds[-1] = True, False          # both kinds present in one launch
    return kinds


def make_inputs(case: Case, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    logits = _make_logits(case, gen)
    targets = torch.randint(0, case.vocab, (case.rows,), generator=gen)
    targets[torch.randperm(case.rows, generator=gen)[:case.n_ignored]] = IGNORE_INDEX
    is_sft = _kinds(case, gen)
    true_logp = _logp_all(logits, targets, torch.where(is_sft, 1.0, case.temperature).double()[:, None])
    # old / ref near the current log-prob so ratios straddle the clip range (both branches hit).
    noise = lambda: (torch.randn(case.rows, generator=gen) * 0.35).double()  # noqa: E731
    return {
        "logits": logits, "targets": targets, "is_sft": is_sft,
        "advantages": torch.randn(case.rows, generator=gen),
        "old_logp": (true_logp + noise()).float(),
        "ref_logp": (true_logp + noise()).float() if case.has_ref else None,
        "scale": torch.rand(case.rows, generator=gen) + 0.1,
    }


# --- float64 reference -------------------------------------------------------------------------

def _logp_all(logits, targets, temperature):
    z = logits.double() / temperature
    safe = targets.clamp(min=0)
    return torch.log_softmax(z, -1).gather(1, safe[:, None]).squeeze(1)


def reference(case: Case, inp: dict) -> dict:
    """Per-row outputs and d(Σ scale·L)/d(raw logits), all float64."""
    x = inp["logits"].double().requires_grad_(True)
    valid = inp["targets"] != IGNORE_INDEX
    # RL rows at the sampling temperature, SFT rows at 1 (plain cross-entropy)
    temp = torch.where(inp["is_sft"], 1.0, case.temperature).double()[:, None]
    logprobs = torch.log_softmax(x / temp, -1)
    logp = logprobs.gather(1, inp["targets"].clamp(min=0)[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    ref = inp["ref_logp"].double() if case.has_ref else None
    row_loss, clipped, k3 = rowwise_loss_reference(
        logp, inp["is_sft"], inp["advantages"].double(), inp["old_logp"].double(), ref,
        case.beta, case.eps_low, case.eps_high)
    zero = torch.zeros((), dtype=torch.float64)
    row_loss = torch.where(valid, row_loss * inp["scale"].double(), zero)
    grad, = torch.autograd.grad(row_loss.sum(), x)
    ratio = torch.exp(logp - inp["old_logp"].double())
    return {"row_loss": row_loss.detach(), "logp": torch.where(valid, logp, zero).detach(),
            "entropy": torch.where(valid, entropy, zero).detach(), "clipped": clipped & valid,
            "k3": torch.where(valid, k3, zero).detach(), "grad": grad, "ratio": ratio.detach()}


# --- the child process -------------------------------------------------------------------------

def _child(in_path: str, out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from afrl_fast_kernels.vocab_pass import vocab_pass_triton
    results = {}
    for name, (case, inp) in torch.load(in_path).items():
        logits = inp["logits"].clone()
        out = vocab_pass_triton(logits, inp["targets"], inp["is_sft"], inp["advantages"], inp["old_logp"],
                                inp["ref_logp"], inp["scale"], case["beta"], case["eps_low"], case["eps_high"],
                                1.0 / case["temperature"], case["with_grad"], block_v=case["block_v"])
        results[name] = dict(zip(("row_loss", "logp", "entropy", "clipped", "k3"), out), logits_after=logits)
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def inputs():
    return {name: make_inputs(case, seed=1000 + i) for i, (name, case) in enumerate(CASES.items())}


NONFINITE_VOCAB, NONFINITE_BLOCK = 300, 64      # five tiles, the last one partial


@pytest.fixture(scope="module")
def nonfinite_inputs():
    return {name: make_case(name, NONFINITE_VOCAB, seed=i) for i, name in enumerate(NONFINITE_CASES)}


@pytest.fixture(scope="module")
def kernel_outputs(inputs, nonfinite_inputs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab_pass")
    in_path, out_path = tmp / "inputs.pt", tmp / "outputs.pt"
    payload = {name: (vars(CASES[name]) | {"dtype": None}, inp) for name, inp in inputs.items()}
    for name, case in nonfinite_inputs.items():    # the NaN/inf cases shared with the other backends
        h = case["hyper"]
        settings = {"beta": h["beta"], "eps_low": h["eps_low"], "eps_high": h["eps_high"],
                    "temperature": 1.0 / h["inv_temp"], "with_grad": True, "block_v": NONFINITE_BLOCK}
        payload[f"nonfinite/{name}"] = (settings, case["inputs"])
    torch.save(payload, in_path)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, str(in_path), str(out_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter child failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out_path)


# --- checks ------------------------------------------------------------------------------------

def _tolerances(case: Case) -> dict:
    # logp/entropy/loss are fp32 math on exactly representable inputs in both dtypes; only the
    # gradient is rounded to the logits dtype on the way out.
    grad_rtol = 1.6e-2 if case.dtype == torch.bfloat16 else 2e-5
    return {"rtol": 2e-5, "atol": 2e-5, "grad_rtol": grad_rtol, "grad_atol": 1e-6}


def _near_clip_boundary(ratio, case: Case):
    return ((ratio - (1 + case.eps_high)).abs() < 1e-4) | ((ratio - (1 - case.eps_low)).abs() < 1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, inputs, kernel_outputs):
    case, inp, got = CASES[name], inputs[name], kernel_outputs[name]
    want = reference(case, inp)
    tol = _tolerances(case)
    # An fp32 log p of −3e4 (the ±1e4 case at τ = 0.7) is only good to its ulp, ~2e-3; whatever is
    # computed from log p − old or ref − log p inherits that, scaled by its own size (exp terms).
    logp_ulps = 2.0 ** -21 * want["logp"].abs()
    for key in ("row_loss", "logp", "entropy", "k3"):
        assert got[key].dtype == torch.float32 and got[key].shape == (case.rows,), key
        atol = tol["atol"] + logp_ulps * (1.0 + want[key].abs())
        excess = (got[key].double() - want[key]).abs() - (atol + tol["rtol"] * want[key].abs())
        assert torch.all(excess <= 0), f"{key}: max excess {excess.max().item():.3g}\n{got[key]}\n{want[key]}"
    assert got["clipped"].dtype == torch.bool
    decided = ~_near_clip_boundary(want["ratio"], case)
    assert torch.equal(got["clipped"][decided], want["clipped"][decided])


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.with_grad])
def test_gradient_written_in_place(name, inputs, kernel_outputs):
    case, inp, got = CASES[name], inputs[name], kernel_outputs[name]
    want = reference(case, inp)["grad"]
    grad = got["logits_after"]
    assert grad.dtype == case.dtype
    ignored = inp["targets"] == IGNORE_INDEX
    assert torch.all(grad[ignored] == 0), "ignored rows must get a zero gradient row"
    tol = _tolerances(case)
    # atol relative to the row's largest entry |c|/τ, so tiny softmax tails are not over-judged.
    atol = tol["grad_atol"] + tol["grad_rtol"] * want.abs().amax(dim=1, keepdim=True)
    diff = (grad.double() - want).abs()
    assert torch.all(diff <= atol), f"max excess {(diff - atol).max().item():.3g}"


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if not c.with_grad])
def test_forward_only_leaves_logits_untouched(name, inputs, kernel_outputs):
    assert torch.equal(kernel_outputs[name]["logits_after"], inputs[name]["logits"])


@pytest.mark.parametrize("name", NONFINITE_CASES)
def test_nonfinite_values_propagate_like_the_reference(name, nonfinite_inputs, kernel_outputs):
    """NaN / ±inf in logits, advantages, old/ref log-probs and scales: outputs and the in-place
    gradient are non-finite exactly where the float64 reference's are (tests/nonfinite_cases.py)."""
    got = kernel_outputs[f"nonfinite/{name}"]
    outputs = tuple(got[k] for k in ("row_loss", "logp", "entropy", "clipped", "k3"))
    assert_same_nonfinite(name, outputs, got["logits_after"], nonfinite_inputs[name])


def test_cases_cover_both_policy_branches(inputs):
    """The gradient cases must hold RL rows whose policy term is clipped (zero PG gradient) and
    rows where it is not, or the gradient check would not see a wrong branch choice."""
    clipped = []
    for name, case in CASES.items():
        want = reference(case, inputs[name])
        rl = (inputs[name]["targets"] != IGNORE_INDEX) & ~inputs[name]["is_sft"]
        if case.with_grad:
            clipped.append(want["clipped"][rl])
    clipped = torch.cat(clipped)
    assert clipped.any() and (~clipped).any(), clipped


def test_rejects_bad_inputs():
    """Validation runs before any launch, so it is safe in this (non-interpreter) process."""
    from afrl_fast_kernels.vocab_pass import vocab_pass_triton
    n = 3
    args = (torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.zeros(n),
            None, torch.ones(n))
    with pytest.raises(ValueError, match="contiguous"):
        vocab_pass_triton(torch.zeros(8, n).T, *args, 0.0, 0.2, 0.2, 1.0, True)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        vocab_pass_triton(torch.zeros(n, 8, dtype=torch.float16), *args, 0.0, 0.2, 0.2, 1.0, True)
    with pytest.raises(ValueError, match="targets"):
        vocab_pass_triton(torch.zeros(n, 8), torch.zeros(n, dtype=torch.int32), *args[1:], 0.0, 0.2, 0.2, 1.0, True)
    with pytest.raises(ValueError, match="inv_temp"):
        vocab_pass_triton(torch.zeros(n, 8), *args, 0.0, 0.2, 0.2, 0.0, True)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
