"""Every Triton kernel (the vocab pass and the distill pass) compiles for sm_80 and sm_90 without
register spills (the budget docs/results/benchmarks.md reports: registers, spills and shared memory
per variant).

No GPU is needed: Triton lowers to PTX/cubin on the CPU and the ptxas it ships reports registers
and spills. The compile runs in a child interpreter (`compile_check.run_isolated`) so that another
test module having switched TRITON_INTERPRET on cannot hand us InterpretedFunctions. A missing
ptxas fails these tests with the compile check's message; it never skips them.
"""
from __future__ import annotations

import pytest

from afrl_fast_kernels import compile_check as cc


@pytest.fixture(scope="module")
def compiled():
    return cc.run_isolated(spill_probe=True)


def test_every_variant_compiled_for_both_archs(compiled):
    records = compiled["records"]
    seen = {(r.variant, r.arch) for r in records}
    assert len(seen) == len(records), "duplicate records"
    variants = {r.variant for r in records}
    assert {r.arch for r in records} == {"sm_80", "sm_90a"}
    assert seen == {(v, a) for v in variants for a in ("sm_80", "sm_90a")}
    assert {r.kernel for r in records} == {"vocab_pass_kernel", "distill_pass_kernel"}
    by_kernel = lambda name: {r.variant for r in records if r.kernel == name}   # noqa: E731
    # vocab pass: both modes, both reference settings and both logits dtypes, at the production tile.
    for token in ("fp32", "bf16", "fwd", "train", "noref", " ref", "BLOCK_V=2048 w8"):
        assert any(token in v for v in by_kernel("vocab_pass_kernel")), token
    # distill pass: every kind forward-only and training (τ = 1 without the hard label, τ ≠ 1 with it),
    # at the production tile and the small-vocabulary one.
    distill = by_kernel("distill_pass_kernel")
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        for mode in ("fwd BLOCK_V=2048", "train BLOCK_V=2048", "train tau!=1 +CE BLOCK_V=2048",
                     "train tau!=1 +CE BLOCK_V=1024"):
            assert f"fp32 {kind} {mode}" in " | ".join(distill), (kind, mode)


def test_no_register_spills(compiled):
    spilling = [r for r in compiled["records"] if r.spills or r.stack]
    assert not spilling, "register spills:\n" + cc.format_table(spilling)


def test_registers_reported_and_consistent(compiled):
    """Registers must be parsed (> 0) and agree between ptxas -v and the cubin Triton built, so a
    broken parse cannot pass as 'no spills'."""
    for r in compiled["records"]:
        assert 0 < r.registers <= 255, r
        assert r.registers == r.cubin_registers, r
        assert r.smem_dynamic >= 0 and r.smem_static >= 0


def test_spill_probe_is_detected(compiled):
    """A kernel starved to 32 registers in one warp must show spills: the check above can fail."""
    probe = compiled["probe"]
    assert probe.spill_stores > 0 and probe.spill_loads > 0 and probe.stack > 0, probe
    assert probe.registers <= 32


PTXAS_LOG = """ptxas-blackwell info    : 11 bytes gmem
ptxas-blackwell info    : Compiling entry function 'helper' for 'sm_90a'
ptxas-blackwell info    : Function properties for helper
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas-blackwell info    : Used 12 registers
ptxas-blackwell info    : Compiling entry function 'vocab_pass_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _noinline_helper
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Function properties for vocab_pass_kernel
    16 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 64 bytes smem, 444 bytes cmem[0]
"""


def test_parse_ptxas_log_reads_the_named_entry():
    got = cc.parse_ptxas_log(PTXAS_LOG, "vocab_pass_kernel")
    assert got == {"registers": 255, "stack": 16, "spill_stores": 24, "spill_loads": 20, "smem_static": 64}
    with pytest.raises(ValueError, match="no entry function"):
        cc.parse_ptxas_log(PTXAS_LOG, "other_kernel")
    with pytest.raises(ValueError, match="cannot parse"):
        cc.parse_ptxas_log("ptxas info : Compiling entry function 'k' for 'sm_80'\n", "k")


def test_parse_cuobjdump_usage():
    text = " Function vocab_pass_kernel:\n  REG:36 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:664 TEXTURE:0\n"
    assert cc.parse_cuobjdump_usage(text, "vocab_pass_kernel") == {"cubin_registers": 36, "cubin_stack": 8}
    with pytest.raises(ValueError):
        cc.parse_cuobjdump_usage(text, "other")


def test_missing_ptxas_is_a_clear_error(monkeypatch):
    import triton.backends.nvidia.compiler as nvc

    def no_ptxas(arch):
        raise RuntimeError("Cannot find ptxas")

    monkeypatch.setattr(nvc, "get_ptxas", no_ptxas)
    with pytest.raises(FileNotFoundError, match="cannot locate ptxas for sm_80"):
        cc.find_ptxas(80)
