"""tests/breakages.py stays able to break what it names: each breakage's text occurs exactly once in
its file, and the tests it runs exist (a refactor that moves the text would otherwise leave the
breakage unable to run until someone tries it)."""

import pytest

from tests.breakages import BREAKAGES, REPO


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: b.name)
def test_each_breakage_still_applies(breakage):
    assert (REPO / breakage.path).read_text().count(breakage.old) == 1, f"{breakage.path} no longer holds its text once"
    files = [arg.split("::")[0] for arg in breakage.tests if arg.startswith("tests/")]
    assert files and all((REPO / f).is_file() for f in files), breakage.tests
