"""The `nanochat` command's own subcommands: arguments they do not take are usage errors, not ignored."""

import json

import pytest

from nanochat import cli


def test_version_prints_the_code_version_and_explains_itself(capsys):
    assert cli.main(["version"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"version", "commit", "source_sha256"}
    with pytest.raises(SystemExit) as e:
        cli.main(["version", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: nanochat version [-h]\n")


def test_version_with_an_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["version", "junk"])
    assert e.value.code == 2
    assert capsys.readouterr().err.endswith("nanochat version: error: unrecognized arguments: junk\n")


def test_a_stage_through_the_command_names_the_command_in_its_usage_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["tok_train", "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: nanochat tok_train [-h] --run RUN --preset")
    with pytest.raises(SystemExit) as e:
        cli.main(["chat_eval", "--run", "r", "--preset", "tiny", "--source", "nosuch"])
    assert e.value.code == 2 and "\nnanochat chat_eval: error: argument --source: invalid choice: 'nosuch'" in capsys.readouterr().err
