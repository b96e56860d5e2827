"""The package's import layering (ARCHITECTURE.md draws it): every module has a floor, and an import goes
to a lower floor only, so no import circle can form and the ground floor stays importable on its own.

Imports are read from the source with `ast`, at every nesting level: an import inside a function is
still an arrow, and one of afrl_fast is refused outright (that is how circles used to be hidden).
Inside a function only the optional or heavy third-party dependencies below may be imported late.
"""
import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "afrl_fast"

# Bottom to top. A name is a module, or a sub-package with everything under it (one room: its modules
# import each other freely as long as they form no circle). A new module gets a floor here.
FLOORS = [
    ("errors", ["errors"]),
    ("ground", ["afrl_fast", "files", "cli", "resources", "dist"]),
    ("primitives", ["rulebook", "optim", "metrics", "observe", "endpoint", "native_build", "lm_head", "engines"]),
    ("kernels", ["vocab_pass", "distill_pass"]),
    ("formats and dispatch", ["format", "reward", "backends", "pairs", "token_spans",
                              "text_arrays"]),
    ("settings, data, losses", ["config", "checkpoint", "synthetic", "trec", "verify", "prompt_encoding", "loss",
                                "distill_loss"]),
    ("components", ["policy", "scoring", "grpo", "piar", "trace_selection", "data", "experiment_results"]),
    ("steps", ["rollouts", "sft", "synthesize", "report", "experiments"]),
    ("stages", ["curriculum", "evaluate"]),
    ("RL", ["rl"]),
    ("runs", ["run_dir", "run_data", "run_policy", "run_results"]),
    ("distillation", ["distill_models", "distill_traces", "distill_step"]),
    ("entry points", ["train", "distill", "serve"]),
]

# What may be imported inside a function: optional extras (serving, SGLang, peers) and dependencies
# heavy enough that a light command should not pay for them at start-up. The standard library is free.
LATE_IMPORTS = {
    "torch", "transformers", "triton", "sglang", "liger_kernel", "trl", "flash_attn", "pyarrow", "matplotlib",
    "tqdm", "numba", "filelock", "yaml", "httpx", "openai", "fastapi", "starlette", "uvicorn", "pydantic",
    "prometheus_client", "tensorboard", "omegaconf",
}


def modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def room_of(module: str) -> tuple[int, str] | None:
    """(floor, room) of a module: the longest table name that is the module or a package above it. A
    package's __main__.py (the front end `python -m afrl_fast.<tool>` runs) stands above every floor."""
    if module.endswith(".__main__"):
        return len(FLOORS), module
    best = None
    for floor, (_, names) in enumerate(FLOORS):
        for name in names:
            room = PACKAGE if name == PACKAGE else f"{PACKAGE}.{name}"
            covers = module == room or (room != PACKAGE and module.startswith(room + "."))
            if covers and (best is None or len(room) > len(best[1])):
                best = (floor, room)
    return best


def floor_name(floor: int) -> str:
    return FLOORS[floor][0] if floor < len(FLOORS) else "python -m"


def targets(module: str, node) -> list[str]:
    """The modules an import statement loads, resolved like Python does (relative levels included)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        if MODULES.get(module, Path()).name != "__init__.py":
            parts = parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def own_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str):
    """(target, line, inside a function) for every import in the module."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))

    def walk(node, late):
        for child in ast.iter_child_nodes(node):
            inner = late or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in targets(module, child):
                    yield target, child.lineno, late
            yield from walk(child, inner)
    yield from walk(tree, False)


def arrows() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        for target, _, _ in imports(module):
            own = own_module(target) if target.split(".")[0] == PACKAGE else None
            if own and own != module:
                graph[module].add(own)
    return graph


def test_every_module_has_a_floor():
    missing = sorted(m for m in MODULES if room_of(m) is None)
    assert not missing, f"give these modules a floor in FLOORS (and ARCHITECTURE.md): {missing}"


def test_imports_go_down_only():
    upward = []
    for module, targets_ in arrows().items():
        floor, room = room_of(module)
        for target in targets_:
            t_floor, t_room = room_of(target)
            if t_room != room and t_floor >= floor:
                upward.append(f"{module} ({floor_name(floor)}) -> {target} ({floor_name(t_floor)})")
    assert not upward, "imports that do not go to a lower floor:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph, state, circles = arrows(), {}, []

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_late_imports_are_optional_or_heavy_dependencies_only():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for module in MODULES:
        for target, line, late in imports(module):
            top = target.split(".")[0]
            if late and (top == PACKAGE or (top not in stdlib and top not in LATE_IMPORTS)):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {target}")
    assert not bad, ("imports inside functions (move them to the top; only optional or heavy third-party "
                     "dependencies may load late):\n" + "\n".join(sorted(bad)))


@pytest.mark.parametrize("source, expected", [
    ("from .errors import ConfigError", "afrl_fast.errors"),
    ("from . import dist", "afrl_fast.dist"),
    ("from ..errors import ConfigError", "afrl_fast.errors"),
])
def test_relative_imports_resolve_like_python(source, expected):
    module = "afrl_fast.engines.sampling" if source.startswith("from ..") else "afrl_fast.checkpoint"
    assert targets(module, ast.parse(source).body[0]) == [expected]


def test_serve_is_an_entry_point_as_a_module_or_a_package():
    """The service is the afrl_fast/serve/ package (its inner layering: test_serve_layers.py); a serve.py module
    would stand on the same top floor."""
    top = len(FLOORS) - 1
    assert room_of("afrl_fast.serve") == (top, "afrl_fast.serve")
    assert room_of("afrl_fast.serve.routes") == (top, "afrl_fast.serve")
    assert room_of("afrl_fast.serve.backends") == (top, "afrl_fast.serve")



def test_a_tools_front_end_stands_above_every_floor():
    """`python -m afrl_fast.verify` runs afrl_fast/verify/__main__.py, the tool's command-line front end:
    above every floor, while the package afrl_fast.verify stays a library on its own floor."""
    assert room_of("afrl_fast.verify.__main__") == (len(FLOORS), "afrl_fast.verify.__main__")
    assert room_of("afrl_fast.verify")[0] < len(FLOORS)
