"""benchmarks/gpu_check.py, the device session's check, run here as `--cpu-dry-run`: every section at
tiny shapes on CPU with Triton under its interpreter, so that what a CPU can catch (an API misuse, a
wrong argument, a broken import path) fails here and not in the few minutes a GPU is lent.

One dry run (in a child process: TRITON_INTERPRET=1 must be set before triton is imported, and this
pytest process must keep the real JITFunction for tests/test_kernel_compile.py) is shared by the
checks below (the slow tier: about a minute of CPU time). A section that raises is recorded with status "error",
one whose checks fail with "fail", and the script then exits 1: test_a_broken_section_fails_the_run
forces one to make sure these checks can fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ("env", "kernels", "fused_loss", "rl_step", "scoring", "trl")
# What the dry run may skip, and only for this reason: a peer that is not installed (liger-kernel and
# trl are dev extras). Everything else must run and pass.
OPTIONAL_PEERS = {"liger_grpo", "liger_jsd"}
NOT_INSTALLED = "not installed"


def run_check(out: Path, *args, env=None, timeout=1200):
    cmd = [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TQDM_DISABLE": "1", "AFRL_FAST_NO_NATIVE": "1", **(env or {})})
    report = json.loads(out.read_text()) if out.exists() else None
    return proc, report


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    proc, report = run_check(out)
    tail = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert report is not None, f"no JSON written (exit {proc.returncode})\n{tail}"
    return proc, report, tail


@pytest.mark.slow
def test_exits_zero_and_reports_every_section(dry_run):
    proc, report, tail = dry_run
    assert list(report["sections"]) == list(SECTIONS), tail
    assert report["meta"]["dry_run"] is True
    bad = {name: (sec["status"], sec.get("error") or sec.get("failed") or sec.get("reason"))
           for name, sec in report["sections"].items() if sec["status"] != "ok"}
    if "trl" in bad and bad["trl"][0] == "skipped" and NOT_INSTALLED in str(bad["trl"][1]):
        del bad["trl"]             # the optional peer is absent here
    assert not bad, f"{bad}\n{tail}"
    assert proc.returncode == 0, tail


@pytest.mark.slow
def test_env_names_the_versions(dry_run):
    env = dry_run[1]["sections"]["env"]["result"]
    for key in ("torch", "triton", "transformers", "python"):
        assert env[key], key
    assert env["triton_interpret"] == "1" and env["gpu"] is None


@pytest.mark.slow
def test_kernel_errors_are_within_the_tests_tolerances(dry_run):
    sec = dry_run[1]["sections"]["kernels"]
    cases = sec["cases"]
    names = [c["case"] for c in cases]
    for prefix in ("vocab/", "distill/", "nonfinite/vocab/", "nonfinite/distill/", "fused/", "fused_distill/"):
        assert any(n.startswith(prefix) for n in names), f"no {prefix} case ran"
    assert any(c.get("dtype") == "bfloat16" for c in cases) and any(c.get("dtype") == "float32" for c in cases)
    for case in cases:
        assert "error" not in case, case
        assert case["pass"], case
        for field, res in case.get("fields", {}).items():
            assert res["pass"], (case["case"], field, res)
            if "ratio" in res:      # max error / the bound the CPU test uses: ≤ 1 passes
                assert 0.0 <= res["ratio"] <= 1.0, (case["case"], field, res)


@pytest.mark.slow
def test_fused_loss_rows_ran_and_agree(dry_run):
    sec = dry_run[1]["sections"]["fused_loss"]
    for part in ("grpo", "distill"):
        rows = {r["variant"]: r for r in sec[part]}
        assert set(rows) >= {"ours_triton", "ours_triton_tf32", "plain_torch", "gemm_floor"}, part
        for name, row in rows.items():
            if row["status"] == "skipped":
                assert name in OPTIONAL_PEERS and NOT_INSTALLED in row["reason"], (part, row)
                continue
            assert row["status"] == "ok", (part, row)
            assert row["median_s"] > 0 and len(row["times_s"]) >= 1
            if row.get("loss") is not None:        # every loss is the same loss
                assert row["loss_rel_diff_vs_ours"] < 2e-3, (part, name, row["loss"], rows["ours_triton"]["loss"])


@pytest.mark.slow
def test_rl_step_reports_each_phase(dry_run):
    sec = dry_run[1]["sections"]["rl_step"]
    assert len(sec["steps"]) == 2
    for st in sec["steps"]:
        for phase in ("rollout", "verify", "advantages", "logprobs", "loss", "optimizer", "sync"):
            assert phase in st, (phase, st)
        assert st["tokens"] > 0 and st["wall_s"] > 0
    assert sec["settings"]["loss_backend"] == "triton"


@pytest.mark.slow
def test_scoring_reports_both_methods(dry_run):
    sec = dry_run[1]["sections"]["scoring"]
    assert [r["method"] for r in sec["rows"]] == ["prefix_cached", "full_prefill"]
    assert all(r["pairs_per_s"] > 0 for r in sec["rows"])
    assert sec["rows"][0]["prefix_tokens"] > 0          # the prefix was cached and reused
    assert sec["max_prob_diff"] < 1e-3                   # both methods score the same pairs alike


@pytest.mark.slow
def test_a_broken_section_fails_the_run(tmp_path):
    """The guard records the exception and the run exits 1, the other sections still run."""
    out = tmp_path / "broken.json"
    proc, report = run_check(out, "--sections", "env,scoring", env={"AFRL_GPU_CHECK_FAIL": "env"}, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    env = report["sections"]["env"]
    assert env["status"] == "error" and "forced failure" in env["error"] and "Traceback" in env["traceback"]
    assert report["sections"]["scoring"]["status"] == "ok"


def test_unknown_section_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--sections", "env,nope",
                           "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


_NO_INSTALL = r"""
import importlib, sys
from pathlib import Path
# What the device machine has: the checkout, no installed afrl-fast (drop the editable install's hooks).
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and Path(p or ".").resolve() != Path(sys.argv[1])]
sys.path_importer_cache.clear()
for name in [m for m in sys.modules if m.startswith("afrl_fast")]:
    del sys.modules[name]
