"""Rulebook loading/validation, the compiled decision tables, trace rendering, prompt and label tokens."""
import itertools
import re

import numpy as np
import pytest
import yaml

from afrl_fast.format import (FormatError, build_prompt, label_token_ids, load_tokenizer, render_trace)
from afrl_fast.rulebook import DEFAULT_RULEBOOK, RulebookError, load_rulebook, parse_rulebook


@pytest.fixture(scope="module")
def rb():
    return load_rulebook()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def all_value_combos(rb):
    for combo in itertools.product(*(s.values for s in rb.critical)):
        yield dict(zip(rb.keys, combo))


def table_label(rb, values):
    """ŷ from the compiled integer tables, the way the verifier computes it."""
    idx = [rb.value_index(k, values[k]) for k in rb.keys]
    for mask, label in zip(rb.rule_masks, rb.rule_labels):
        if all((int(mask[j]) >> idx[j]) & 1 for j in range(len(idx))):
            return int(label)
    return -1


def test_default_rulebook_shape(rb):
    assert len(rb.steps) == 9
    assert [s.number for s in rb.critical] == [4, 5, 6, 7, 8]
    assert len(rb.rules) >= 12
    assert sum(r.tail for r in rb.rules) >= 4, "several long-tail rules"
    assert not rb.rules[-1].when, "catch-all last"


def test_compiled_tables_agree_with_decision_list_on_every_combo(rb):
    n = 0
    for values in all_value_combos(rb):
        assert table_label(rb, values) == rb.expected_label(values)
        n += 1
    assert n == np.prod([len(s.values) for s in rb.critical])


def test_every_rule_with_frequency_is_reachable(rb):
    reached = {rb.first_rule(v).name for v in all_value_combos(rb)}
    for r in rb.rules:
        if r.freq > 0:
            assert r.name in reached, f"rule {r.name} is shadowed by earlier rules"


