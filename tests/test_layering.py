"""Which library modules may import what: the task datasets (tasks/) are the stage programs'
business, so a library module takes task objects and never imports tasks itself."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAY_IMPORT_TASKS = ("nanochat/stages/", "nanochat/cli.py")


def imported_modules(path):
    """Every module a file imports, at the top or inside functions."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_only_stages_and_the_cli_import_tasks():
    offenders = []
    for path in sorted((REPO / "nanochat").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith(MAY_IMPORT_TASKS):
            continue
        offenders += [f"{relative} imports {m}" for m in imported_modules(path) if m == "tasks" or m.startswith("tasks.")]
    assert not offenders, offenders


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tasks.gsm8k import GSM8K\n    import tasks.arc\n")
    assert list(imported_modules(module)) == ["tasks.gsm8k", "tasks.arc"]
