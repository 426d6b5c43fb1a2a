"""What a Python file imports, read from its source: for the tests of which module may import what
(tests/test_layering.py, test_cpu_door.py, test_light_imports.py)."""

import ast

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def imports(path, when_imported=False):
    """(line, module) of each absolute import in a file: `import a.b` gives a.b, `from a import b`
    gives a and a.b (b may be a module). when_imported: only those that run when the module is
    imported, not those inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    for node in outside_functions(tree) if when_imported else ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def outside_functions(node):
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, FUNCTIONS):
            yield child
            yield from outside_functions(child)


def within(module, package):
    """Whether `module` is `package` or inside it."""
    return module == package or module.startswith(package + ".")
