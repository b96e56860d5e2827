"""The rulebook: nine step names, the closed vocabularies of steps 4–8, and the decision list.

One YAML file (configs/rulebook/default.yaml) drives the synthetic data generator, the compiled
verifier and the expert instructions in the prompt. This module loads and validates it
(errors name the file and the bad key) and compiles the decision list into small integer tables:

    rule_masks[r, j]  bitmask of the allowed value indices of critical step j (all ones = any)
    rule_labels[r]    the grade rule r gives

so ŷ for the value indices (v_0..v_4) is the label of the first r with bit v_j set in every
rule_masks[r, j]. Both the numba verifier and the plain-Python reference use these tables.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from .resources import CONFIG_DIR

N_STEPS = 9
CRITICAL_STEPS = (4, 5, 6, 7, 8)       # 1-based step numbers whose boxes hold closed-vocabulary values
N_CRITICAL = len(CRITICAL_STEPS)
LABELS = (0, 1, 2, 3, 4)
DEFAULT_RULEBOOK = CONFIG_DIR / "rulebook" / "default.yaml"
FORBIDDEN_CHARS = ("{", "}", "\n", "\\")  # would break the boxed format the verifier parses


class RulebookError(ValueError):
    """A rulebook file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Step:
    number: int                 # 1..9
    name: str
    key: str | None = None      # set for steps 4-8
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    when: dict                  # key -> tuple of allowed values
    label: int
    freq: float = 1.0
    tail: bool = False

    def matches(self, values: dict) -> bool:
        return all(values[k] in allowed for k, allowed in self.when.items())


@dataclass(frozen=True)
class Rulebook:
    name: str
    instructions: str
    steps: tuple[Step, ...]
    rules: tuple[Rule, ...]
    path: str = "<memory>"
    rule_masks: np.ndarray = field(default=None, compare=False, repr=False)
    rule_labels: np.ndarray = field(default=None, compare=False, repr=False)

    @property
    def critical(self) -> tuple[Step, ...]:
        return tuple(self.steps[n - 1] for n in CRITICAL_STEPS)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.critical)

    def value_index(self, key: str, value: str) -> int:
        """Index of `value` in the vocabulary of step `key` (-1 if not in it)."""
        step = self.critical[self.keys.index(key)]
        return step.values.index(value) if value in step.values else -1

    def first_rule(self, values: dict) -> Rule:
        """The first rule of the decision list that matches step values {key: value}."""
        for rule in self.rules:
            if rule.matches(values):
                return rule
        raise AssertionError("validated rulebooks end with a catch-all rule")

    def expected_label(self, values: dict) -> int:
        """ŷ: the grade the decision list gives for step 4–8 values {key: value}."""
        return self.first_rule(values).label

    def to_dict(self) -> dict:
        """The rulebook as the YAML structure `parse_rulebook` reads (no file path in it), so a copy
        can travel inside an exported model folder."""
        steps = []
        for s in self.steps:
            steps.append({"name": s.name, "key": s.key, "values": list(s.values)} if s.key else {"name": s.name})
        rules = [{"name": r.name, "when": {k: list(v) for k, v in r.when.items()}, "label": r.label,
                  "freq": r.freq, "tail": r.tail} for r in self.rules]
        return {"name": self.name, "instructions": self.instructions, "steps": steps, "rules": rules}

    def describe(self) -> str:
        """The rulebook as expert instructions: steps, vocabularies, and the decision list."""
        lines = [self.instructions.strip(), "", "Steps:"]
        for s in self.steps:
            vocab = f" — box one of: {', '.join(s.values)}" if s.values else ""
            lines.append(f"Step {s.number} ({s.name}){vocab}")
        lines += ["", "Decision rules (the first that matches gives the grade):"]
        for i, r in enumerate(self.rules, 1):
            cond = " and ".join(f"{k} is {'/'.join(v)}" for k, v in r.when.items()) or "otherwise"
            lines.append(f"{i}. {cond} -> {r.label}")
        return "\n".join(lines)


def _fail(path, where, msg):
    raise RulebookError(f"{path}: {where}: {msg}")


