"""Project-wide pytest options: `pytest benchmarks/ --benchmark` runs the benchmarks.

Benchmarks measure and print tables; plain `pytest` (tests/ only, see pytest.ini) asserts behaviour.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run the benchmarks in benchmarks/ (they are skipped otherwise)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "benchmark: a benchmark; runs only with --benchmark")
    if config.getoption("--benchmark") and "P" not in (config.option.reportchars or ""):
        # show each benchmark's printed table (captured stdout of passed tests) without needing -s;
        # tryfirst: before the terminal reporter reads the report characters
        config.option.reportchars = (config.option.reportchars or "") + "P"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with `pytest benchmarks/ --benchmark`")
    for item in items:
        if "benchmark" in item.keywords:
            item.add_marker(skip)
