"""The report card of a run, built only from the run's files (each stage's stage.json and
metrics.jsonl): system and code, data and tokenizer, each stage's config, time and cost estimate,
the BASE/MID/SFT/RL metrics table, loss curves (PNG embedded as base64, so the markdown renders
anywhere, the Prefect UI included) and sample generations.

    python -m nanochat.report --run myrun          writes <run>/report.md and prints its URI
"""

import argparse
import base64
import io
import json
import math
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version

import psutil

from nanochat import pipeline, storage
from nanochat.stage import SUMMARY

REPORT = "report.md"
# The metrics table's model sources in pipeline order (its columns BASE, MID, SFT, RL) and the
# stages that fill each: the one that trains it and those that evaluate it.
ROWS = {source.upper(): tuple(s.name for s in pipeline.PIPELINE if s.source == source) for source in pipeline.SOURCES}
COLUMNS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE", "pass@k",
           "val bpb")


class ReportError(ValueError):
    """A report that cannot be built: a run with no finished stage, a bad NANOCHAT_HOURLY_USD."""


def hourly_usd():
    """The machine's price per hour for cost estimates (default: one 8xH100 node, as upstream);
    checked here, where it is read, so that a typo is not printed as a price."""
    text = os.environ.get("NANOCHAT_HOURLY_USD", "24")
    try:
        usd = float(text)
        if math.isfinite(usd) and usd >= 0:
            return usd
    except ValueError:
        pass
    raise ReportError(f"NANOCHAT_HOURLY_USD={text!r}: expected the price of an hour in USD, a number >= 0")


def load(run):
    """{stage: stage.json} of the run's committed stages, in the order they finished."""
    summaries = {}
    for name in storage.listdir(run):
        uri = storage.join(run, name, SUMMARY)
        if storage.exists(uri):
            summaries[name] = storage.read_json(uri)
    return dict(sorted(summaries.items(), key=lambda kv: kv[1]["finished_at"]))


def read_metrics(run, stage):
    """The records of `<run>/<stage>/metrics.jsonl` ([] if none; a torn last line is skipped)."""
    uri = storage.join(run, stage, "metrics.jsonl")
    if not storage.exists(uri):
        return []
    records = []
    for line in storage.read_text(uri).splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def scalars(metrics):
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def stage_rows(summaries):
    """One row per stage: wall time, outputs and scalar metrics (the flow's table artifact)."""
    return storage.redact([{
        "stage": name,
        "wall_time_s": s["wall_time_s"],
        "outputs": ", ".join(o["uri"] for o in s["outputs"].values()),
        "metrics": ", ".join(f"{k}={fmt(v)}" for k, v in scalars(s["metrics"]).items()),
    } for name, s in summaries.items()])


def fmt(value):
    return f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


def norm(key):
    return "".join(c for c in key.lower() if c.isalnum())


def own_tasks(summaries):
    """The tasks of your own a chat_eval stage evaluated (`-a module:Class`): the names in its
    metrics' `tasks` that are not built-in columns, in the order first met."""
    known = {norm(c) for c in COLUMNS}
    names = [t for s in summaries.values() for t in s.get("metrics", {}).get("tasks", {}) if norm(t) not in known]
    return list(dict.fromkeys(names))


def metrics_table(summaries):
    """The BASE/MID/SFT/RL table with the columns that have a value in some row, or None; tasks of
    your own come after the built-in ones, before ChatCORE."""
    at = COLUMNS.index("ChatCORE")
    all_columns = (*COLUMNS[:at], *own_tasks(summaries), *COLUMNS[at:])
    values = {}
    for row, stages in ROWS.items():
        found = {}
        for stage in stages:
            found.update({norm(k): v for k, v in scalars(summaries.get(stage, {}).get("metrics", {})).items()})
        values[row] = {col: found[norm(col)] for col in all_columns if norm(col) in found}
    columns = [c for c in all_columns if any(c in v for v in values.values())]
    rows = [r for r, v in values.items() if v]
    if not columns:
        return None
    lines = ["| metric | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    lines += [f"| {c} | " + " | ".join(fmt(values[r][c]) if c in values[r] else "-" for r in rows) + " |"
              for c in columns]
    return "\n".join(lines)


