"""Storage faults: transient errors are retried and permanent ones are not; a checkpoint, a stage
commit or a report is complete and verifiable or not there at all; a stage whose uploads keep
failing fails naming the URI and resumes once storage is back; credentials reach no file or log."""

import argparse
import errno
import logging
import os
import re
import subprocess
import sys
import time
import uuid

import boto3
import pytest
import s3fs
import torch
from botocore.exceptions import ClientError
from s3fs.errors import translate_boto_error

from nanochat import checkpoint, report, stage, storage
from tests.support import faultyfs
from tests.support.faultyfs import FAULTS
from tests.support.httpserver import serve
from tests.support.stagerun import stage as run_stage


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("NANOCHAT_STORAGE_RETRIES", "3")
    monkeypatch.setenv("NANOCHAT_STORAGE_RETRY_DELAY", "0")


@pytest.fixture(params=["file", "s3"])
def faulty_root(request, tmp_path, fast_retries):
    """`faulty::<root>`: a real local directory or moto bucket behind the fault injector."""
    faultyfs.register()
    base = storage.normalize(str(tmp_path)) if request.param == "file" else request.getfixturevalue("s3_root")
    yield "faulty::" + base
    FAULTS.reset()


def cycles(root):
    """Seeded fault scenarios per test: fewer through moto, whose every call is an HTTP request."""
    return 30 if root.startswith("faulty::file://") else 8


def s3_error(status, code):
    """The error s3fs raises for an S3 answer (botocore's ClientError, translated)."""
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return translate_boto_error(ClientError(response, "PutObject"))


@pytest.mark.parametrize("error, expected", [
    (s3_error(503, "SlowDown"), True), (s3_error(500, "InternalError"), True), (s3_error(502, "BadGateway"), True),
    (s3_error(429, "TooManyRequests"), True), (ConnectionResetError(), True), (TimeoutError(), True),
    (OSError(errno.EIO, "I/O error"), True),
    (s3_error(403, "AccessDenied"), False), (s3_error(404, "NoSuchKey"), False), (s3_error(400, "InvalidArgument"), False),
    (PermissionError(), False), (FileNotFoundError(), False), (ValueError(), False), (OSError(errno.ENOSPC, "full"), False),
])
def test_transient_or_permanent(error, expected):
    assert storage.transient(error) is expected


def test_permanent_errors_are_not_retried(s3_root, fast_retries, caplog):
    missing = s3_root.replace("s3://", "s3://no-such-bucket-", 1)
    with pytest.raises(FileNotFoundError):
        storage.write_bytes(storage.join(missing, "x.bin"), b"x")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def save(root, step, model):
    return checkpoint.save(root, step, model.state_dict(), {}, {"seed": step}, keep_last=3)


def test_random_faults_leave_only_complete_checkpoints(faulty_root):
    """Seeded faults in every call of many save/load cycles: a save either completes or leaves
    nothing a loader takes; a load finds the newest complete checkpoint or raises StorageError."""
    model = torch.nn.Linear(8, 8)
    outcomes = set()
    for step in range(1, cycles(faulty_root) + 1):
        torch.nn.init.normal_(model.weight)
        FAULTS.reset(rate=0.25, seed=step)
        try:
            save(faulty_root, step, model)
            outcomes.add("saved")
        except storage.StorageError:
            outcomes.add("save failed")
        try:
            loaded = checkpoint.load_latest(faulty_root)
        except storage.StorageError:
            loaded = "unavailable"
        FAULTS.reset()
        complete = [s for s, done in checkpoint.list_steps(faulty_root) if done]
        for s in complete:  # every visible checkpoint verifies
            checkpoint.load(checkpoint.step_dir(faulty_root, s))
        if loaded != "unavailable":
            assert loaded[2]["step"] == complete[-1]
            outcomes.add("loaded")
    assert outcomes == {"saved", "save failed", "loaded"}


def test_random_faults_leave_stage_json_and_report_complete_or_absent(faulty_root):
    for seed in range(cycles(faulty_root)):
        run = storage.join(faulty_root, f"run{seed}")
        out = storage.join(run, "demo", "out.bin")
        storage.write_bytes(out, os.urandom(1000))
        FAULTS.reset(rate=0.3, seed=seed)
        try:
            stage.commit(run, "demo", argparse.Namespace(x=seed), {}, {"out": out}, {"loss": 1.0}, time.time())
            report.write(run)
        except storage.StorageError:
            pass
        FAULTS.reset()
        summary = storage.join(run, "demo", stage.SUMMARY)
        if storage.exists(summary):
            recorded = storage.read_json(summary)["outputs"]["out"]
            assert storage.sha256(out) == recorded["sha256"]
        if storage.exists(storage.join(run, report.REPORT)):
            text = storage.read_text(storage.join(run, report.REPORT))
            assert "| demo |" in text and text.endswith("(no training stage has run).\n")


