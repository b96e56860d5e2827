"""Project-wide pytest options: `pytest benchmarks/ --benchmark` runs the benchmarks; `--tier`
chooses between the quick tier (the default) and the slow tier of long end-to-end tests.

Benchmarks measure and print tables; plain `pytest` (tests/ only, see pytest.ini) asserts behaviour.
Tests marked `slow` (whole runs through torchrun, SIGKILL-and-resume, served models end to end)
are left out of the default tier so `python -m pytest -q` stays within its time budget; `.ci/run`
runs them too, as `python -m pytest -q --tier slow`. A slow test named explicitly on the command line
(`pytest tests/test_x.py::test_y`) always runs.
"""
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks in benchmarks/ (they are skipped otherwise)")
    parser.addoption("--tier", choices=("quick", "slow", "all"), default="quick",
                     help="quick: tests not marked slow (default); slow: only those; all: both")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "benchmark: a benchmark; runs only with --benchmark")
    config.addinivalue_line("markers", "slow: a long end-to-end test; runs with --tier slow or --tier all")
    if config.getoption("--benchmark") and "P" not in (config.option.reportchars or ""):
        # show each benchmark's printed table (captured stdout of passed tests) without needing -s;
        # tryfirst: before the terminal reporter reads the report characters
        config.option.reportchars = (config.option.reportchars or "") + "P"


def pytest_collection_modifyitems(config, items):
    select_tier(config, items)
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with `pytest benchmarks/ --benchmark`")
    for item in items:
        if "benchmark" in item.keywords:
            item.add_marker(skip)


def select_tier(config, items) -> None:
    """Deselect (not skip: a skipped test is no coverage) the tests outside the chosen tier."""
    tier = config.getoption("--tier")
    if tier == "all":
        return
    named = [(Path(a.split("::", 1)[0]).resolve(), a.split("::", 1)[1]) for a in config.args if "::" in a]
    keep, drop = [], []
    for item in items:
        explicit = any(item.path.resolve() == path and item.nodeid.split("::", 1)[1].startswith(name)
                       for path, name in named)
        in_tier = ("slow" in item.keywords) == (tier == "slow")
        (keep if explicit or in_tier else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
