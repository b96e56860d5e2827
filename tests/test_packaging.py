"""A regular (non-editable) install works like the source tree: it ships the C++ sources of the
native kernel (so `backend="auto"` on CPU gets the native kernel, not the slower torch fallback),
the default rulebook and the demo config.

The wheel is built from this checkout and installed into a fresh virtual environment whose only
other path is this environment's site-packages (for torch & co) — without the editable install's
import hook, so nothing can be found in the source tree by accident.
"""
import glob
import shutil
import subprocess
import sys
from pathlib import Path

import sysconfig

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_regular_install_builds_the_native_kernel_and_finds_its_configs(tmp_path):
    # build from a copy: pip builds in the source folder and would leave build/ behind in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "results"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", tmp_path / "wheel", src])
    wheel = next((tmp_path / "wheel").glob("afrl_fast-*.whl"))
    site = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", site, wheel])
    run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"])
    venv_site = Path(glob.glob(str(tmp_path / "venv" / "lib" / "python*" / "site-packages"))[0])
    # plain path lines: the dev site-packages' own .pth files (the editable hook) are not processed
    (venv_site / "deps.pth").write_text(f"{site}\n{sysconfig.get_paths()['purelib']}\n")
    probe = (
        "import torch, afrl_fast, afrl_fast_csrc\n"
        "from afrl_fast.backends import resolve_backend\n"
        "from afrl_fast.native_build import native_unavailable_reason\n"
        "from afrl_fast.rulebook import load_rulebook\n"
        "from afrl_fast.config import DEMO_CONFIG, load_config\n"
        "import afrl_fast.serve.cli  # the service's subpackage is shipped too\n"
        "print(afrl_fast.__file__)\n"
        "print(resolve_backend('auto', torch.device('cpu'))[0], native_unavailable_reason())\n"
        "print(len(load_rulebook().rules), load_config(DEMO_CONFIG).run.out_dir)\n"
    )
    out = run([tmp_path / "venv" / "bin" / "python", "-c", probe], cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(str(site)), out          # the installed copy, not the source tree
    assert out[1].split()[0] == "native", out
    assert out[2].split()[1] == "runs/demo", out


def test_sources_cite_no_document_outside_the_repository():
    """Docstrings and docs point into this repository (README, the paper's sections), never to a
    design document a reader of the package does not have."""
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml", "*.txt", "*.cpp"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked, "no tracked files found"
    needles = ("DESIGN" + " §", "DESIGN" + ".md")      # spelt apart so this file does not match itself
    cited = [f"{name}:{n}" for name in tracked
             for n, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1)
             if any(x in line for x in needles)]
    assert not cited, cited
