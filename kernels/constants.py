"""Constants shared by every kernel of afrl-fast (`afrl_fast_kernels.constants`).

The folder kernels/ holds the Triton kernels and their float64 torch references; it installs as the
namespace package `afrl_fast_kernels` and has no `__init__.py` on purpose: a regular package named
`kernels` at the repository root would shadow the `kernels` distribution that transformers imports.

Each kernel has a float64 torch reference (`reference.py`), a test in tests/ and a benchmark in
benchmarks/ under the same name: `vocab_pass` → tests/test_vocab_pass_triton.py,
benchmarks/bench_vocab_pass.py; `distill_pass` → tests/test_distill_pass_triton.py,
benchmarks/bench_distill_pass.py. The dispatch between these kernels, the native C++ ones (csrc/) and
plain torch lives in `afrl_fast.backends`; each kernel's implementations are listed side by side in
`afrl_fast.vocab_pass` and `afrl_fast.distill_pass`.

IGNORE_INDEX is defined here, the lowest layer, once for the whole project: a target row with this
value contributes nothing (no loss, zero gradient, zero log-prob and entropy).

DISTILL_KINDS lists the divergences of the distillation loss in the order of their integer codes
(the native and Triton kernels take the code): forward KL(P‖Q), reverse KL(Q‖P) and the generalized
Jensen-Shannon divergence, P the teacher and Q the student (afrl_fast.loss.fused_distill_loss).
"""
IGNORE_INDEX = -100
DISTILL_KINDS = ("forward_kl", "reverse_kl", "jsd")
