"""Shared fixtures: the real data folder, and a real S3-compatible server."""

import concurrent.futures
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path

import pytest

from tests.support import deployed
from tests.support.s3server import make_bucket, moto_server, s3_env
from tests.support.stagerun import missing, stage

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.support.ci_skips"]  # under CI, any skip fails the run
# full_tiny_run: `make setup` in a fresh clone, then the whole DAG; the tests that ask for it allow as long
FULL_RUN_TIMEOUT = 840
WANTS_FULL_RUN = pytest.StashKey[bool]()
DATA = Path(os.environ.get("NANOCHAT_TEST_DATA") or REPO.parent / "shared" / "data").resolve()  # the real datasets
HAVE_DATA = (DATA / "pretrain").is_dir()
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # this process is a pytest-xdist worker (`make test`)
# Each pytest process is a node of its own to flows/slots.py, as it has a Prefect server of its own:
# the flows of two workers take no turns with each other, nor with GPU jobs of this machine.
NODE_LOCK = Path(tempfile.gettempdir()) / f"nanochat-node-test-{os.getpid()}.lock"
os.environ["NANOCHAT_NODE_LOCK"] = str(NODE_LOCK)  # (not the xdist controller's, which its workers inherit)


def pytest_unconfigure(config):
    NODE_LOCK.unlink(missing_ok=True)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the groups
def pytest_collection_modifyitems(items):
    """A test that asks for full_tiny_run may be the one that makes it: it gets the run's time too.
    Under pytest-xdist they are one group (`--dist loadgroup`: one worker makes the run and runs
    them) that comes first, so that the run starts with the session as it does without workers."""
    for item in items:
        if "full_tiny_run" in item.fixturenames:
            item.add_marker(pytest.mark.timeout(FULL_RUN_TIMEOUT + 120))
            item.add_marker(pytest.mark.xdist_group("full_tiny_run"))
    if XDIST_WORKER:
        items.sort(key=lambda item: "full_tiny_run" not in item.fixturenames)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def shared_data():
    """The real datasets. Missing: a skip with the reason, except in CI (CI=true), where it is an error."""
    if not HAVE_DATA:
        missing(f"real test data not found at {DATA} (set NANOCHAT_TEST_DATA)")
    return DATA


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
def tiny_tokenizer_run(tiny_env, shared_data, tmp_path_factory):
    """A run with a trained tiny tokenizer (tok_train done), in a storage root of its own: the one
    trained tokenizer of the suite. Copy it (shutil.copytree) to build on it."""
    run = tmp_path_factory.mktemp("tiny-storage") / "runs" / "tokenizer"
    stage("nanochat.stages.tok_train", run, tiny_env, "--data", str(shared_data / "pretrain"))
    return run


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_run):
    """The tokenizer of tiny_tokenizer_run, loaded."""
    from nanochat.tokenizer import Tokenizer

    summary = json.loads((tiny_tokenizer_run / "tok_train" / "stage.json").read_text())
    return Tokenizer.load(summary["outputs"]["tokenizer"]["uri"].rsplit("/", 1)[0])


@pytest.fixture(scope="session")
def tiny_base_run(tiny_tokenizer_run, tiny_env, shared_data):
    """tiny_tokenizer_run with a briefly trained tiny base model, as run "tiny" of the same storage
    root (so `nanochat serve --run tiny` finds it there): the one trained tiny run of the suite."""
    run = tiny_tokenizer_run.parent / "tiny"
    shutil.copytree(tiny_tokenizer_run, run)
    stage("nanochat.stages.base_train", run, tiny_env, "--data", str(shared_data / "pretrain"), "--num-steps", "6",
          "--eval-every", "-1")
    return run


def pytest_collection_finish(session):
    session.config.stash[WANTS_FULL_RUN] = any("full_tiny_run" in item.fixturenames for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def full_tiny_run_started(request, tmp_path_factory):
    """Starts the full_tiny_run with the session when a test that will run asks for it: it takes a few
    minutes, mostly on one core (pip, then single-process stages), and the other tests run beside it.
    Without the real data it is not started (full_tiny_run then skips, or fails under CI); under
    pytest-xdist the worker that runs the tests asking for it makes it, first (see above)."""
    if not (request.config.stash.get(WANTS_FULL_RUN, False) and HAVE_DATA) or XDIST_WORKER:
        yield None
        return
    api = request.getfixturevalue("prefect_api")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        yield pool.submit(deployed.full_tiny_run, api, DATA, tmp_path_factory.mktemp("elsewhere"), FULL_RUN_TIMEOUT)


@pytest.fixture(scope="session")
def full_tiny_run(full_tiny_run_started, shared_data, request, tmp_path_factory):
    """The whole tiny DAG, download to chat_eval_rl, as a user on a cluster runs it (a TinyRun, see
    tests/support/deployed.py): tests/test_deploy_elsewhere.py, test_flows.py and test_data_inputs.py share it."""
    if full_tiny_run_started is None:  # a pytest-xdist worker
        return deployed.full_tiny_run(request.getfixturevalue("prefect_api"), DATA, tmp_path_factory.mktemp("elsewhere"),
                                      FULL_RUN_TIMEOUT)
    return full_tiny_run_started.result(timeout=FULL_RUN_TIMEOUT + 60)
