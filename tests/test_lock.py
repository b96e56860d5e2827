"""The lock file and setup.py agree, and the environment the tests run in is the one they describe.

requirements/lock-cpu.txt pins the exact versions CI passed with (scripts/refresh_lock.sh writes it);
setup.py keeps ranges whose upper bounds are the newest tested major.minor. `.ci/run` installs through
the lock, or, with AFRL_FAST_LATEST_DEPS=1, the newest versions setup.py allows.
"""
import importlib.metadata as md
import os
import runpy
import sys
from pathlib import Path
from unittest import mock

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock-cpu.txt"
CPU_EXTRAS = ("dev", "serve", "docs")          # gpu (flash-attn) and sglang are GPU-only, not in the CPU lock


def setup_kwargs() -> dict:
    """The arguments setup.py passes to setuptools.setup, read by running it with setup() captured."""
    captured = {}
    with mock.patch("setuptools.setup", lambda **kw: captured.update(kw)), \
            mock.patch.object(sys, "argv", ["setup.py", "--name"]):
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def requirements() -> list[Requirement]:
    kw = setup_kwargs()
    reqs = [Requirement(r) for r in kw["install_requires"]]
    for extra in CPU_EXTRAS:
        reqs += [Requirement(r) for r in kw["extras_require"][extra]]
    return reqs


def lock_pins() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate(LOCK.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and name and version and " " not in line, f"{LOCK.name}:{n}: not NAME==VERSION: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_requirement_has_an_upper_bound():
    unbounded = [str(r) for r in requirements()
                 if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)]
    assert unbounded == [], f"setup.py requirements with no upper bound: {unbounded}"


def test_the_lock_pins_every_requirement_within_its_range():
    pins = lock_pins()
    missing = [r.name for r in requirements() if canonicalize_name(r.name) not in pins]
    assert missing == [], f"in setup.py but not pinned in {LOCK.name}: {missing}"
    outside = [f"{r} (lock: {pins[canonicalize_name(r.name)]})" for r in requirements()
               if not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)]
    assert outside == [], f"pinned outside setup.py's range: {outside}"


def test_the_installed_versions_are_the_locked_ones_or_in_range_in_latest_mode():
    pins = lock_pins()
    latest = os.environ.get("AFRL_FAST_LATEST_DEPS") == "1"
    wrong = []
    for r in requirements():
        installed = Version(md.version(r.name))
        if latest:
            if not r.specifier.contains(installed, prereleases=True):
                wrong.append(f"{r.name} {installed} outside {r.specifier}")
        elif installed.public != pins[canonicalize_name(r.name)].public:
            wrong.append(f"{r.name} {installed} != lock {pins[canonicalize_name(r.name)]}")
    assert wrong == [], ("the test environment is not the one the lock describes (install with "
                         f"`pip install -c requirements/lock-cpu.txt -e .[dev,docs]`): {wrong}")