try:
    importlib.import_module("afrl_fast_kernels.constants")
    print("INSTALLED-STILL-VISIBLE")
    raise SystemExit(0)
except ImportError:
    pass
sys.argv = [sys.argv[2], "--cpu-dry-run"]
sys.path.insert(0, str(Path(sys.argv[0]).parent))
import gpu_check
from afrl_fast.resources import CONFIG_DIR, CSRC_DIR
import afrl_fast_kernels.vocab_pass, afrl_fast_kernels.reference, afrl_fast
root = Path(gpu_check.ROOT)
assert CONFIG_DIR == root / "configs" and CSRC_DIR == root / "csrc", (CONFIG_DIR, CSRC_DIR)
assert Path(afrl_fast.__file__).parent == root / "afrl_fast"
assert Path(afrl_fast_kernels.vocab_pass.__file__).parent == root / "kernels"
assert sys.path[-1] == str(root) and sys.path.index(str(root)) > 0, sys.path
print("MODE", gpu_check.IMPORT_MODE)
"""


def test_project_imports_without_an_install():
    """On the device nothing is pip-installed: the script registers kernels/, csrc/, configs/ under
    their package names and appends the root — it never puts the root first."""
    proc = subprocess.run([sys.executable, "-c", _NO_INSTALL, str(ROOT), str(SCRIPT)], cwd="/", capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if "INSTALLED-STILL-VISIBLE" in proc.stdout:
        pytest.skip("this environment installs afrl-fast in a way the test cannot hide")
    assert "MODE path setup" in proc.stdout, proc.stdout
