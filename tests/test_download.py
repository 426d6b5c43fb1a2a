"""Downloads from a real HTTP server on 127.0.0.1 serving ../shared/data, with injected faults:
each ends in a correct file or a clear one-line error, never a corrupt file in the cache."""

import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset, sources, storage
from nanochat.dataloader import PretrainLoader
from nanochat.tokenizer import Tokenizer
from tests.support.httpserver import serve

SHARD = "pretrain/shard_00000.parquet"


@pytest.fixture
def server(shared_data):
    with serve(shared_data) as s:
        yield s


def downloader(tmp_path, mirror, **options):
    options = {"backoff": 0.01, "timeout": 5.0, "progress": False, **options}
    return dataset.Downloader(str(tmp_path / "storage"), mirror, **options)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_stage(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nanochat.stages.download", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_stage_downloads_everything_then_moves_no_bytes(server, shared_data, tmp_path):
    args = ["--run", str(tmp_path / "run"), "--preset", "tiny", "--storage", str(tmp_path / "storage"),
            "--data-mirror", server.url]
    first = run_stage(*args)
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "run" / "download" / "stage.json").read_text())
    files = json.loads((tmp_path / "run" / "download" / "files.json").read_text())
    data = tmp_path / "storage" / "data"
    # the tiny preset: 2 training shards + the last shard (validation), the eval bundle, every task file
    expected = ["pretrain/shard_00023.parquet", "pretrain/shard_00000.parquet", "pretrain/shard_00001.parquet",
                *sources.GROUPS["eval"], *sources.GROUPS["tasks"]]
    assert sorted(files) == sorted(expected)
    for relpath, entry in files.items():
        assert sha256(data / relpath) == sha256(shared_data / relpath) == entry["sha256"]
        assert entry["url"] == f"{server.url}/{relpath}"
    assert json.loads((data / "manifest.json").read_text()) == {r: {k: e[k] for k in ("url", "bytes", "sha256")}
                                                                 for r, e in files.items()}
    assert (data / "eval_bundle" / "core.yaml").is_file()
    assert not [p for p in (data / ".partial").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert summary["metrics"]["fetched_bytes"] == summary["metrics"]["bytes"] > 10_000_000
    assert "download:" in first.stderr and "B/s" in first.stderr  # the tqdm bar: bytes and rate

    server.requests.clear()
    second = run_stage(*args)
    assert second.returncode == 0, second.stderr
    assert server.gets() == []  # a second run moves no bytes
    assert json.loads((tmp_path / "run" / "download" / "stage.json").read_text())["metrics"]["fetched_bytes"] == 0


@pytest.mark.parametrize("faults, timeout, requests, resumed", [
    (["drop:1000000"], 5.0, 2, None),  # connection reset mid-body (what arrived before the RST is kept)
    (["truncate:700000", "truncate:1500000"], 5.0, 3, True),  # body shorter than Content-Length, twice
    (["status:500", "status:503"], 5.0, 3, False),  # server errors, then success
    (["status:429"], 5.0, 2, False),  # rate limited (Retry-After: 0)
    (["short:2000000"], 5.0, 2, False),  # a consistent but short file: footer check fails, fetched again
    (["truncate:1000000", "norange"], 5.0, 2, False),  # the server ignores Range: start over
    (["slow:0.01"], 5.0, 1, False),  # slow but steady: one request
    (["slow:3"], 0.5, 2, False),  # stalls past the timeout: retried
])
def test_faults_end_in_a_correct_file(server, shared_data, tmp_path, faults, timeout, requests, resumed):
    server.inject("/" + SHARD, *faults)
    entry = downloader(tmp_path, server.url, timeout=timeout).download([SHARD])[0]
    path = tmp_path / "storage" / "data" / SHARD
    assert sha256(path) == sha256(shared_data / SHARD) == entry["sha256"]
    gets = server.gets("/" + SHARD)
    assert len(gets) == requests
    size = (shared_data / SHARD).stat().st_size
    if resumed is not None:
        assert (gets[-1][1] == 206) == resumed  # a Range request continued the partial file
    assert entry["fetched"] == size if resumed else entry["fetched"] >= size


def test_permanent_failures_are_one_line_naming_url_and_reason(server, tmp_path):
    server.inject("/" + SHARD, *["status:500"] * 3)
    d = downloader(tmp_path, server.url, retries=2)
    with pytest.raises(dataset.DownloadError) as e:
        d.download([SHARD])
    assert str(e.value) == f"{server.url}/{SHARD}: HTTP 500 Internal Server Error (gave up after 3 failed attempts)"
    assert not (tmp_path / "storage" / "data" / SHARD).exists()
    # after the server recovers, the same cache works
    assert d.download([SHARD])[0]["fetched"] > 0

    server.inject("/" + SHARD, "truncate:1000000")  # progress is not a failure: it resumes
    (tmp_path / "storage" / "data" / SHARD).unlink()
    assert downloader(tmp_path, server.url, retries=0).download([SHARD])[0]["fetched"] > 0

    with pytest.raises(dataset.DownloadError, match=rf"^{server.url}/nothing/here: HTTP 404 Not Found$"):
        dataset._open_http(f"{server.url}/nothing/here", 0, 5)


def test_stage_failure_is_one_line_and_leaves_no_file(server, tmp_path):
    server.inject("/" + SHARD, *["status:503"] * 10)
    result = run_stage("--run", str(tmp_path / "run"), "--preset", "tiny", "--storage", str(tmp_path / "storage"),
                       "--data-mirror", server.url, "--retries", "1", "--workers", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"download: error: {server.url}/{SHARD}: HTTP 503 Service Unavailable (gave up after 2 failed attempts)")
    assert not (tmp_path / "storage" / "data" / SHARD).exists()
    assert not (tmp_path / "run" / "download" / "stage.json").exists()
    missing = run_stage("--run", str(tmp_path / "run"), "--preset", "tiny", "--data-mirror", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr.strip().splitlines()[-1]


def test_bad_shards_in_the_mirror_are_refused(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "pretrain").mkdir(parents=True)
    pq.write_table(pa.table({"content": ["a", "b"]}), mirror / SHARD)
    (mirror / "pretrain" / "shard_00001.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
    with serve(mirror) as server:
        for relpath, reason in [(SHARD, "no 'text' column"), ("pretrain/shard_00001.parquet", "not a readable parquet file")]:
            with pytest.raises(dataset.DownloadError, match=rf"^{server.url}/{relpath}: shard check failed: {reason}"):
                downloader(tmp_path, server.url, retries=1).download([relpath])
            assert not (tmp_path / "storage" / "data" / relpath).exists()


def test_verify_refetches_a_damaged_file_and_a_lost_manifest_costs_no_bytes(server, shared_data, tmp_path):
    downloader(tmp_path, server.url).download([SHARD])
    path = tmp_path / "storage" / "data" / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a re-hash notices
    path.write_bytes(bytes(data))
    assert downloader(tmp_path, server.url).download([SHARD])[0]["fetched"] == 0
    assert downloader(tmp_path, server.url, verify=True).download([SHARD])[0]["fetched"] > 0
    assert sha256(path) == sha256(shared_data / SHARD)

    (tmp_path / "storage" / "data" / "manifest.json").unlink()
    server.requests.clear()
    entry = downloader(tmp_path, server.url).download([SHARD])[0]
    assert entry["fetched"] == 0 and entry["sha256"] == sha256(path) and server.gets() == []


def test_concurrent_fetchers_of_one_file_move_it_once(server, shared_data, tmp_path):
    """A training process waiting for a shard that the download stage is fetching: the partial
    file's lock makes the second fetcher wait, then find the file done."""
    server.inject("/" + SHARD, "slow:0.01")
    results = []
    threads = [threading.Thread(target=lambda: results.append(downloader(tmp_path, server.url).download([SHARD])[0]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(server.gets("/" + SHARD)) == 1
    assert sorted(r["fetched"] for r in results)[0] == 0
    waiter = dataset.shard_waiter(str(tmp_path / "storage"), server.url)
    assert waiter(storage.join("file:///anywhere", SHARD)) == storage.join(dataset.Downloader(str(tmp_path / "storage")).data_root, SHARD)


def test_shard_plan_from_an_http_mirror(shared_data, monkeypatch):
    """The mirror's shards are listed, or probed with HEAD requests where listings are off; the
    validation shard is the mirror's last."""
    for listings in (True, False):
        with serve(shared_data, listings=listings) as server:
            assert sources.pretrain_plan(-1, server.url) == (list(range(23)), 23)
            assert sources.pretrain_plan(2, server.url) == ([0, 1], 23)
    monkeypatch.delenv("NANOCHAT_DATA_MIRROR", raising=False)
    assert sources.pretrain_plan(2, None) == ([0, 1], 1822)
    assert sources.url(sources.get(SHARD), None) == \
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00000.parquet"
    with pytest.raises(sources.SourceError, match="unknown data file 'pretrain/shard_01823.parquet'"):
        sources.get("pretrain/shard_01823.parquet")


def test_remote_cache_on_s3(server, shared_data, s3_root):
    relpath = "hf/openai/gsm8k/main/test-00000-of-00001.parquet"
    uri = dataset.fetch(relpath, s3_root, server.url, backoff=0.01)
    assert uri == f"{s3_root}/data/{relpath}"
    assert storage.sha256(uri) == sha256(shared_data / relpath)
    server.requests.clear()
    assert dataset.fetch(relpath, s3_root, server.url) == uri and server.gets() == []


def test_training_starts_on_the_first_shards(server, tmp_path):
    """The loader takes the planned shard list while later shards are not in the cache yet; it
    fetches (or waits for) each one only when it gets there."""
    store = str(tmp_path / "storage")
    train, val = dataset.pretrain_shards(2, store, server.url)
    dataset.fetch(SHARD, store, server.url)
    tok = Tokenizer({bytes([i]): i for i in range(256)})
    loader = PretrainLoader(tok, 64, 64, train, wait_for_shard=dataset.shard_waiter(store, server.url))
    next(loader)
    assert not storage.exists(train[1]) and not storage.exists(val)
    while loader.cursor["shard"] == 0:
        next(loader)
    assert storage.exists(train[1]) and len(server.gets("/pretrain/shard_00001.parquet")) == 1


def test_a_later_run_resumes_the_partial_file_of_the_same_version_only(server, shared_data, tmp_path):
    server.inject("/" + SHARD, "truncate:1000000", "status:404")  # the first run dies mid-file
    with pytest.raises(dataset.DownloadError, match="HTTP 404"):
        downloader(tmp_path, server.url).download([SHARD])
    partial = tmp_path / "storage" / "data" / ".partial" / SHARD
    assert partial.stat().st_size == 1_000_000 and not (tmp_path / "storage" / "data" / SHARD).exists()
    server.requests.clear()
    entry = downloader(tmp_path, server.url).download([SHARD])[0]
    assert server.gets("/" + SHARD) == [("bytes=1000000-", 206, entry["bytes"] - 1_000_000)]
    assert sha256(tmp_path / "storage" / "data" / SHARD) == sha256(shared_data / SHARD)

    # a partial file of another version of the file (If-Range does not match): start over
    (tmp_path / "storage" / "data" / SHARD).unlink()
    (tmp_path / "storage" / "data" / "manifest.json").unlink()
    partial.write_bytes(b"x" * 1_000_000)
    (partial.parent / (partial.name + ".validator")).write_text('"an-older-version"')
    server.requests.clear()
    entry = downloader(tmp_path, server.url).download([SHARD])[0]
    assert server.gets("/" + SHARD) == [("bytes=1000000-", 200, entry["bytes"])]
    assert sha256(tmp_path / "storage" / "data" / SHARD) == sha256(shared_data / SHARD)


def test_a_remote_caches_partial_files_are_in_a_folder_of_the_users_own(tmp_path, monkeypatch):
    """Partial downloads for a remote cache wait in the temp dir, in a folder of this user's own
    (mode 700); one of that name another user made is refused rather than written into."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / f"nanochat-partial-{os.getuid()}"
    with dataset._partial_file("s3://bucket/data", "s3://bucket/data/a.parquet", "a.parquet") as path:
        assert Path(path).is_relative_to(folder) and stat.S_IMODE(folder.stat().st_mode) == 0o700
    if os.getuid() != 0:
        return  # (only root can make a folder that another user owns)
    os.chown(folder, 65534, 65534)
    with pytest.raises(dataset.DownloadError, match="belongs to another user"):
        with dataset._partial_file("s3://bucket/data", "s3://bucket/data/a.parquet", "a.parquet"):
            pass


def characters(path):
    """The characters of a shard's documents, by pyarrow's reader (the oracle of the stage's count)."""
    return sum(len(text) for text in pq.read_table(path, columns=["text"]).column("text").to_pylist())


def test_min_chars_fetches_only_the_first_shards_that_hold_that_much_text(server, shared_data, tmp_path):
    """--min-chars between the first two shards' characters and the first three's: the stage fetches
    shard 0 alone, then the two more its count says are missing, and no other pretraining shard; the
    later stages read the three it declares. Past all the text a cap (-n) allows, it takes those and
    says so."""
    chars = [characters(shared_data / f"pretrain/shard_{i:05d}.parquet") for i in range(3)]
    args = ["--run", str(tmp_path / "run"), "--preset", "tiny", "--storage", str(tmp_path / "storage"),
            "--data-mirror", server.url, "--num-shards=-1", "--min-chars", str(chars[0] + chars[1] + 1)]
    done = run_stage(*args)
    assert done.returncode == 0, done.stderr
    files = json.loads((tmp_path / "run" / "download" / "files.json").read_text())
    shards = ["pretrain/shard_00000.parquet", "pretrain/shard_00001.parquet", "pretrain/shard_00002.parquet"]
    assert sorted(r for r in files if r.startswith("pretrain/")) == [*shards, "pretrain/shard_00023.parquet"]
    server.gets()  # (once every body has gone)
    fetched = {path for method, path, *_ in server.requests if method == "GET" and path.endswith(".parquet")}
    assert fetched >= {f"/{r}" for r in shards} and not {p for p in fetched if p.startswith("/pretrain/")} - {
        f"/{r}" for r in [*shards, "pretrain/shard_00023.parquet"]}
    assert f"the first 3 training shards hold {sum(chars):,} characters" in done.stderr
    metrics = json.loads((tmp_path / "run" / "download" / "stage.json").read_text())["metrics"]
    assert metrics["fetched_bytes"] == metrics["bytes"] and metrics["train_shards"] == 3  # the shards counted first too

    capped = run_stage(*args[:-3], "--num-shards=2", "--min-chars", str(10**12), "--run", str(tmp_path / "capped"))
    assert capped.returncode == 0, capped.stderr
    files = json.loads((tmp_path / "capped" / "download" / "files.json").read_text())
    assert sorted(r for r in files if r.startswith("pretrain/")) == [*shards[:2], "pretrain/shard_00023.parquet"]
    assert f"all 2 training shards hold {sum(chars[:2]):,} characters, fewer than the {10**12:,} asked for" in capped.stderr


def test_min_chars_below_one_is_refused(tmp_path):
    done = run_stage("--run", str(tmp_path / "run"), "--preset", "tiny", "--min-chars", "0")
    assert done.returncode == 2 and "argument --min-chars: 0: expected an integer from 1 up" in done.stderr
    assert "Traceback" not in done.stderr