def _default_data():
    return yaml.safe_load(DEFAULT_RULEBOOK.read_text())


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["steps"].pop(), "exactly 9"),
    (lambda d: d["steps"][3].pop("values"), "steps[3].values"),
    (lambda d: d["steps"][4]["values"].append("con{sistent"), "steps[4].values"),
    (lambda d: d["steps"][0].update(values=["a"]), "steps[0]"),
    (lambda d: d["rules"][0].update(label=7), "rules[0].label"),
    (lambda d: d["rules"][1]["when"].update(intnet=["full"]), "rules[1].when.intnet"),
    (lambda d: d["rules"][1]["when"].update(intent=["fully"]), "rules[1].when.intent"),
    (lambda d: d["rules"].pop(), "catch-all"),
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d["rules"][0].update(freq=-1), "rules[0].freq"),
    (lambda d: d["rules"][0].update(freq=float("nan")), "rules[0].freq"),
    (lambda d: d["rules"][2].update(freq=float("inf")), "rules[2].freq"),
])
def test_bad_rulebooks_name_the_key(mutate, needle):
    data = _default_data()
    mutate(data)
    with pytest.raises(RulebookError) as e:
        parse_rulebook(data, "bad.yaml")
    assert "bad.yaml" in str(e.value) and needle in str(e.value)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(RulebookError, match="not found"):
        load_rulebook(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [unclosed")
    with pytest.raises(RulebookError, match="bad.yaml"):
        load_rulebook(bad)


def billion_laughs(levels: int, width: int = 10) -> str:
    """A rulebook whose steps are anchors nested `levels` deep, each alias list `width` wide:
    width**(levels+1) nodes once expanded (the error message for a wrong `steps` used to print
    them, which never finished)."""
    items = [f"  - &a0 [{', '.join(['lol'] * width)}]"]
    items += [f"  - &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "name: lol\nrules: []\nsteps:\n" + "\n".join(items) + "\n"


@pytest.mark.parametrize("name, text, needle", [
    ("bomb", billion_laughs(9), "expands to more than"),            # 10**10 nodes
    ("recursive", "steps: &s [*s]\n", "expands to more than"),
    ("deep", "[" * 20000 + "]" * 20000, "nested too deeply"),
    ("huge", "name: x\ninstructions: '" + "y" * (2 << 20) + "'\n", "bytes, more than"),
    ("latin1", None, "not UTF-8"),
    ("two_documents", "name: a\n---\nname: b\n", "not valid YAML at line 2"),
    ("duplicate_key", "name: a\nsteps: []\nrules: []\nsteps: [1]\n", "line 4: key 'steps' is given twice"),
])
def test_hostile_yaml_is_refused_with_one_line(tmp_path, name, text, needle):
    """A rulebook is parsed to nodes, its expanded size counted on the node graph (linear even for
    an exponential alias bomb) and refused before anything walks it."""
    path = tmp_path / f"{name}.yaml"
    if text is None:
        path.write_bytes(DEFAULT_RULEBOOK.read_bytes().replace(b"expert", "expért".encode("latin-1"), 1))
    else:
        path.write_text(text)
    with pytest.raises(RulebookError) as err:
        load_rulebook(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and needle in message, message


def test_yaml_aliases_within_the_bound_still_work(tmp_path):
    """Anchors are legitimate YAML: a rulebook sharing one value list through an alias loads the
    same as the plain default, and a moderate expansion (8**4 nodes) is within the bound."""
    text = DEFAULT_RULEBOOK.read_text()
    assert text.count("when: {intent: [weak]}") == 1 and text.count("when: {intent: [partial]}") == 1
    shared = text.replace("when: {intent: [weak], coverage: [minimal]}", "when: {intent: &weak [weak], coverage: [minimal]}")
    shared = shared.replace("when: {intent: [weak]}", "when: {intent: *weak}")
    path = tmp_path / "aliases.yaml"
    path.write_text(shared)
    assert "*weak" in path.read_text()
    assert load_rulebook(path).rules == load_rulebook().rules
    from afrl_fast.rulebook import load_yaml_file
    moderate = tmp_path / "moderate.yaml"
    moderate.write_text(billion_laughs(3, width=8))
    assert [len(x) for x in load_yaml_file(moderate)["steps"]] == [8] * 4


def test_render_trace_follows_the_grammar(rb):
    rng = np.random.default_rng(0)
    combos = list(all_value_combos(rb))
    for i in rng.choice(len(combos), 50, replace=False):
        values = combos[i]
        label = rb.expected_label(values)
        text = render_trace(rb, label, values, free={1: "find {x}", 3: "Acme\nCorp"},
                            reasons={4: "a \\ reason {with} braces"})
        lines = text.split("\n")
        assert lines[0] == str(label) and len(lines) == 11
        for step, line in zip(rb.steps, lines[1:10]):
            m = re.fullmatch(rf"Step {step.number} \({re.escape(step.name)}\): ([^\n{{}}]*)\\boxed\{{([^\n{{}}]+)\}}", line)
            assert m, line
            if step.key:
                assert m.group(2) == values[step.key]
        assert lines[10] == f"Final: \\boxed{{{label}}}"


def test_render_trace_rejects_out_of_vocab(rb):
    values = {k: s.values[0] for k, s in zip(rb.keys, rb.critical)}
    values["intent"] = "maybe"
    with pytest.raises(FormatError, match="intent"):
        render_trace(rb, 1, values)
    with pytest.raises(FormatError, match="label"):
        render_trace(rb, 5, {k: s.values[0] for k, s in zip(rb.keys, rb.critical)})


def test_label_tokens_and_prompt_with_real_qwen3_tokenizer(rb, tok):
    ids = label_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == ["0", "1", "2", "3", "4"]
    prompt = build_prompt(tok, rb, "acme x200 battery life", "The Acme X200 lasts 20 hours.")
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "thinking disabled, answer next"
    assert "acme x200 battery life" in prompt and "Intent match" in prompt
    # the grade is the first token after the prompt: prompt + "2\n..." tokenizes with "2" on its own
    enc = tok.encode(prompt + "2\nStep 1", add_special_tokens=False)
    assert enc[len(tok.encode(prompt, add_special_tokens=False))] == ids[2]


def test_label_tokens_error_for_a_tokenizer_that_splits_digits():
    class Splitting:
        def encode(self, text, add_special_tokens=False):
            return [1, 2] if text == "3" else [ord(text)]
    with pytest.raises(FormatError, match="label 3 is 2 tokens"):
        label_token_ids(Splitting())


# ---------------------------------------------------------------- prompt settings that travel with a model

def test_rulebook_to_dict_round_trips(rb):
    again = parse_rulebook(yaml.safe_load(yaml.safe_dump(rb.to_dict())), "copy")
    assert again.steps == rb.steps and again.rules == rb.rules and again.instructions == rb.instructions
    np.testing.assert_array_equal(again.rule_masks, rb.rule_masks)


def test_instructions_from_a_file_and_clear_errors(rb, tmp_path):
    from afrl_fast.format import instructions_text
    f = tmp_path / "refined.txt"
    f.write_text("  Judge relevance carefully.\n")
    assert instructions_text(rb, str(f)) == "Judge relevance carefully."
    assert instructions_text(rb, "short") == rb.instructions
    with pytest.raises(FormatError, match="missing.txt"):
        instructions_text(rb, str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(FormatError, match="empty"):
        instructions_text(rb, str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FormatError, match="not UTF-8"):
        instructions_text(rb, str(tmp_path / "latin1.txt"))


def test_prompt_settings_saved_in_a_model_folder_win_over_defaults_but_not_over_flags(rb, tmp_path):
    from afrl_fast.format import load_prompt_settings, resolve_prompt_settings, save_prompt_settings
    custom = parse_rulebook({**rb.to_dict(), "name": "custom", "instructions": "Custom policy."}, "custom.yaml")
    assert load_prompt_settings(tmp_path) is None
    assert resolve_prompt_settings(tmp_path).instructions == rb.describe()        # nothing saved: full
    save_prompt_settings(tmp_path, custom, "Trained with this prompt.")
    got = resolve_prompt_settings(tmp_path)
    assert got.instructions == "Trained with this prompt." and got.rulebook.name == "custom"
    assert got.rulebook.rules == custom.rules
    assert resolve_prompt_settings(tmp_path, instructions="short").instructions == "Custom policy."
    flagged = resolve_prompt_settings(tmp_path, rulebook=str(DEFAULT_RULEBOOK), instructions="full")
    assert flagged.rulebook.name == rb.name and flagged.instructions == rb.describe()
    (tmp_path / "afrl_prompt.json").write_text("{not json")
    with pytest.raises(FormatError, match="afrl_prompt.json"):
        load_prompt_settings(tmp_path)
