"""Compile the Triton kernels for sm_80 / sm_90 without a GPU and report their resource use.

Triton lowers a kernel all the way to a cubin without touching a device:
`triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`.
From the result we take three views of the same kernel:

  * ptxas -v on the PTX (the ptxas that Triton itself uses for that arch, same flags): registers,
    spill stores/loads, stack frame, static shared memory;
  * cuobjdump -res-usage on the cubin Triton produced: registers and local memory of the binary
    that would actually be launched (a cross-check of the ptxas parse);
  * the compiled metadata: dynamic shared memory Triton reserves at launch (`shared`), and
    `n_regs` / `n_spills` when the runtime has filled them (it only does so on a GPU).

Run `python -m afrl_fast_kernels.compile_check` for the table (also benchmarks/bench_kernel_compile.py).
The kernels must be imported without TRITON_INTERPRET=1 (under the interpreter @triton.jit returns
an InterpretedFunction, which cannot be compiled); `run_isolated` guarantees that from any process.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARCHS = (80, 90)
# The vocabulary the launch config is chosen for: Qwen's. A small vocabulary gets the
# largest tile of the 4-warp configuration the launcher uses below 2048 (V not a multiple of 16).
PRODUCTION_VOCAB = 151_936
SMALL_VOCAB = 1000

_DTYPES = {"fp32": "*fp32", "bf16": "*bf16"}
# Flags Triton passes to ptxas in make_cubin (minus the output file), so both agree on registers.
_PTXAS_FLAGS = ["-lineinfo", "-v", "--regAllocOptLevel=2"]


@dataclass(frozen=True)
class Variant:
    """One compiled specialisation of a kernel: constexprs, logits dtype, launch options."""
    fn: object
    signature: dict
    constexprs: dict
    options: dict             # triton.compile options: num_warps (as the launcher picks), maxnreg...
    label: str
    attrs: dict = field(default_factory=dict)


@dataclass
class CompileRecord:
    kernel: str
    variant: str
    arch: str
    registers: int            # ptxas -v
    spill_stores: int         # bytes
    spill_loads: int          # bytes
    stack: int                # bytes of stack frame
    smem_static: int          # bytes, ptxas
    smem_dynamic: int         # bytes, Triton metadata `shared`
    cubin_registers: int      # cuobjdump -res-usage on Triton's own cubin
    cubin_stack: int          # bytes of stack in that cubin (spilled values live there)
    meta_n_regs: int | None = None    # runtime metadata; None without a GPU
    meta_n_spills: int | None = None

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


# --- the kernel of vocab_pass.py ---------------------------------------------------------------

def _vocab_pass_signature(dtype: str) -> dict:
    ptr = {name: "*fp32" for name in ("adv_ptr", "old_ptr", "ref_ptr", "scale_ptr", "loss_ptr", "logp_ptr",
                                      "entropy_ptr", "k3_ptr")}
    sig = {"logits_ptr": _DTYPES[dtype], "targets_ptr": "*i64", "is_sft_ptr": "*i1", "clipped_ptr": "*i1", **ptr,
           "V": "i32", "stride": "i32", "rl_inv_temp": "fp32", "beta": "fp32", "eps_low": "fp32", "eps_high": "fp32",
           "HAS_REF": "constexpr", "ON_POLICY": "constexpr", "WITH_GRAD": "constexpr", "BLOCK_V": "constexpr"}
    from .vocab_pass import vocab_pass_kernel
    return {name: sig[name] for name in vocab_pass_kernel.arg_names}   # the kernel's parameter order


def _divisibility_attrs(fn, signature: dict, vocab: int) -> dict:
    """What the runtime specialises at launch: 16-byte aligned pointers (torch allocations are),
    and V / the row strides divisible by 16 when they are (151,936 is)."""
    names = [n for n in signature if signature[n].startswith("*")]
    if vocab % 16 == 0:
        names += [n for n in signature if n == "V" or n.startswith("stride")]
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


def vocab_pass_variants(vocab: int = PRODUCTION_VOCAB) -> list[Variant]:
    """Every specialisation the launcher uses at this vocabulary: both modes, with/without ref, fp32/bf16,
    and the on-policy training variant (no old log-probs) with a reference."""
    from .vocab_pass import launch_config, vocab_pass_kernel
    block_v, num_warps = launch_config(vocab)
    out = []
    for dtype in _DTYPES:
        for with_grad in (False, True):
            for has_ref, on_policy in ((False, False), (True, False)) + (((True, True),) if with_grad else ()):
                sig = _vocab_pass_signature(dtype)
                out.append(Variant(
                    fn=vocab_pass_kernel, signature=sig,
                    constexprs={"HAS_REF": has_ref, "ON_POLICY": on_policy, "WITH_GRAD": with_grad,
                                "BLOCK_V": block_v},
                    options={"num_warps": num_warps}, attrs=_divisibility_attrs(vocab_pass_kernel, sig, vocab),
                    label=f"{dtype} {'train' if with_grad else 'fwd'} {'ref' if has_ref else 'noref'}"
                          f"{' on-policy' if on_policy else ''} BLOCK_V={block_v} w{num_warps}"))
    return out


# --- tools ---------------------------------------------------------------------------------------

def _nvidia_bin_dir() -> Path:
    import triton.backends.nvidia as nv
    return Path(nv.__file__).parent / "bin"


def find_ptxas(arch: int) -> str:
    """The ptxas Triton uses for this arch (via its knobs: TRITON_PTXAS_PATH etc. are honoured)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
    except Exception as exc:  # noqa: BLE001 - any failure here means "not found", reported below
        raise FileNotFoundError(f"cannot locate ptxas for sm_{arch} through triton's knobs: {exc!r}; "
                                f"expected it under {_nvidia_bin_dir()}") from exc
    if not path or not os.access(path, os.X_OK):
        raise FileNotFoundError(f"ptxas for sm_{arch} not found or not executable: {path!r}")
    return path


