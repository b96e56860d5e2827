"""NaN / ±inf cases for the vocabulary pass and the distill pass, shared by the backend tests (native
and torch in tests/test_nonfinite.py, Triton under the interpreter in tests/test_vocab_pass_triton.py
and tests/test_distill_pass_triton.py).

Each case puts one non-finite value into one place a backend reads — a logit (target, non-target,
a whole row, a masked −inf), an RL row's advantage / old / ref log-prob, a scale, a row whose
gradient coefficient c is 0 — and the check is that every output is NaN, +inf or −inf exactly
where afrl_fast_kernels.reference.vocab_pass_reference (float64) has it, and close elsewhere.
`clipped` and `k3` are compared on valid RL rows only: the fused loss averages them over those
rows, and backends may leave them set elsewhere.
"""
from __future__ import annotations

import torch

from afrl_fast_kernels.reference import IGNORE_INDEX, distill_pass_reference, vocab_pass_reference

NAN, INF = float("nan"), float("inf")
HYPER = dict(beta=0.04, eps_low=0.2, eps_high=0.28)
# rows: 0 SFT, 1 RL, 2 SFT, 3 RL, 4 RL, 5 ignored
IS_SFT = (True, False, True, False, False, False)
SFT_ROW, RL_ROW, IGNORED_ROW = 0, 1, 5

CASES = (
    "nan_nontarget_logit_sft", "nan_nontarget_logit_rl", "nan_target_logit_sft", "nan_target_logit_rl",
    "nan_whole_row", "posinf_nontarget_logit", "posinf_target_logit", "neginf_masked_tokens",
    "neginf_target_sft", "nan_advantage", "posinf_advantage", "nan_old_logp", "nan_ref_logp",
    "nan_scale_sft", "nan_scale_rl", "nan_logit_zero_scale", "nan_logit_zero_advantage_no_kl",
    "nan_placeholders_on_sft_row", "nan_in_ignored_row", "nan_every_row",
)


