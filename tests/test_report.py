"""The report card: its BASE/MID/SFT/RL table takes each metric from the stages of its row; the
command refuses, in one line, what it cannot report on."""

import argparse
import time

import pytest

from nanochat import report, stage


def test_metrics_table_rows_and_columns():
    summaries = {
        "base_eval": {"metrics": {"core": 0.1, "val_bpb": 1.5}},
        "chat_eval_mid": {"metrics": {"ARC-Easy": 0.3, "SpellingBee": 0.25, "chatcore": 0.05}},
        "chat_rl": {"metrics": {"pass@k": 0.5, "k": 8}},
    }
    lines = report.metrics_table(summaries).splitlines()
    assert lines[0] == "| metric | BASE | MID | RL |"
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines[2:]}
    assert list(rows) == ["CORE", "ARC-Easy", "SpellingBee", "ChatCORE", "pass@k", "val bpb"]
    assert rows["pass@k"] == "| pass@k | - | - | 0.5 |"
    assert rows["SpellingBee"] == "| SpellingBee | - | 0.25 | - |"
    assert report.metrics_table({}) is None


def test_a_run_with_no_finished_stage_is_an_error_and_writes_nothing(tmp_path, capsys):
    assert report.main(["--run", "nosuch", "--storage", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nanochat report: error: ") and "runs/nosuch: no stage has finished" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("price", ["abc", "-5", "nan", ""])
def test_a_bad_hourly_price_is_an_error_naming_the_variable(tmp_path, monkeypatch, capsys, price):
    run = str(tmp_path / "run")
    stage.commit(run, "demo", argparse.Namespace(), {}, {}, {"loss": 1.0}, time.time())
    monkeypatch.setenv("NANOCHAT_HOURLY_USD", price)
    assert report.main(["--run", run]) == 1
    assert capsys.readouterr().err == (f"nanochat report: error: NANOCHAT_HOURLY_USD={price!r}: "
                                       "expected the price of an hour in USD, a number >= 0\n")
    assert not (tmp_path / "run" / report.REPORT).exists()
    monkeypatch.setenv("NANOCHAT_HOURLY_USD", "0.5")
    assert report.main(["--run", run]) == 0
    assert "Cost estimate at $0.5/h" in (tmp_path / "run" / report.REPORT).read_text()


def test_each_stage_costs_its_wall_time_at_the_hourly_price(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    for name, hours in (("demo", 3), ("other", 1)):
        stage.commit(run, name, argparse.Namespace(), {}, {}, {"loss": 1.0}, time.time() - hours * 3600)
    monkeypatch.setenv("NANOCHAT_HOURLY_USD", "0.5")
    assert report.main(["--run", run]) == 0
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in (tmp_path / "run" / report.REPORT).read_text().splitlines() if line.startswith("| ")]
    costs = {row[0]: row[3] for row in rows if len(row) == 5}  # the Stages table: stage, finished, wall time, cost, config
    assert (costs["demo"], costs["other"], costs["total"]) == ("$1.50", "$0.50", "$2.00")
