"""Resident memory of the fused losses: forward+backward in a fresh process needs, above its inputs and
the gradients it must return, about one chunk of fp32 logits (fused_distill_loss: one chunk of each
model's) — not the [N, V] logits, and not a second copy of dW (the forward computes dW and autograd
adopts that buffer as weight.grad).

Peak resident set (the kernel's high-water mark VmHWM, reset after the warm-up; what runs out first) is
measured in a child process so that nothing
else this test session allocated can hide or inflate it. Sizes: V = 151,936 (Qwen3), two chunks of
rows, and a hidden size at which dW is larger than a chunk, so a second copy of it would show.
"""
import json
import subprocess
import sys

import pytest

from afrl_fast.lm_head import TORCH_BLOCK_BYTES

CHILD = r"""
import json, resource, sys, torch
from afrl_fast.loss import default_chunk_rows, fused_loss
torch.set_num_threads(2)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

n, h, v, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g).requires_grad_()
weight = (torch.randn(v, h, generator=g) * 0.02).requires_grad_()
targets = torch.randint(0, v, (n,), generator=g)
rl = torch.arange(n) % 2 == 0
rows = dict(is_sft=~rl, advantages=torch.randn(n, generator=g), old_logp=torch.full((n,), -12.0),
            ref_logp=torch.full((n,), -12.0), scale=torch.full((n,), 1.0 / n))
# warm the backend (the native kernel's build/import allocates) before the baseline is taken
fused_loss(hidden[:2].detach(), weight[:8].detach(), targets[:2] % 8, **{k: t[:2] for k, t in rows.items()},
           backend=backend)
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

with open("/proc/self/clear_refs", "w") as f:   # reset the high-water mark: the warm-up's peak must not count
    f.write("5")
base = rss()
out = fused_loss(hidden, weight, targets, **rows, beta=0.01, backend=backend)
out.loss.backward()
peak = hwm() - base
grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight))
chunk = default_chunk_rows(n, v) * v * 4
print(json.dumps({"above_grads": peak - grads, "chunk": chunk, "full_logits": n * v * 4}))
"""


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_peak_rss_above_inputs_and_grads_is_about_one_chunk(backend):
    n, h, v = 442, 512, 151_936     # two chunks of 221 rows (134 MB); dW (311 MB) is larger than a chunk
    proc = subprocess.run([sys.executable, "-c", CHILD, str(n), str(h), str(v), backend],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # the torch backend walks a chunk in row blocks with one block-sized temporary of its own
    block = TORCH_BLOCK_BYTES["cpu"] if backend == "torch" else 0
    assert r["above_grads"] <= 1.25 * r["chunk"] + block, r
    assert r["full_logits"] >= 2 * r["chunk"]          # the test would see full logits if they existed


DISTILL_CHILD = r"""
import json, resource, sys, torch
from afrl_fast.distill_loss import fused_distill_loss
from afrl_fast.lm_head import default_chunk_rows
torch.set_num_threads(2)

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

n, hs, ht, v, backend = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
g = torch.Generator().manual_seed(0)
sh = torch.randn(n, hs, generator=g).requires_grad_()
sw = (torch.randn(v, hs, generator=g) * 0.02).requires_grad_()
th, tw = torch.randn(n, ht, generator=g), torch.randn(v, ht, generator=g) * 0.02
targets = torch.randint(0, v, (n,), generator=g)
kw = dict(kind="jsd", temperature=2.0, hard_label_weight=0.5, backend=backend)
# warm the backend (the native kernel's build/import allocates) before the baseline is taken
fused_distill_loss(sh[:2].detach(), sw[:8].detach(), th[:2], tw[:8], targets[:2] % 8, **kw)
with open("/proc/self/clear_refs", "w") as f:   # reset the high-water mark: the warm-up's peak must not count
    f.write("5")
base = rss()
out = fused_distill_loss(sh, sw, th, tw, targets, **kw)
out.loss.backward()
peak = hwm() - base
grads = sum(t.grad.numel() * t.grad.element_size() for t in (sh, sw))
chunk = 2 * default_chunk_rows(n, v, n_buffers=2) * v * 4     # one chunk of both models' logits
print(json.dumps({"above_grads": peak - grads, "chunk": chunk, "full_logits": 2 * n * v * 4}))
"""


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_distill_peak_rss_above_inputs_and_grads_is_about_one_chunk(backend):
    """Four chunks of 166 rows at V = 151,936 (192 MiB of both models' logits per chunk); the
    student's dW (297 MiB) is larger than a chunk, so a second copy of it would show."""
    n, hs, ht, v = 663, 512, 256, 151_936
    proc = subprocess.run([sys.executable, "-c", DISTILL_CHILD, str(n), str(hs), str(ht), str(v), backend],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # the torch backend walks a chunk in row blocks with six reused buffers of a quarter of
    # TORCH_BLOCK_BYTES each (log-probs and probabilities of both models, two scratch arrays)
    block = TORCH_BLOCK_BYTES["cpu"] * 6 // 4 if backend == "torch" else 0
    assert r["above_grads"] <= 1.25 * r["chunk"] + block, r
    assert r["full_logits"] >= 2.5 * r["chunk"]          # the test would see full logits if they existed