def find_cuobjdump() -> str:
    path = _nvidia_bin_dir() / "cuobjdump"
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"cuobjdump not found or not executable at {path}")
    return str(path)


def gpu_name(arch: int) -> str:
    # Triton compiles sm_90 as sm_90a (wgmma/TMA); ptxas must be told the same.
    return f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"


# --- parsing ---------------------------------------------------------------------------------------

_RE_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str, entry: str) -> dict:
    """Registers, spills, stack and static smem of `entry` from `ptxas -v` output.

    ptxas prints one block per function: 'Compiling entry function' / 'Function properties'
    (stack, spills) / 'Used N registers, ... M bytes smem'. Raises if the entry is missing so a
    format change fails loudly instead of reading as zero registers.
    """
    blocks = _RE_ENTRY.split(log)          # [preamble, name1, body1, name2, body2, ...]
    bodies = {blocks[i]: blocks[i + 1] for i in range(1, len(blocks) - 1, 2)}
    if entry not in bodies:
        raise ValueError(f"ptxas log has no entry function {entry!r}:\n{log}")
    body = bodies[entry]
    # Non-inlined device functions print their own 'Function properties' block in between.
    props = body.split(f"Function properties for {entry}", 1)
    frame = _RE_FRAME.search(props[1]) if len(props) == 2 else None
    used = _RE_USED.search(body)
    if frame is None or used is None:
        raise ValueError(f"cannot parse ptxas resource lines for {entry!r}:\n{body}")
    smem = _RE_SMEM.search(body)
    return {"registers": int(used.group(1)), "stack": int(frame.group(1)), "spill_stores": int(frame.group(2)),
            "spill_loads": int(frame.group(3)), "smem_static": int(smem.group(1)) if smem else 0}