def _check_token(path, where, text):
    if not isinstance(text, str) or not text.strip():
        _fail(path, where, f"must be a non-empty string, got {text!r}")
    bad = [c for c in FORBIDDEN_CHARS if c in text]
    if bad:
        _fail(path, where, f"{text!r} contains {bad!r}, which the boxed format cannot carry")


def _parse_steps(path, raw) -> tuple[Step, ...]:
    if not isinstance(raw, list) or len(raw) != N_STEPS:
        _fail(path, "steps", f"must be a list of exactly {N_STEPS} steps, got {raw!r:.80}")
    steps, keys = [], set()
    for i, item in enumerate(raw, 1):
        where = f"steps[{i - 1}]"
        if not isinstance(item, dict) or "name" not in item:
            _fail(path, where, "each step needs a `name`")
        unknown = set(item) - {"name", "key", "values"}
        if unknown:
            _fail(path, f"{where}.{sorted(unknown)[0]}", "unknown key (allowed: name, key, values)")
        _check_token(path, f"{where}.name", item["name"])
        if ")" in item["name"] or "(" in item["name"]:
            _fail(path, f"{where}.name", "step names cannot contain parentheses")
        if i in CRITICAL_STEPS:
            key, values = item.get("key"), item.get("values")
            _check_token(path, f"{where}.key", key)
            if key in keys:
                _fail(path, f"{where}.key", f"duplicate key {key!r}")
            keys.add(key)
            if not isinstance(values, list) or not values:
                _fail(path, f"{where}.values", "critical steps 4-8 need a non-empty list of values")
            if len(values) > 31:
                _fail(path, f"{where}.values", "at most 31 values per step (bitmask tables)")
            for j, v in enumerate(values):
                _check_token(path, f"{where}.values[{j}]", v)
            if len(set(values)) != len(values):
                _fail(path, f"{where}.values", f"duplicate values in {values}")
            steps.append(Step(i, item["name"], key, tuple(values)))
        else:
            if "values" in item or "key" in item:
                _fail(path, where, f"only steps {CRITICAL_STEPS} take `key`/`values`")
            steps.append(Step(i, item["name"]))
    return tuple(steps)


def _parse_rules(path, raw, steps) -> tuple[Rule, ...]:
    vocab = {s.key: s.values for s in steps if s.key}
    if not isinstance(raw, list) or not raw:
        _fail(path, "rules", "must be a non-empty list")
    rules = []
    for i, item in enumerate(raw):
        where = f"rules[{i}]"
        if not isinstance(item, dict):
            _fail(path, where, "each rule is a mapping with name, when, label")
        unknown = set(item) - {"name", "when", "label", "freq", "tail"}
        if unknown:
            _fail(path, f"{where}.{sorted(unknown)[0]}", "unknown key (allowed: name, when, label, freq, tail)")
        for req in ("name", "when", "label"):
            if req not in item:
                _fail(path, f"{where}.{req}", "missing")
        when = item["when"] or {}
        if not isinstance(when, dict):
            _fail(path, f"{where}.when", "must be a mapping key -> list of values")
        cond = {}
        for key, allowed in when.items():
            if key not in vocab:
                _fail(path, f"{where}.when.{key}", f"unknown step key (known: {sorted(vocab)})")
            allowed = [allowed] if isinstance(allowed, str) else allowed
            if not isinstance(allowed, list) or not allowed:
                _fail(path, f"{where}.when.{key}", "must be a non-empty list of values")
            for v in allowed:
                if v not in vocab[key]:
                    _fail(path, f"{where}.when.{key}", f"{v!r} is not in the vocabulary {list(vocab[key])}")
            cond[key] = tuple(allowed)
        label = item["label"]
        if not isinstance(label, int) or isinstance(label, bool) or label not in LABELS:
            _fail(path, f"{where}.label", f"must be an integer grade 0-4, got {label!r}")
        freq = item.get("freq", 1.0)
        if isinstance(freq, bool) or not isinstance(freq, (int, float)) or not math.isfinite(freq) or freq < 0:
            _fail(path, f"{where}.freq", f"must be a finite non-negative number, got {freq!r}")
        rules.append(Rule(str(item["name"]), cond, label, float(freq), bool(item.get("tail", False))))
    if rules[-1].when:
        _fail(path, f"rules[{len(rules) - 1}].when", "the last rule must be a catch-all (`when: {}`)")
    return tuple(rules)