def loss_curve(records, title):
    """A PNG (as a markdown image with a base64 data URI) of every loss/bpb series against step."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    series = sorted({k for r in records for k, v in scalars(r).items() if "loss" in k or "bpb" in k})
    if not series:
        return None
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.subplots()
    for key in series:
        points = [(r["step"], r[key]) for r in records if "step" in r and key in r]
        ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f"![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def system_info():
    packages = []
    for name in ("torch", "prefect", "nanochat"):
        try:
            packages.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return [
        f"- host: {platform.node()}, {platform.platform()}, Python {platform.python_version()}",
        f"- CPUs: {os.cpu_count()}, memory: {psutil.virtual_memory().total / 2**30:.1f} GiB",
        f"- packages: {', '.join(packages)}",
    ]


def samples(summary):
    """Sample generations a stage recorded in its metrics (strings or {prompt, completion})."""
    out = []
    for s in summary["metrics"].get("samples", []):
        text = s if isinstance(s, str) else f"{s.get('prompt', '')}{s.get('completion', '')}"
        out.append(f"```\n{text}\n```")
    return out


def build(run):
    """The report card of `run` as markdown; a run with no finished stage (a typo in its name)
    has none."""
    summaries = load(run)
    if not summaries:
        raise ReportError(f"{storage.redact(run)}: no stage has finished in this run (no <stage>/{SUMMARY})")
    lines = ["# nanochat report card", "", f"Run `{run}`, generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    lines += ["## System", "", *system_info()]
    code = next(iter(summaries.values()))["code"]
    lines += [f"- code: nanochat {code['version']}, commit {code['commit']}, sources {code['source_sha256'][:12]}"]

    if "download" in summaries:
        m, source = summaries["download"]["metrics"], summaries["download"]["config"].get("source")
        lines += ["", "## Data", "", f"- pretraining text: {source}, {m['train_shards']} training shards + validation",
                  f"- {m['files']} files, {m['bytes']:,} bytes; data cache `{m['data_root']}`"]
    if "tok_train" in summaries:
        m = summaries["tok_train"]["metrics"]
        lines += ["", "## Tokenizer", "", f"- vocabulary {m['vocab_size']:,}, trained on {m['chars']:,} characters "
                                           f"({m['docs']:,} documents) in {m['train_time_s']:.1f} s"]
        if "tok_eval" in summaries:
            lines += ["", summaries["tok_eval"]["metrics"]["table"]]

    total, usd = sum(s["wall_time_s"] for s in summaries.values()), hourly_usd()
    lines += ["", "## Stages", "", f"Cost estimate at ${usd:g}/h (NANOCHAT_HOURLY_USD).", "",
              "| stage | finished | wall time | cost | config |", "|---|---|---:|---:|---|"]
    for name, s in summaries.items():
        config = ", ".join(f"{k}={v}" for k, v in s["config"].items())
        lines.append(f"| {name} | {s['finished_at']} | {s['wall_time_s']:.1f} s | ${s['wall_time_s'] / 3600 * usd:.2f} | {config} |")
    lines.append(f"| total | | {total:.1f} s | ${total / 3600 * usd:.2f} | |")

    lines += ["", "## Metrics", "", metrics_table(summaries) or "No model metrics yet (no training stage has run)."]
    curves = [c for name in summaries if (c := loss_curve(read_metrics(run, name), name))]
    if curves:
        lines += ["", "## Loss curves", "", *curves]
    generated = [s for summary in summaries.values() for s in samples(summary)]
    if generated:
        lines += ["", "## Samples", "", *generated]
    return "\n".join(lines) + "\n"


def write(run):
    """Builds the report card (credentials redacted) and writes it to `<run>/report.md` in one
    atomic, retried write; returns (URI, markdown)."""
    markdown = storage.redact(build(run))
    uri = storage.join(run, REPORT)
    storage.write_text(uri, markdown)
    return uri, markdown


def main(argv=None):
    """The command; returns its exit code (1 with one line on stderr when there is no report)."""
    p = argparse.ArgumentParser(prog="python -m nanochat.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run URI, path, or name (a name X means <storage>/runs/X)")
    p.add_argument("--storage", default=None, help="storage root (default: $NANOCHAT_STORAGE)")
    args = p.parse_args(argv)
    try:
        uri, _ = write(storage.run_uri(args.run, args.storage))
    except ReportError as e:
        print(f"nanochat report: error: {e}", file=sys.stderr)
        return 1
    print(storage.redact(uri))
    return 0


if __name__ == "__main__":
    sys.exit(main())