def test_storage_down_fails_naming_the_file_then_comes_back(faulty_root, caplog):
    model = torch.nn.Linear(8, 8)
    save(faulty_root, 1, model)
    FAULTS.reset(down=True)
    with pytest.raises(storage.StorageError, match=r"upload to faulty::.*/step_000002/model\.safetensors failed "
                                                   r"after 3 attempts: ConnectionRefusedError"):
        save(faulty_root, 2, model)
    retries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2 and all("step_000002/model.safetensors failed" in m for m in retries)
    FAULTS.reset()
    assert checkpoint.load_latest(faulty_root)[2]["step"] == 1  # step 2 has no manifest: invisible
    save(faulty_root, 2, model)
    assert checkpoint.load_latest(faulty_root)[2]["step"] == 2


def test_redact(monkeypatch):
    assert storage.redact("https://user:pw@host:8/a?X-Amz-Signature=abc&part=1") == \
        "https://***@host:8/a?X-Amz-Signature=***&part=1"
    assert storage.redact({"u": ["s3://k:s@b/p", 3]}) == {"u": ["s3://***@b/p", 3]}
    assert storage.redact("s3://bucket/a@b/c") == "s3://bucket/a@b/c"
    # the values of secret-looking variables, wherever they appear; short ones would match everywhere
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    monkeypatch.setenv("MY_API_KEY", "k3y")
    monkeypatch.setenv("NANOCHAT_RUN_LABEL", "hf_abcdefgh999")
    assert storage.redact(["token hf_abcdefgh123 used", "k3y", "hf_abcdefgh999"]) == ["token *** used", "k3y", "hf_abcdefgh999"]


def bucket_files(endpoint, bucket):
    """{key: content as latin-1 text} of every object in a bucket of the moto server."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode("latin-1") for key in keys}


@pytest.fixture
def own_s3_clients():
    """s3fs caches its filesystems by their arguments, not the environment: without this, the test's
    own reads would go to whichever endpoint an earlier test's instance was made for, and its
    instance (endpoint and secret) would outlive it."""
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_stage_fails_while_uploads_fail_then_resumes_and_leaks_no_credentials(shared_data, monkeypatch, own_s3_clients):
    """base_train on S3 (moto) reads its shards over HTTP with a password in the URI. While the
    server answers 503 to its step-4 checkpoint, it fails naming that file; once storage is back, a
    rerun resumes from step 2. No file in the bucket and no line of output holds a credential."""
    secret, password = f"aws-secret-{uuid.uuid4().hex}", f"http-pass-{uuid.uuid4().hex}"
    with faultyfs.faulty_s3_server() as (endpoint, s3), serve(str(shared_data)) as http:
        for name, value in {"AWS_ACCESS_KEY_ID": "nanochat-test", "AWS_SECRET_ACCESS_KEY": secret,
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_MAX_ATTEMPTS": "1",
                            "NANOCHAT_STORAGE_RETRIES": "3", "NANOCHAT_STORAGE_RETRY_DELAY": "0.01",
                            "OMP_NUM_THREADS": "1"}.items():
            monkeypatch.setenv(name, value)
        bucket = f"b-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        run, env = f"s3://{bucket}/run", {**os.environ, "NANOCHAT_STORAGE": f"s3://{bucket}/storage"}
        data = ["--data", http.url.replace("://", f"://nanochat:{password}@") + "/pretrain"]
        train = [*data, "--num-steps", "4", "--checkpoint-every", "2", "--eval-every", "-1"]
        outputs = [run_stage("nanochat.stages.tok_train", run, env, *data, "--max-chars", "200000")]

        s3.match = "/step_000004/"
        failed = run_stage("nanochat.stages.base_train", run, env, *train, check=False)
        outputs.append(failed)
        assert failed.returncode == 1
        assert re.fullmatch(rf"base_train: error: upload to {run}/base_train/checkpoints/step_000004/model\.safetensors "
                            r"failed after 3 attempts: .*injected outage", failed.stderr.strip().splitlines()[-1])
        steps = checkpoint.list_steps(storage.join(run, "base_train", "checkpoints"))
        assert [s for s, done in steps if done] == [2]
        assert not storage.exists(storage.join(run, "base_train", stage.SUMMARY))

        s3.match = None
        outputs.append(run_stage("nanochat.stages.base_train", run, env, *train))
        assert "resumed at step 2" in outputs[-1].stderr
        summary = storage.read_json(storage.join(run, "base_train", stage.SUMMARY))
        assert summary["config"]["data"].startswith("http://***@127.0.0.1")
        for out in summary["outputs"].values():
            assert storage.sha256(out["uri"]) == out["sha256"]
        outputs.append(subprocess.run([sys.executable, "-m", "nanochat.report", "--run", run], env=env,
                                      capture_output=True, text=True, check=True, timeout=120))
        files = bucket_files(endpoint, bucket)

    assert f"{run}/report.md".removeprefix(f"s3://{bucket}/") in files
    logs = [p.stdout + p.stderr for p in outputs]
    for text in [*logs, *files.values()]:
        assert secret not in text and password not in text
    assert any("http://***@127.0.0.1" in text for text in logs)
