"""`make test` runs pytest in the environment make was started in, as a plain `pytest` does: without
make's own variables or the command line's (which would reach the makes that tests run). Checked on
make itself: its `test` recipe with PY pointing at a script that records its environment instead of
running the suite (-o dev: the virtualenv is there)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECORD = "import json, os, sys; json.dump(dict(os.environ), open(os.environ['ENV_RECORD'], 'w'))"


def test_make_test_gives_pytest_the_environment_it_was_started_in(tmp_path):
    script, record = tmp_path / "record.py", tmp_path / "env.json"
    script.write_text(RECORD)
    env = {**os.environ, "ENV_RECORD": str(record), "A_USER_VARIABLE": "kept"}
    env.pop("_", None)  # the shell's last command, which make's shell sets anew
    done = subprocess.run(["make", "-o", "dev", "test", f"PY={sys.executable} {script}", "NPROC=2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    seen = json.loads(record.read_text())
    seen.pop("_", None)
    assert seen == env
