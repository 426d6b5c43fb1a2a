"""Which library modules may import what: the task datasets (tasks/) are the stage programs'
business, so a library module takes task objects and never imports tasks itself."""

from pathlib import Path

from tests.support.imports import imports, within

REPO = Path(__file__).resolve().parent.parent
MAY_IMPORT_TASKS = ("nanochat/stages/", "nanochat/cli.py")


def test_only_stages_and_the_cli_import_tasks():
    offenders = []
    for path in sorted((REPO / "nanochat").rglob("*.py")):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith(MAY_IMPORT_TASKS):
            continue
        offenders += [f"{relative}:{line} imports {m}" for line, m in imports(path) if within(m, "tasks")]
    assert not offenders, offenders


def test_the_check_sees_every_way_of_writing_an_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import tasks.arc\nfrom nanochat import cpu_model\ndef f():\n    from tasks import gsm8k\n")
    assert [m for _, m in imports(module) if within(m, "tasks")] == ["tasks.arc", "tasks", "tasks.gsm8k"]
    assert [m for _, m in imports(module, when_imported=True)] == ["tasks.arc", "nanochat", "nanochat.cpu_model"]
    assert not within("nanochat.cpu_model", "nanochat.cpu")
