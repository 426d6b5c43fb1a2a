"""The report card's BASE/MID/SFT/RL table takes each metric from the stages of its row."""

from nanochat import report


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
