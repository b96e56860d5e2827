"""Nothing in this repository shadows an installed distribution, however the code is started.

transformers imports the Hugging Face `kernels` distribution at model-import time; the repository's
top-level kernels/ folder once was a regular package and, whenever the repository root came first on
sys.path (`python -m pytest`, `python -m afrl_fast.x` from the root, a script that prepended the root),
took its place, and the model import died. These tests start fresh interpreters the ways a user does.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLIS = ["data", "distill", "evaluate", "experiments", "metrics", "piar", "report", "serve", "synthesize",
        "train", "verify"]


def installed(module_file: str) -> bool:
    """True when a module file lies in an installed distribution (site-packages), not the checkout."""
    return Path(module_file).resolve().parent.parent.name in ("site-packages", "dist-packages")


def python(args, cwd=ROOT, **env):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_no_top_level_folder_but_the_package_is_a_regular_package():
    """A folder without __init__.py can never shadow a regular package (PEP 420: a regular package
    anywhere on sys.path wins over namespace portions), so this holds by construction."""
    regular = sorted(d.name for d in ROOT.iterdir()
                     if d.is_dir() and (d / "__init__.py").exists() and d.name != "afrl_fast")
    assert regular == [], f"top-level folders that would shadow a distribution of their name: {regular}"


def test_from_the_repository_root_the_installed_kernels_and_qwen3_are_imported():
    # `python -c` from the root puts the root first on sys.path, as `python -m pytest` does
    out = python(["-c", "import sys; assert sys.path[0] in ('', '.'), sys.path[:2]\n"
                        "import kernels, transformers.integrations.hub_kernels\n"
                        "from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM\n"
                        "from afrl_fast.policy import build_lm\n"
                        "print(kernels.__file__)"])
    assert installed(out.strip()), out


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_help_runs_from_the_repository_root(cli):
    out = python(["-m", f"afrl_fast.{cli}", "--help"])
    assert "usage" in out.lower(), out


@pytest.mark.parametrize("script", ["afrl_fast/train.py", "afrl_fast/distill.py"])
def test_scripts_run_by_path_do_not_put_the_package_folder_or_root_first(script):
    # torchrun runs the file by path: its folder (afrl_fast/, with config.py, data.py, metrics.py ...)
    # would otherwise come first on sys.path
    out = python([script, "--help"])
    assert "usage" in out.lower(), out
    # what Python does for `python afrl_fast/train.py`: the script's folder becomes sys.path[0]
    probe = ("import runpy, sys\n"
             f"sys.path[0] = {str(ROOT / 'afrl_fast')!r}\n"
             f"sys.argv = [{script!r}, '--help']\n"
             "try:\n"
             f"    runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
             "except SystemExit:\n"
             "    pass\n"
             "import kernels\n"
             "print(repr(sys.path)); print(kernels.__file__)\n")
    lines = python(["-c", probe], cwd=ROOT / "tests").strip().splitlines()
    path, kernels_file = eval(lines[-2]), lines[-1]
    assert str(ROOT / "afrl_fast") not in path, path
    assert str(ROOT) not in path[:-1], path            # appended as a fallback, never before the rest
    assert installed(kernels_file), kernels_file