def compile_tables(steps, rules) -> tuple[np.ndarray, np.ndarray]:
    """(rule_masks int64 [R, 5], rule_labels int64 [R]) of the decision list."""
    critical = [steps[n - 1] for n in CRITICAL_STEPS]
    masks = np.zeros((len(rules), N_CRITICAL), dtype=np.int64)
    for r, rule in enumerate(rules):
        for j, step in enumerate(critical):
            allowed = rule.when.get(step.key, step.values)
            masks[r, j] = sum(1 << step.values.index(v) for v in allowed)
    labels = np.array([rule.label for rule in rules], dtype=np.int64)
    return masks, labels


def parse_rulebook(data: dict, path: str = "<memory>") -> Rulebook:
    if not isinstance(data, dict):
        _fail(path, "top level", "must be a mapping with name, instructions, steps, rules")
    unknown = set(data) - {"name", "instructions", "steps", "rules"}
    if unknown:
        _fail(path, sorted(unknown)[0], "unknown top-level key (allowed: name, instructions, steps, rules)")
    for req in ("steps", "rules"):
        if req not in data:
            _fail(path, req, "missing")
    steps = _parse_steps(path, data["steps"])
    rules = _parse_rules(path, data["rules"], steps)
    masks, labels = compile_tables(steps, rules)
    return Rulebook(str(data.get("name", Path(path).stem)), str(data.get("instructions", "")),
                    steps, rules, str(path), masks, labels)


# A rulebook (or a run config) is a few kilobytes. Bounds far above that stop a hostile file —
# megabytes of text, or anchors whose aliases nest to billions of nodes ("billion laughs") —
# before anything walks it.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


def _expanded_size(root, limit: int) -> int:
    """Nodes of the YAML tree once every alias is expanded, counted on the composed node graph
    (where an alias is a shared node) with one memoised, iterative walk: linear in the file even
    when the expansion is exponential. Stops as soon as `limit` is passed; a node that contains
    itself (`&a [*a]`) counts as unbounded."""
    size, on_path = {}, set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in size:
            continue
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            size[key] = 1
            continue
        if children_done:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > limit:
                return size[key]
            continue
        if key in on_path:
            return limit + 1
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                return limit + 1
            if id(child) not in size:
                stack.append((child, False))
    return size[id(root)]


def _duplicate_key(root):
    """(key, line) of the first mapping key given twice, or None: PyYAML keeps the last value
    silently, so `lr: 0.1` followed later by another `lr:` would drop a setting unseen."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in keys:
                        return key.value, key.start_mark.line + 1
                    keys.add(key.value)
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
    return None


def load_yaml_file(path, error=ValueError, what: str = "YAML file"):
    """A YAML file as plain Python data (safe loader), or `error` with one line naming the file
    for anything unusable: missing, not UTF-8, invalid YAML, a mapping key given twice, over
    MAX_YAML_BYTES, or expanding to more than MAX_YAML_NODES nodes through aliases."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise error(f"{path}: {what} is {path.stat().st_size} bytes, more than {MAX_YAML_BYTES}")
        raw = path.read_bytes()
    except IsADirectoryError:
        raise error(f"{path}: {what} is a directory, not a file") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise error(f"{path}: {what} expands to more than {MAX_YAML_NODES} YAML nodes (aliases nested too "
                        "deep, or recursive); refusing to load it")
        duplicate = _duplicate_key(node)
        if duplicate:
            raise error(f"{path}: line {duplicate[1]}: key {duplicate[0]!r} is given twice")
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{path}: not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to load") from None
    finally:
        loader.dispose()


@lru_cache(maxsize=16)
def _load_cached(path: str, mtime: float) -> Rulebook:
    return parse_rulebook(load_yaml_file(path, RulebookError, "rulebook"), path)


def load_rulebook(path: str | Path | None = None) -> Rulebook:
    """Load and validate a rulebook YAML (the default one when path is None)."""
    path = Path(path) if path is not None else DEFAULT_RULEBOOK
    if not path.is_file():
        raise RulebookError(f"{path}: rulebook file not found")
    return _load_cached(str(path.resolve()), path.stat().st_mtime)
