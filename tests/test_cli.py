"""One command line: every tool's parser (sub-commands, train.py's and distill.py's included) gives every
argument a help line and shows defaults, `--help` renders, renamed flags keep working for now with one
deprecation line, `--device` and `--instructions` mean the same in every tool that has them, and
`python -m afrl_fast.train` runs the trainer's front end."""
import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afrl_fast import cli
from afrl_fast.config import DEMO_CONFIG, load_config, load_distill_config
from afrl_fast.errors import ConfigError
from afrl_fast.format import INSTRUCTIONS_RULE, FormatError, resolve_prompt_settings, save_prompt_settings
from afrl_fast.rulebook import load_rulebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gen_cli_docs  # noqa: E402  (the docs generator finds each tool's parser; the same parsers are tested here)

sys.path.pop(0)
MODULES = [module for _, module, _ in gen_cli_docs.TOOLS]


def front_end(module: str):
    """The module whose main() is the tool's command line (a tool package's __main__.py)."""
    mod = importlib.import_module(module)
    return mod if hasattr(mod, "main") else importlib.import_module(module + ".__main__")


def parsers(parser, path=()):
    """(sub-command path, parser) of a parser and each of its sub-commands, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from parsers(child, (*path, name))


ALL = [(module, path) for module in MODULES for path, _ in parsers(gen_cli_docs.tool_parser(module))]


@pytest.mark.parametrize("module", MODULES)
def test_every_argument_of_every_parser_has_a_help_line(module):
    missing = []
    for path, parser in parsers(gen_cli_docs.tool_parser(module)):
        assert isinstance(parser, cli.Parser), f"{module} {' '.join(path)}: not built with afrl_fast.cli.Parser"
        assert parser.formatter_class is cli.HelpFormatter, f"{module} {' '.join(path)}: another help formatter"
        for action in parser._actions:
            choices = getattr(action, "_choices_actions", [])     # a sub-command's own line in the list
            for a in [action, *choices]:
                if not isinstance(a, argparse._HelpAction) and (not a.help or a.help == argparse.SUPPRESS):
                    missing.append(f"{' '.join(path) or '(top)'} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, f"{module}: arguments without a help line: {missing}"


@pytest.mark.parametrize("module, path", ALL, ids=[f"{m}{''.join(' ' + p for p in path)}" for m, path in ALL])
def test_help_renders_from_the_real_main_with_defaults(module, path, capsys):
    with pytest.raises(SystemExit) as exit_:
        front_end(module).main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "%(" not in out
    parser = dict(parsers(gen_cli_docs.tool_parser(module)))[path]
    for action in parser._actions:
        if action.option_strings and cli.shown_default(action) is not None:
            # each option with a meaningful default states it: the formatter's words or the help's own
            assert "default" in help_of(parser, action.option_strings[0]).lower(), action.dest


def help_of(parser, flag: str) -> str:
    action = next(a for a in parser._actions if flag in a.option_strings)
    return parser.formatter_class(parser.prog)._get_help_string(action) % {"default": action.default}


def test_the_formatter_shows_meaningful_defaults_only():
    p = cli.Parser(prog="t")
    p.add_argument("--n", type=int, default=10, help="samples")
    p.add_argument("--fmt", default="%d items", help="a format")      # a "%" in a default is shown as it is
    p.add_argument("--name", default=None, help="a name")
    p.add_argument("--flag", action="store_true", help="a switch")
    p.add_argument("--said", default="x", help="x (default: x, as said)")
    p.add_argument("--need", required=True, help="required")
    p.add_argument("--many", action="append", default=[], help="repeatable")
    assert help_of(p, "--n") == "samples (default: 10)"
    assert "(default:" not in help_of(p, "--name") and "(default:" not in help_of(p, "--flag")
    assert help_of(p, "--said") == "x (default: x, as said)"
    assert "(default:" not in help_of(p, "--need") and "(default:" not in help_of(p, "--many")
    assert "a format (default: %d items)" in " ".join(p.format_help().split())
    sub = p.add_subparsers(dest="cmd").add_parser("sub", help="a sub-command")
    assert isinstance(sub, cli.Parser) and sub.formatter_class is cli.HelpFormatter


# (tool, argv with the old spelling, dest, the value it must land in, the new flag)
RENAMED = [
    ("afrl_fast.evaluate", ["--model", "m", "--data", "p.parquet", "--out", "o.json"], "pairs", "p.parquet", "--pairs"),
    ("afrl_fast.evaluate", ["--model", "m", "--data=p.parquet", "--out", "o.json"], "pairs", "p.parquet", "--pairs"),
    ("afrl_fast.piar", ["--val", "v.parquet", "--actor-endpoint", "a", "--evaluator-endpoint", "e",
                        "--refiner-endpoint", "r", "--out", "o"], "pairs", "v.parquet", "--pairs"),
    ("afrl_fast.piar", ["--pairs", "v", "--actor", "http://a", "--evaluator-endpoint", "e", "--refiner-endpoint", "r",
                        "--out", "o"], "actor_endpoint", "http://a", "--actor-endpoint"),
    ("afrl_fast.piar", ["--pairs", "v", "--actor-endpoint", "a", "--evaluator", "http://e", "--refiner-endpoint", "r",
                        "--out", "o"], "evaluator_endpoint", "http://e", "--evaluator-endpoint"),
    ("afrl_fast.piar", ["--pairs", "v", "--actor-endpoint", "a", "--evaluator-endpoint", "e", "--refiner", "http://r",
                        "--out", "o"], "refiner_endpoint", "http://r", "--refiner-endpoint"),
    ("afrl_fast.synthesize", ["--pairs", "p", "--endpoint", "http://t", "--out", "o"], "teacher_endpoint", "http://t",
     "--teacher-endpoint"),
    ("afrl_fast.synthesize", ["--pairs", "p", "--teacher-endpoint", "u", "--model", "T", "--out", "o"], "teacher_model",
     "T", "--teacher-model"),
]


@pytest.mark.parametrize("module, argv, dest, value, new", RENAMED)
def test_an_old_spelling_still_works_with_one_deprecation_line(module, argv, dest, value, new, capsys):
    parser = gen_cli_docs.tool_parser(module)
    args = parser.parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deprecated" in err[0] and new in err[0], err
    old = next(a for a in argv if a.startswith("--") and a.split("=")[0] in parser.renamed).split("=")[0]
    assert not re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", parser.format_help()), f"{old} shows in --help"


def test_a_value_after_double_dash_is_not_renamed(capsys):
    assert cli.new_spellings(["--data", "x", "--", "--data"], {"--data": "--pairs"}) == ["--pairs", "x", "--", "--data"]
    assert len(capsys.readouterr().err.splitlines()) == 1


@pytest.mark.parametrize("module", ["afrl_fast.evaluate", "afrl_fast.serve"])
def test_device_is_auto_by_default_with_one_rule(module):
    action = next(a for a in gen_cli_docs.tool_parser(module)._actions if a.dest == "device")
    assert action.default == "auto" and cli.DEVICE_HELP in action.help


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("auto") == "cpu" and cli.resolve_device("cpu") == "cpu"
    for bad, needle in (("cuda", "no CUDA device"), ("cuda:1", "no CUDA device"), ("tpu", "not a device"),
                        ("cuda:x", "not a device"), ("mps", "not a device")):
        with pytest.raises(ConfigError, match=needle) as e:
            cli.resolve_device(bad, ConfigError, flag="--device")
        assert f"--device {bad!r}" in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.resolve_device("auto") == "cuda" and cli.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ValueError, match="2 CUDA device"):
        cli.resolve_device("cuda:2")


@pytest.mark.parametrize("module, model_flag", [("afrl_fast.evaluate", True), ("afrl_fast.serve", True),
                                                ("afrl_fast.synthesize", False), ("afrl_fast.piar", False)])
def test_instructions_have_one_rule_and_its_default(module, model_flag):
    action = next(a for a in gen_cli_docs.tool_parser(module)._actions if a.dest == "instructions")
    assert action.default is None          # resolve_prompt_settings applies the default, the same in every tool
    assert INSTRUCTIONS_RULE in action.help
    assert ("saved in the --model folder, else full" in action.help) == model_flag


def test_instructions_from_a_model_folder(tmp_path):
    rb = load_rulebook()
    save_prompt_settings(tmp_path, rb, "Judge like the teacher.")
    assert resolve_prompt_settings(tmp_path).instructions == "Judge like the teacher."          # the tool's own model
    assert resolve_prompt_settings(None, None, str(tmp_path)).instructions == "Judge like the teacher."
    assert resolve_prompt_settings(None).instructions == rb.describe()                          # no model: full
    (tmp_path / "plain").mkdir()
    with pytest.raises(FormatError, match="without a saved system prompt"):
        resolve_prompt_settings(None, None, str(tmp_path / "plain"))
    cfg = load_config(DEMO_CONFIG, [f"data.instructions={tmp_path}"])       # the trainer takes the same values
    assert cfg.data.instructions == str(tmp_path)


def override_examples():
    """(tool, sub-command, config, override) for every `e.g. key=value` in an overrides help line."""
    configs = {"afrl_fast.train": str(DEMO_CONFIG), "afrl_fast.distill": "configs/distill_demo.yaml",
               "ablation": "configs/ablation_cpu.yaml", "distillation": "configs/distill_demo.yaml",
               "teacher": "configs/teacher_cpu.yaml"}
    for module, path in ALL:
        parser = dict(parsers(gen_cli_docs.tool_parser(module)))[path]
        for action in parser._actions:
            if action.dest == "overrides":
                for example in re.findall(r"e\.g\. (\S+=\S+)", action.help):
                    yield module, path, configs[path[0] if path else module], example


@pytest.mark.parametrize("module, path, config, override", list(override_examples()))
def test_the_override_examples_in_help_are_accepted(module, path, config, override):
    distill = module == "afrl_fast.distill" or path == ("distillation",)
    (load_distill_config if distill else load_config)(ROOT / config, [override])
    if path:
        front_end(module).check_overrides(path[0], [override])


def test_python_m_afrl_fast_train_runs_the_trainer():
    proc = subprocess.run([sys.executable, "-m", "afrl_fast.train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "python -m afrl_fast.train" in " ".join(proc.stdout.split()) and "--overwrite" in proc.stdout