def parse_cuobjdump_usage(text: str, entry: str) -> dict:
    """REG and STACK of `entry` from `cuobjdump -res-usage`."""
    match = re.search(rf"Function {re.escape(entry)}:\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if match is None:
        raise ValueError(f"cuobjdump output has no resource line for {entry!r}:\n{text}")
    return {"cubin_registers": int(match.group(1)), "cubin_stack": int(match.group(2))}


# --- compile + measure ---------------------------------------------------------------------------

def _run_tool(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout + proc.stderr          # ptxas -v writes its report to stderr


def ptxas_report(ptx: str, arch: int, entry: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = Path(tmp) / "k.ptx", Path(tmp) / "k.o"
        src.write_text(ptx)
        log = _run_tool([find_ptxas(arch), *_PTXAS_FLAGS, f"--gpu-name={gpu_name(arch)}", str(src), "-o", str(obj)])
    return parse_ptxas_log(log, entry)


def cubin_report(cubin: bytes, entry: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return parse_cuobjdump_usage(_run_tool([find_cuobjdump(), "-res-usage", str(path)]), entry)


def compile_variant(variant: Variant, arch: int) -> CompileRecord:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(variant.fn, "arg_names"):
        raise RuntimeError("kernel is not a JITFunction (was TRITON_INTERPRET=1 set when it was imported?)")
    find_ptxas(arch)                      # fail with the clear message before a long compile
    src = ASTSource(variant.fn, variant.signature, variant.constexprs, variant.attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=variant.options)
    entry = compiled.metadata.name
    return CompileRecord(
        kernel=entry, variant=variant.label, arch=gpu_name(arch),
        **ptxas_report(compiled.asm["ptx"], arch, entry),
        smem_dynamic=int(compiled.metadata.shared),
        **cubin_report(compiled.asm["cubin"], entry),
        meta_n_regs=getattr(compiled, "n_regs", None), meta_n_spills=getattr(compiled, "n_spills", None),
    )


# --- the kernel of distill_pass.py ---------------------------------------------------------------

def _distill_pass_signature() -> dict:
    sig = {**{name: "*fp32" for name in ("s_ptr", "t_ptr", "coef_ptr", "div_ptr", "ce_ptr")}, "targets_ptr": "*i64",
           "V": "i32", "stride_s": "i32", "stride_t": "i32",
           **{name: "fp32" for name in ("inv_temp", "beta", "log_beta", "log_cbeta", "ce_coef")},
           **{name: "constexpr" for name in ("KIND", "SEPARATE_CE", "CE", "WITH_GRAD", "BLOCK_V")}}
    from .distill_pass import distill_pass_kernel
    return {name: sig[name] for name in distill_pass_kernel.arg_names}


def distill_pass_variants(vocab: int = PRODUCTION_VOCAB, train_with_ce_only: bool = False) -> list[Variant]:
    """Per kind: forward only at τ = 1, training at τ = 1 without the hard label, and training at
    τ ≠ 1 with it (its own τ = 1 statistics and the largest live set). train_with_ce_only: the last alone."""
    from afrl_fast_kernels.constants import DISTILL_KINDS
    from .distill_pass import distill_pass_kernel, launch_config
    block_v, num_warps = launch_config(vocab)
    sig = _distill_pass_signature()
    settings = ((False, False, False), (True, False, False), (True, True, True))
    out = []
    for kind in DISTILL_KINDS:
        for with_grad, separate_ce, ce in settings[2:] if train_with_ce_only else settings:
            out.append(Variant(
                fn=distill_pass_kernel, signature=sig,
                constexprs={"KIND": DISTILL_KINDS.index(kind), "SEPARATE_CE": separate_ce, "CE": ce,
                            "WITH_GRAD": with_grad, "BLOCK_V": block_v},
                options={"num_warps": num_warps}, attrs=_divisibility_attrs(distill_pass_kernel, sig, vocab),
                label=f"fp32 {kind} {'train' if with_grad else 'fwd'}{' tau!=1 +CE' if ce else ''} "
                      f"BLOCK_V={block_v} w{num_warps}"))
    return out


def all_variants() -> list[Variant]:
    return (vocab_pass_variants(PRODUCTION_VOCAB) + vocab_pass_variants(SMALL_VOCAB)
            + distill_pass_variants(PRODUCTION_VOCAB) + distill_pass_variants(SMALL_VOCAB, train_with_ce_only=True))


def compile_all(archs=ARCHS, variants=None) -> list[CompileRecord]:
    """Compile every kernel variant for every arch; one record each."""
    variants = all_variants() if variants is None else variants
    return [compile_variant(v, arch) for v in variants for arch in archs]


def format_table(records: list[CompileRecord]) -> str:
    head = f"{'kernel':<20} {'variant':<48} {'arch':<7} {'regs':>4} {'cubin':>5} {'spill st/ld':>11} " \
           f"{'stack':>5} {'smem st':>7} {'smem dyn':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        lines.append(f"{r.kernel:<20} {r.variant:<48} {r.arch:<7} {r.registers:>4} {r.cubin_registers:>5} "
                     f"{f'{r.spill_stores}/{r.spill_loads}':>11} {r.stack:>5} {r.smem_static:>7} {r.smem_dynamic:>8}")
    return "\n".join(lines)


def spill_probe_variant() -> Variant:
    """The production train-mode kernel starved to 32 registers in one warp: it MUST spill. Compiled
    beside the real variants, it shows the spill parsing can report a non-zero count."""
    real = vocab_pass_variants(PRODUCTION_VOCAB)[-1]
    return Variant(fn=real.fn, signature=real.signature, constexprs=real.constexprs, attrs=real.attrs,
                   options={"num_warps": 1, "maxnreg": 32}, label="probe: " + real.label.split(" w")[0] + " w1 maxnreg=32")


def run_isolated(spill_probe: bool = False, timeout: float = 600.0) -> dict:
    """compile_all() in a fresh interpreter without TRITON_INTERPRET, so a test module elsewhere in
    the same pytest process that switched the interpreter on (or imported the kernels under it)
    cannot turn the kernels into InterpretedFunctions here. Returns {"records": [...], "probe": ...}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.json"
        cmd = [sys.executable, "-m", "afrl_fast_kernels.compile_check", "--json", str(out)]
        proc = subprocess.run(cmd + (["--spill-probe"] if spill_probe else []), env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"kernel compile check failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        data = json.loads(out.read_text())
    data["records"] = [CompileRecord(**r) for r in data["records"]]
    data["probe"] = CompileRecord(**data["probe"]) if data["probe"] else None
    return data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the records to this file")
    parser.add_argument("--spill-probe", action="store_true", help="compile the must-spill probe (sm_80) too")
    args = parser.parse_args(argv)
    records = compile_all()
    probe = compile_variant(spill_probe_variant(), 80) if args.spill_probe else None
    print(format_table(records + ([probe] if probe else [])))
    if args.json:
        Path(args.json).write_text(json.dumps({"records": [asdict(r) for r in records],
                                               "probe": asdict(probe) if probe else None}))


if __name__ == "__main__":
    main()
