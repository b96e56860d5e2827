"""Every command the README and docs/ show is one the tools accept: each command line of a fenced code
block that runs a tool (`python -m afrl_fast.<tool>`, `torchrun ... afrl_fast/train.py|distill.py`,
`python -m afrl_fast.train`) goes through that tool's real parser (parsed, never run); for train,
distill and experiments the config is loaded with the command's dotted overrides through the real
config loader, so an override the config lacks fails here. A failure names the file and line.

What is not checked, by two explicit rules and nothing else:
- a word in angle brackets (`<dir>`) is a placeholder for the reader's own value: it parses as any
  other word, and an override `key=<...>` is checked for its key only (the config keeps its value);
- a file an earlier step of the same example writes (STAND_INS: PIAR's or synthesize's
  instructions.txt given as data.instructions) gets a one-line stand-in in the scratch folder the
  commands are checked from (configs/ is linked there), so the override itself is still checked.
"""
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

from afrl_fast.config import load_config, load_distill_config
from afrl_fast.experiments.__main__ import check_overrides as experiment_overrides

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gen_cli_docs  # noqa: E402  (it finds each tool's real parser)

sys.path.pop(0)
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TOOLS = {module for _, module, _ in gen_cli_docs.TOOLS}
MENTIONS_A_TOOL = re.compile(r"python3? -m afrl_fast\.|torchrun|afrl_fast/(train|distill)\.py")
SEPARATORS = {"&&", "||", ";", "|"}
PLACEHOLDER = re.compile(r"<[^<>]+>")
STAND_INS = ("data.instructions",)
CONFIG_LOADERS = {"afrl_fast.train": load_config, "afrl_fast.distill": load_distill_config,
                  "ablation": load_config, "distillation": load_distill_config, "teacher": load_config}


def code_lines(text: str):
    """(line number, command) of each line in the fenced code blocks, `\\` continuations joined."""
    in_block, parts, start = False, [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block, parts = not in_block, []
            continue
        if not in_block:
            continue
        start = start if parts else n
        parts.append(line.rstrip().removesuffix("\\"))
        if not line.rstrip().endswith("\\"):
            yield start, " ".join(parts)
            parts = []


def commands(line: str):
    """The simple commands of a shell line (split at &&, ||, ; and |; comments dropped)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")    # `a;b` is two commands, as in a shell
    lexer.whitespace_split = True
    command = []
    for word in [*lexer, ";"]:
        if word in SEPARATORS:
            if command:
                yield command
            command = []
        else:
            command.append(word)


def tool_call(words: list[str]):
    """(tool module, its arguments) when the command runs one of the tools, else None."""
    while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):     # VAR=value before the command
        words = words[1:]
    if words[:2] in (["python", "-m"], ["python3", "-m"]) and len(words) > 2:
        if words[2].startswith("afrl_fast"):
            return words[2], words[3:]
        if words[2] != "torch.distributed.run":
            return None
    elif words[:1] != ["torchrun"]:
        return None
    for i, word in enumerate(words):           # a launcher: the tool is the script it starts
        if word in ("afrl_fast/train.py", "afrl_fast/distill.py"):
            return "afrl_fast." + Path(word).stem, words[i + 1:]
        if word in ("-m", "--module") and i + 1 < len(words) and words[i + 1].startswith("afrl_fast"):
            return words[i + 1], words[i + 2:]
    return "(a launcher without a tool script)", []


def examples():
    found = []
    for doc in DOCUMENTS:
        for n, line in code_lines(doc.read_text(encoding="utf-8")):
            if not MENTIONS_A_TOOL.search(line):
                continue
            where = f"{doc.relative_to(ROOT)}:{n}"
            try:
                calls = [c for c in map(tool_call, commands(line)) if c is not None]
            except ValueError as e:            # unbalanced quotes: not a command a shell would take either
                calls = [(f"(not a shell line: {e})", [])]
            found += [pytest.param(module, argv, id=where) for module, argv in calls]
    return found


EXAMPLES = examples()


def parse(module: str, argv: list[str]):
    """The namespace the tool's own parser makes of argv; AssertionError with argparse's message if it
    refuses them, or if they use a deprecated spelling (the docs show the current names)."""
    assert module in TOOLS, f"{module} is not a tool (tools: {sorted(TOOLS)})"
    parser = gen_cli_docs.tool_parser(module)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:
            assert e.code == 0, f"the parser refuses it: {err.getvalue().strip().splitlines()[-1]}"
            return None                        # --help
    assert not err.getvalue(), f"old spelling: {err.getvalue().strip()}"
    return args


def check_overrides(module: str, args) -> None:
    experiment = getattr(args, "experiment", None)
    loader = CONFIG_LOADERS[experiment or module]
    given = [o for o in args.overrides if not PLACEHOLDER.fullmatch(o.partition("=")[2])]
    for override in given:
        key, _, value = override.partition("=")
        if key in STAND_INS and value not in ("full", "short") and not Path(value).exists():
            Path(value).parent.mkdir(parents=True, exist_ok=True)
            Path(value).write_text("A stand-in for the file an earlier step writes.\n", encoding="utf-8")
    cfg = loader(args.config, given)
    for override in set(args.overrides) - set(given):      # a placeholder's key must still be one the config has
        node, key = cfg, override.partition("=")[0]
        for part in key.split("."):
            assert hasattr(node, part), f"{override}: the config has no key {key}"
            node = getattr(node, part)
    if experiment:
        experiment_overrides(experiment, args.overrides)


@pytest.mark.parametrize("module, argv", EXAMPLES)
def test_every_documented_command_parses(module, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                # relative paths as in the repository root, but nothing is written there
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    args = parse(module, argv)
    if args is not None and hasattr(args, "overrides"):
        check_overrides(module, args)


def test_the_docs_show_every_tool():
    shown = {p.values[0] for p in EXAMPLES}
    assert TOOLS <= shown, f"no example of {sorted(TOOLS - shown)} in README.md or docs/"


def test_the_extraction_reads_a_shell_line_as_a_shell_does():
    text = ("prose: python -m afrl_fast.evaluate --data x\n```bash\nA=1 python -m afrl_fast.metrics \\\n"
            "    --predictions p.parquet   # a comment\npip install x && torchrun --nproc_per_node=2 --nnodes=1 "
            "afrl_fast/train.py rl.kl_coef=0; echo done\n```\n")
    lines = list(code_lines(text))
    assert lines[0][0] == 3 and [tool_call(c) for c in commands(lines[0][1])] == [
        ("afrl_fast.metrics", ["--predictions", "p.parquet"])]
    assert [tool_call(c) for c in commands(lines[1][1])] == [None, ("afrl_fast.train", ["rl.kl_coef=0"]), None]


def test_a_rejected_override_or_flag_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bad = parse("afrl_fast.experiments", ["distillation", "--config", "configs/distill_demo.yaml", "rl.max_steps=5"])
    with pytest.raises(Exception, match="rl.max_steps"):
        check_overrides("afrl_fast.experiments", bad)
    with pytest.raises(AssertionError, match="refuses"):
        parse("afrl_fast.piar", ["--pairs", "v.parquet", "--out", "o", "[--rounds", "5]"])
    with pytest.raises(AssertionError, match="old spelling"):
        parse("afrl_fast.evaluate", ["--model", "m", "--data", "p.parquet", "--out", "o.json"])
