"""The service package's shape (afrl_fast/serve/__init__.py lists its modules): every module
imports only the modules listed before it and library modules outside the package, never one
inside a function (SGLang, an optional dependency that would replace the CPU build of torch, is the
one exception), and no module grows past ~400 lines."""
import ast
from pathlib import Path

import afrl_fast.serve

PACKAGE = Path(afrl_fast.serve.__file__).parent
# the order of the package docstring's table: a module may import only those above it
LAYERS = ["errors", "config", "backends", "protocol", "metrics", "middleware", "batching", "completions",
          "service", "handlers", "routes", "app", "cli", "__main__"]
OPTIONAL_IN_FUNCTIONS = {"sglang"}


def imports(tree):
    """(module name, relative level, inside a function?) of every import statement."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((alias.name, 0, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                names = [child.module] if child.module else [alias.name for alias in child.names]
                out.extend((name, child.level, in_function) for name in names)
            visit(child, inner)

    visit(tree, False)
    return out


def test_every_module_is_in_the_table_and_the_docstring():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert modules == sorted(LAYERS)
    doc = afrl_fast.serve.__doc__
    assert all(f"\n  {name} " in doc for name in LAYERS if name != "__main__")


def test_imports_go_down_the_layers_and_not_inside_functions():
    for name in LAYERS:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for module, level, in_function in imports(tree):
            where = f"{name}.py imports {'.' * level}{module}"
            if in_function:
                assert module.split(".")[0] in OPTIONAL_IN_FUNCTIONS, f"{where} inside a function"
            if level == 1:        # a sibling in the package: only one listed above
                sibling = module.split(".")[0]
                assert LAYERS.index(sibling) < LAYERS.index(name), f"{where}: up the layers"
            if level == 0:
                assert not module.startswith("afrl_fast"), f"{where}: absolute import of the package"
            if level == 2:        # the library below the service, never back into it
                assert not module.startswith("serve"), where


def test_no_module_over_400_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert max(sizes.values()) <= 400, sizes


def test_the_library_does_not_import_the_service():
    """serve is the top floor: no library module imports it."""
    for path in PACKAGE.parent.glob("*.py"):
        for module, level, _ in imports(ast.parse(path.read_text())):
            assert not (level == 1 and module.startswith("serve")) and not module.startswith("afrl_fast.serve"), \
                f"{path.name} imports {module}"
