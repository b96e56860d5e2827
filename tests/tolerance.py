"""The relative closeness check the kernel tests share (tests/test_fused_loss.py,
tests/test_fused_distill_loss.py): a kernel's output against its float64 reference, on the
reference tensor's own scale, so one tolerance serves logits of any magnitude."""
from __future__ import annotations

import torch


def assert_close(ours, ref, tol, name, floor=1e-6):
    """max |ours − ref| ≤ tol·max(max |ref|, floor); shapes equal, every value finite."""
    ours = ours.detach().to("cpu", torch.float64)
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours - ref).abs().max().item() if ours.numel() else 0.0
    bound = tol * max(ref.abs().max().item() if ref.numel() else 0.0, floor)
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"
