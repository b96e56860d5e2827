"""One distillation step (afrl_fast.distill_step) against plain full-logits computations with the HF
models: the sequence-level student (distill.logit_weight=0, hard_label_weight=1) gets exactly the
gradient of the mean cross-entropy on the trace tokens whatever the teacher says, and the logit term
scales with distill.logit_weight."""
from types import SimpleNamespace

import numpy as np
import torch

from afrl_fast.config import DistillSettings
from afrl_fast.distill_step import distill_loss_backward
from afrl_fast.policy import PolicyLoss

from test_policy_rl import random_sequences, tiny_lm

INFO = SimpleNamespace(device=torch.device("cpu"), world=1)


def examples(seed=0, n=5):
    prompts, responses = random_sequences(np.random.default_rng(seed), n)
    return list(zip(prompts, responses))


def grads_after_step(student_lm, teacher_lm, exs, **settings):
    student_lm.zero_grad()
    cfg = SimpleNamespace(distill=DistillSettings(**settings))
    distill_loss_backward(PolicyLoss(student_lm, loss_backend="torch"), PolicyLoss(teacher_lm, loss_backend="torch"),
                          exs, cfg, INFO, pad_id=0)
    return torch.cat([p.grad.flatten() for p in student_lm.parameters()])


def mean_trace_ce_grads(lm, exs):
    """The plain way: one unpadded forward per sequence, cross-entropy summed over response tokens,
    divided by their number."""
    lm.zero_grad()
    n = sum(len(r) for _, r in exs)
    total = 0
    for p, r in exs:
        logits = lm(input_ids=torch.tensor([p + r])).logits[0]
        total = total + torch.nn.functional.cross_entropy(logits[len(p) - 1: len(p) + len(r) - 1],
                                                          torch.tensor(r), reduction="sum")
    (total / n).backward()
    return torch.cat([q.grad.flatten() for q in lm.parameters()])


def test_sequence_level_student_learns_the_traces_by_cross_entropy_alone():
    exs = examples()
    student = tiny_lm(seed=1)
    want = mean_trace_ce_grads(student, exs)
    for teacher_seed in (2, 3):        # the teacher's logits must not matter
        got = grads_after_step(student, tiny_lm(seed=teacher_seed), exs, logit_weight=0.0, hard_label_weight=1.0,
                               first_token_weight=5.0)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_logit_term_scales_with_logit_weight_and_depends_on_the_teacher():
    exs = examples(seed=4)
    student, teacher = tiny_lm(seed=1), tiny_lm(seed=2)
    one = grads_after_step(student, teacher, exs, logit_weight=1.0)
    three = grads_after_step(student, teacher, exs, logit_weight=3.0)
    # the divergence is accumulated in float32 (the kernels' precision), so the scale is exact to it
    torch.testing.assert_close(three, 3 * one, rtol=1e-4, atol=1e-5 * float(one.abs().max()))
    other = grads_after_step(student, tiny_lm(seed=3), exs, logit_weight=1.0)
    assert (other - one).abs().max() > 1e-6
