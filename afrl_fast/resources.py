"""Where the folders shipped beside the package live: configs/ and csrc/ (and kernels/).

They install as the namespace packages `afrl_fast_configs`, `afrl_fast_csrc` and `afrl_fast_kernels`
(see setup.py). Namespace packages, with no `__init__.py`, on purpose: a regular package at the
repository root named `kernels` (or `configs`, `csrc`) would shadow any installed distribution of that
name whenever the root comes first on `sys.path` (`python -m pytest`, `python -m afrl_fast.x` from the
root), and transformers imports the `kernels` distribution. A folder without `__init__.py` can never
shadow a regular package.
"""
import importlib
from pathlib import Path


def shipped_folder(package: str) -> Path:
    """The folder of a shipped namespace package (editable or regular install alike)."""
    module = importlib.import_module(package)
    folders = [Path(p) for p in module.__path__]
    if not folders:
        raise ImportError(f"{package} is installed without a folder; reinstall afrl-fast (pip install -e .)")
    return folders[0].resolve()


CONFIG_DIR = shipped_folder("afrl_fast_configs")
CSRC_DIR = shipped_folder("afrl_fast_csrc")
