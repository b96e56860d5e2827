"""The documentation cannot drift from the code: the generated reference pages are current, the site
builds in strict mode, every repository path the README and the docs name exists, and the README's
install and test commands are the ones CI runs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def test_generated_reference_pages_are_current():
    proc = subprocess.run([sys.executable, "scripts/gen_cli_docs.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_every_tool_and_config_section_has_a_page():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_cli_docs
    finally:
        sys.path.pop(0)
    for name, _, _ in gen_cli_docs.TOOLS:
        assert (DOCS / "reference" / "cli" / f"{name}.md").is_file(), name
    config = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    for key in ("model.path", "data.dir", "rl.stages.N.grpo_weight", "rl.sglang.tp_size", "distill.kind"):
        assert f"`{key}`" in config, key


def test_the_site_builds_in_strict_mode(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


# Inline code that is nothing but a path under one of these folders names a file of this repository.
REPO_PATH = re.compile(r"`((?:afrl_fast|configs|results|benchmarks|scripts|tests|kernels|csrc|data/noveleval|requirements|docs|"
                       r"\.ci)/[\w./-]*)`")


def documents():
    yield README
    yield from sorted(DOCS.rglob("*.md"))


def test_the_repository_paths_the_docs_name_exist():
    missing = []
    for doc in documents():
        if "results-files" in doc.parts:
            continue
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for path in REPO_PATH.findall(line):
                if not (ROOT / path.rstrip("/")).exists():
                    missing.append(f"{doc.relative_to(ROOT)}:{n}: {path}")
    assert not missing, missing


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in m]
    assert links, "the README links nothing"
    assert [x for x in links if not (ROOT / x).exists()] == []


def test_readme_keeps_the_commands_ci_and_newcomers_rely_on():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    install = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
               'pip install -c requirements/lock-cpu.txt -e ".[dev]" && torchrun --nproc_per_node=1 afrl_fast/train.py')
    assert install in [b.strip() for b in blocks], "the install-and-run-demo command is gone from README.md"
    test_command = "python -m pytest -q"
    assert test_command in [b.strip() for b in blocks], "the test command is gone from README.md"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in ci, ".ci/run no longer runs the README's test command"
    assert any("-c requirements/lock-cpu.txt" in line and "pip install" in line for line in ci)
    assert any(line.startswith("python -m mkdocs build --strict") for line in ci)
    assert len(text.splitlines()) <= 160, "README.md is meant to stay short: move detail into docs/"


def test_the_rulebook_example_in_the_docs_loads(tmp_path):
    from afrl_fast.rulebook import load_rulebook

    page = (DOCS / "reference" / "rulebook-schema.md").read_text(encoding="utf-8")
    example = re.findall(r"```yaml\n(.*?)```", page, flags=re.S)[-1]
    (tmp_path / "rulebook.yaml").write_text(example, encoding="utf-8")
    rulebook = load_rulebook(tmp_path / "rulebook.yaml")
    assert len(rulebook.steps) == 9 and rulebook.rules[-1].when == {}


def test_no_page_names_a_path_of_the_machine_it_was_written_on():
    here = [p for p in (str(ROOT), str(Path.home())) if len(p) > 4]   # a home of "/" names nothing
    found = [f"{doc.relative_to(ROOT)}: {p}" for doc in documents() if "results-files" not in doc.parts
             for p in here if p in doc.read_text(encoding="utf-8")]
    assert not found, found