def make_case(name: str, vocab: int, *, dtype=torch.float32, seed: int = 0) -> dict:
    """Inputs of the vocab pass (logits [6, vocab] and the per-row tensors) plus its hyper-parameters."""
    g = torch.Generator().manual_seed(seed)
    rows = len(IS_SFT)
    logits = torch.randn(rows, vocab, generator=g) * 2.0
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[IGNORED_ROW] = IGNORE_INDEX
    true = torch.log_softmax(logits.double(), -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    inp = {"targets": targets, "is_sft": torch.tensor(IS_SFT),
           "advantages": torch.randn(rows, generator=g),
           "old_logp": (true + 0.2 * torch.randn(rows, generator=g).double()).float(),
           "ref_logp": (true + 0.3 * torch.randn(rows, generator=g).double()).float(),
           "scale": torch.rand(rows, generator=g) + 0.1}
    hyper = dict(HYPER, inv_temp=1 / 0.8)
    other = lambda r: int((targets[r] + vocab // 2) % vocab)       # noqa: E731  a non-target column
    r, s = RL_ROW, SFT_ROW
    if name == "nan_nontarget_logit_sft":
        logits[s, other(s)] = NAN
    elif name == "nan_nontarget_logit_rl":
        logits[r, other(r)] = NAN
    elif name == "nan_target_logit_sft":
        logits[s, targets[s]] = NAN
    elif name == "nan_target_logit_rl":
        logits[r, targets[r]] = NAN
    elif name == "nan_whole_row":
        logits[3] = NAN
    elif name == "posinf_nontarget_logit":
        logits[r, other(r)] = INF
    elif name == "posinf_target_logit":
        logits[s, targets[s]] = INF
    elif name == "neginf_masked_tokens":
        mask = torch.rand(rows, vocab, generator=g) < 0.3
        mask[torch.arange(rows), targets.clamp(min=0)] = False
        logits[mask] = -INF
    elif name == "neginf_target_sft":
        logits[s, targets[s]] = -INF
    elif name == "nan_advantage":
        inp["advantages"][r] = NAN
    elif name == "posinf_advantage":
        inp["advantages"][r] = INF
    elif name == "nan_old_logp":
        inp["old_logp"][r] = NAN
    elif name == "nan_ref_logp":
        inp["ref_logp"][r] = NAN
    elif name == "nan_scale_sft":
        inp["scale"][s] = NAN
    elif name == "nan_scale_rl":
        inp["scale"][r] = NAN
    elif name == "nan_logit_zero_scale":          # c = scale·dL/dlog p = 0 must not skip the NaN
        logits[s, other(s)] = NAN
        inp["scale"][s] = 0.0
    elif name == "nan_logit_zero_advantage_no_kl":  # GRPO group with equal rewards, β = 0: c = 0
        logits[r, other(r)] = NAN
        inp["advantages"][r] = 0.0
        hyper["beta"] = 0.0
    elif name == "nan_placeholders_on_sft_row":   # an SFT row's loss reads none of these
        inp["advantages"][s] = NAN
        inp["old_logp"][s] = NAN
    elif name == "nan_in_ignored_row":            # ignored rows contribute nothing
        logits[IGNORED_ROW, :7] = NAN
        inp["scale"][IGNORED_ROW] = NAN
    elif name == "nan_every_row":                 # e.g. a NaN row of the LM head weight
        logits[:, other(0)] = NAN
    else:
        raise KeyError(name)
    inp["logits"] = logits.to(dtype)
    return {"inputs": inp, "hyper": hyper}


def reference_outputs(case: dict) -> tuple:
    """(row_loss, logp, entropy, clipped, k3, grad) in float64."""
    inp, h = case["inputs"], case["hyper"]
    return vocab_pass_reference(inp["logits"], inp["targets"], inp["is_sft"], inp["advantages"],
                                inp["old_logp"], inp["ref_logp"], inp["scale"], **h)


def kind(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 −inf."""
    t = t.double()
    return torch.where(t.isnan(), 1, torch.where(t.isposinf(), 2, torch.where(t.isneginf(), 3, 0)))


def assert_same_nonfinite(name: str, outputs, grad, case: dict, *, rtol=1e-4, grad_rtol=1e-4) -> None:
    """Backend outputs (row_loss, logp, entropy, clipped, k3) and in-place gradient against the
    reference: identical NaN/±inf positions, close finite values."""
    inp = case["inputs"]
    want = reference_outputs(case)
    rl = (inp["targets"] != IGNORE_INDEX) & ~inp["is_sft"]
    for key, g, w in zip(("row_loss", "logp", "entropy", "clipped", "k3"), outputs, want[:5]):
        if key in ("clipped", "k3"):
            g, w = g[rl], w[rl]
        if key == "clipped":
            assert torch.equal(g, w), f"{name}: clipped {g.tolist()} vs {w.tolist()}"
            continue
        assert torch.equal(kind(g), kind(w)), f"{name}: {key} {g.tolist()} vs reference {w.tolist()}"
        fin = kind(w) == 0
        torch.testing.assert_close(g.double()[fin], w[fin], rtol=rtol, atol=rtol,
                                   msg=lambda m: f"{name}: {key}: {m}")
    want_grad = want[5]
    mismatch = kind(grad) != kind(want_grad)
    assert not mismatch.any(), (f"{name}: gradient non-finite pattern differs in {int(mismatch.sum())} entries, "
                                f"rows {sorted(set(mismatch.nonzero()[:, 0].tolist()))}")
    fin = kind(want_grad) == 0
    scale = want_grad.where(fin, 0.0).abs().amax(dim=1, keepdim=True).expand_as(want_grad)
    diff = (grad.double() - want_grad).abs()[fin]
    assert torch.all(diff <= 1e-7 + grad_rtol * scale[fin]), f"{name}: gradient off by {diff.max().item():.3g}"


# ---------------------------------------------------------------------------------------------------
# The distill pass: one non-finite value in the student's or the teacher's logits, or in a row whose
# weight (or hard-label weight) is 0, and the same check on (div, ce) and the in-place gradient.

DISTILL_ROWS = 6                      # rows 0-4 kept, row 5 ignored
DISTILL_IGNORED = 5
DISTILL_CASES = (
    "nan_student_nontarget", "nan_student_target", "nan_teacher_logit", "posinf_student_logit",
    "posinf_teacher_logit", "nan_whole_teacher_row", "neginf_masked_both", "neginf_student_target",
    "neginf_student_under_teacher_mass", "neginf_teacher_under_student_mass", "all_neginf_student_row",
    "nan_logit_zero_weight", "nan_logit_zero_weight_no_ce", "nan_in_ignored_row", "nan_every_row",
)


def make_distill_case(name: str, vocab: int, kind: str, *, seed: int = 0) -> dict:
    """Inputs of the distill pass (student/teacher logits [6, vocab], targets, coef) plus ce_coef, kind,
    beta and inv_temp."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(DISTILL_ROWS, vocab, generator=g) * 2.0
    zt = torch.randn(DISTILL_ROWS, vocab, generator=g) * 2.0
    targets = torch.randint(0, vocab, (DISTILL_ROWS,), generator=g)
    targets[DISTILL_IGNORED] = IGNORE_INDEX
    coef = torch.rand(DISTILL_ROWS, generator=g) + 0.1
    coef[DISTILL_IGNORED] = 0.0
    case = {"kind": kind, "beta": 0.3, "inv_temp": 1 / 0.8, "ce_coef": 0.25}
    other = lambda r: int((targets[r] + vocab // 2) % vocab)       # noqa: E731  a non-target column
    if name == "nan_student_nontarget":
        zs[1, other(1)] = NAN
    elif name == "nan_student_target":
        zs[1, targets[1]] = NAN
    elif name == "nan_teacher_logit":
        zt[2, other(2)] = NAN
    elif name == "posinf_student_logit":
        zs[1, other(1)] = INF
    elif name == "posinf_teacher_logit":
        zt[2, targets[2]] = INF
    elif name == "nan_whole_teacher_row":
        zt[3] = NAN
    elif name == "neginf_masked_both":        # a masked vocabulary: the same tokens −inf in both models
        mask = torch.rand(DISTILL_ROWS, vocab, generator=g) < 0.3
        mask[torch.arange(DISTILL_ROWS), targets.clamp(min=0)] = False
        zs[mask] = -INF
        zt[mask] = -INF
    elif name == "neginf_student_target":     # CE = +inf (forward_kl D too: the teacher has mass there)
        zs[0, targets[0]] = -INF
    elif name == "neginf_student_under_teacher_mass":   # forward_kl D = +inf, its gradient finite
        zs[1, other(1)] = -INF
    elif name == "neginf_teacher_under_student_mass":   # reverse_kl D = +inf
        zt[2, other(2)] = -INF
    elif name == "all_neginf_student_row":    # no softmax at all: NaN
        zs[3] = -INF
    elif name == "nan_logit_zero_weight":     # coef 0 must not skip the NaN
        zs[1, other(1)] = NAN
        coef[1] = 0.0
    elif name == "nan_logit_zero_weight_no_ce":
        zt[1, other(1)] = NAN
        coef[1] = 0.0
        case["ce_coef"] = 0.0
    elif name == "nan_in_ignored_row":        # ignored rows contribute nothing
        zs[DISTILL_IGNORED, :7] = NAN
        zt[DISTILL_IGNORED, 3] = INF
    elif name == "nan_every_row":             # e.g. a NaN row of the teacher's lm_head
        zt[:, other(0)] = NAN
    else:
        raise KeyError(name)
    case["inputs"] = {"student_logits": zs, "teacher_logits": zt, "targets": targets, "coef": coef}
    return case


def distill_reference_outputs(case: dict) -> tuple:
    """(div, ce, grad) in float64."""
    inp = case["inputs"]
    return distill_pass_reference(inp["student_logits"], inp["teacher_logits"], inp["targets"], inp["coef"],
                                  case["ce_coef"], kind=case["kind"], beta=case["beta"], inv_temp=case["inv_temp"])


def assert_same_nonfinite_distill(name: str, outputs, grad, case: dict, *, rtol=1e-4, grad_rtol=1e-4) -> None:
    """Backend (div, ce) and in-place gradient against the reference: identical NaN/±inf positions,
    close finite values."""
    want = distill_reference_outputs(case)
    label = f"{name} [{case['kind']}]"
    for key, g, w in zip(("div", "ce"), outputs, want[:2]):
        assert torch.equal(kind(g), kind(w)), f"{label}: {key} {g.tolist()} vs reference {w.tolist()}"
        fin = kind(w) == 0
        torch.testing.assert_close(g.double()[fin], w[fin], rtol=rtol, atol=rtol, msg=lambda m: f"{label}: {key}: {m}")
    want_grad = want[2]
    mismatch = kind(grad) != kind(want_grad)
    assert not mismatch.any(), (f"{label}: gradient non-finite pattern differs in {int(mismatch.sum())} entries, "
                                f"rows {sorted(set(mismatch.nonzero()[:, 0].tolist()))}")
    fin = kind(want_grad) == 0
    scale = want_grad.where(fin, 0.0).abs().amax(dim=1, keepdim=True).expand_as(want_grad)
    diff = (grad.double() - want_grad).abs()[fin]
    assert torch.all(diff <= 1e-7 + grad_rtol * scale[fin]), f"{label}: gradient off by {diff.max().item():.3g}"
