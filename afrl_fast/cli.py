"""What every command-line tool shares: help that shows defaults, renamed flags that keep working for a
while, and one meaning of `--device`.

On the ground floor so that every front end (`afrl_fast/<tool>/__main__.py`, `train.py`, `distill.py`,
`serve/cli.py`) can use it; it imports nothing of afrl_fast, and torch only inside `resolve_device`, so a
light tool (metrics, verify) starts without it.
"""
from __future__ import annotations

import argparse
import re
import sys

DEVICE_HELP = "auto (cuda if a GPU is visible, else cpu), cpu, cuda or cuda:N"
_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")


def shown_default(action: argparse.Action):
    """The default worth printing after an option's help, or None: a switch, a required option, None
    and empty values say nothing a reader needs."""
    if action.required or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                              argparse._HelpAction, argparse._SubParsersAction)):
        return None
    default = action.default
    if default is None or default is argparse.SUPPRESS or default in ("", [], ()):
        return None
    return default


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with "(default: X)" after every option that has a meaningful default and
    whose help does not already state one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if shown_default(action) is None or "default" in text.lower():
            return text
        # %(default)s, not the value: argparse %-formats the help, so a value holding "%" stays intact
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """The parser of every tool: HelpFormatter by default (sub-commands too, since add_subparsers makes
    them of this class), and `rename` for flags that changed name."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.renamed: dict[str, str] = {}

    def rename(self, old: str, new: str) -> None:
        """`old` keeps working, hidden from --help, as `new`, and says so in one line on stderr.
        Scripts written against the old name run unchanged while their authors update them."""
        self.renamed[old] = new

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(new_spellings(args, self.renamed), namespace)


def new_spellings(argv: list[str], renamed: dict[str, str]) -> list[str]:
    """argv with each renamed flag (`--old V` or `--old=V`) spelled the new way, one deprecation line on
    stderr per renamed flag used. Nothing after `--` is touched: those are values, not flags."""
    out, warned = [], set()
    for i, token in enumerate(argv):
        if token == "--":
            return out + argv[i:]
        flag, eq, value = token.partition("=")
        if token.startswith("--") and flag in renamed:
            if flag not in warned:
                print(f"warning: {flag} is deprecated, use {renamed[flag]}", file=sys.stderr)
                warned.add(flag)
            token = renamed[flag] + eq + value
        out.append(token)
    return out


def resolve_device(name: str, error=ValueError, flag: str = "--device") -> str:
    """The torch device `name` means on this machine: auto is cuda when a GPU is visible, else cpu;
    cpu, cuda and cuda:N are checked against what this machine has. `error` (the tool's one-line error
    class) names the flag and the value otherwise."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = _DEVICE.fullmatch(name)
    if m is None:
        raise error(f"{flag} {name!r}: not a device; use {DEVICE_HELP}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise error(f"{flag} {name!r}: no CUDA device is visible on this machine (use {flag} cpu or auto)")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise error(f"{flag} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name
