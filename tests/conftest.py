"""Shared fixtures: the real data folder, and a real S3-compatible server."""

import os
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.s3server import make_bucket, moto_server, s3_env
from tests.stagerun import missing

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.ci_skips"]  # under CI, any skip fails the run


@pytest.fixture(scope="session")
def shared_data():
    """The real datasets (../shared/data or $NANOCHAT_TEST_DATA). Missing: a skip with the reason,
    except in CI (CI=true), where it is an error."""
    path = Path(os.environ.get("NANOCHAT_TEST_DATA") or REPO.parent / "shared" / "data").resolve()
    if not (path / "pretrain").is_dir():
        missing(f"real test data not found at {path} (set NANOCHAT_TEST_DATA)")
    return path


@pytest.fixture(scope="session")
def eval_bundle(shared_data, tmp_path_factory):
    """The CORE eval bundle of the shared data, unpacked: its directory."""
    root = tmp_path_factory.mktemp("bundle")
    with zipfile.ZipFile(shared_data / "eval_bundle.zip") as z:
        z.extractall(root)
    return root / "eval_bundle"


@pytest.fixture(scope="session")
def s3_endpoint():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_root(s3_endpoint, monkeypatch):
    """A fresh bucket on the moto server, as `s3://bucket/nanochat`, with the environment set so
    that s3fs reaches it."""
    import s3fs

    s3_env(monkeypatch, s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    make_bucket(s3_endpoint, bucket)
    return f"s3://{bucket}/nanochat"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect API for the session (the test harness: a temporary server on SQLite), with
    PREFECT_HOME in a temporary directory; yields the API URL for subprocesses (workers, CLI)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect-home")}), prefect_test_harness():
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_env(shared_data, tmp_path_factory):
    """Environment for stage subprocesses: one thread each, a scratch storage root, the data mirror."""
    storage = tmp_path_factory.mktemp("storage")
    return {**os.environ, "OMP_NUM_THREADS": "1", "NANOCHAT_STORAGE": str(storage),
            "NANOCHAT_DATA_MIRROR": str(shared_data)}


@pytest.fixture(scope="session")
def tiny_base_run(tiny_env, shared_data, tmp_path_factory):
    """A run with a tiny tokenizer and a briefly trained tiny base model."""
    from tests.stagerun import stage

    run = tmp_path_factory.mktemp("base") / "run"
    data = ["--data", str(shared_data / "pretrain")]
    stage("nanochat.stages.tok_train", run, tiny_env, *data)
    stage("nanochat.stages.base_train", run, tiny_env, *data, "--num-steps", "6", "--eval-every", "-1")
    return run


@pytest.fixture(scope="session")
def full_tiny_run(prefect_api, shared_data, tmp_path_factory):
    """The whole tiny DAG, download to chat_eval_rl, through the speedrun flow: (run URI, the flow
    run's final state). Its data mirror is a real HTTP server on 127.0.0.1, stopped the moment
    download commits and still configured after that, so every later stage proves it reads its data
    through the run's files.json (tests/test_flows.py and tests/test_data_inputs.py share the run)."""
    from flows.speedrun import speedrun
    from nanochat import storage
    from tests.httpserver import serve

    root = str(tmp_path_factory.mktemp("storage"))
    run = storage.run_uri("full", root)
    committed = storage.local_path(storage.join(run, "download", "stage.json"))
    with serve(shared_data) as server:

        def stop_after_download():
            while not os.path.exists(committed):
                time.sleep(0.02)
            server.shutdown()
            server.server_close()

        watcher = threading.Thread(target=stop_after_download, daemon=True)
        watcher.start()
        state = speedrun(preset="tiny", run_name="full", storage=root, data_mirror=server.url, retries=0,
                         return_state=True)
        watcher.join(timeout=1)
        assert not watcher.is_alive(), "download never committed"
    return run, state
