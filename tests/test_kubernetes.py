"""The Kubernetes example (deployments/kubernetes/) and the image its pods run (Dockerfile).

`make deploy-k8s` runs against the session's Prefect server: pool gpu-k8s and the deployments of
deployments/kubernetes/prefect.yaml, with the real CLI. The Job that a flow run of the deployed
`stage/base_train` becomes is rendered by prefect-kubernetes' own code (`resolve_for_flow_run`, as
its worker calls it): no cluster. The Dockerfile cannot be built here (no docker daemon, no base
image), so it is parsed (dockerfile-parse) and the facts the pods rely on are checked.
"""

import asyncio
import importlib.util
import json
import os
import re
import subprocess
from importlib.metadata import metadata, requires
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.specifiers import SpecifierSet
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkPoolFilter, WorkPoolFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.templating import find_placeholders
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from nanochat import pipeline
from tests.support import waiting

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deployments" / "kubernetes"
API_URL = "http://prefect-server.prefect:4200/api"  # the worker's, which its flow runs get
IMAGE = "registry.example/nanochat:0123abc"
NNODES, GPUS = 3, 8
TORCHRUN = [s.name for s in pipeline.PIPELINE if s.torchrun]


def template():
    return json.loads((KUBE / "base-job-template.json").read_text())


def make_deploy_k8s(*args):
    """`make deploy-k8s` (`-o setup`: a test never reinstalls the .venv)."""
    env = {k: v for k, v in os.environ.items() if k != "IMAGE"}
    return waiting.run(["make", "-o", "setup", "deploy-k8s", *args], 300, cwd=REPO, env=env)


@pytest.fixture(scope="module")
def deployed(prefect_api):
    """Pool gpu-k8s and deployments/kubernetes/prefect.yaml's deployments on the session's server."""
    done = make_deploy_k8s(f"PREFECT_API={prefect_api}", f"IMAGE={IMAGE}")
    assert done.returncode == 0, done.stdout + done.stderr


async def render():
    """What the worker of pool gpu-k8s makes of a 3-node flow run of the deployed stage/base_train:
    (job configuration, flow run). The run is deleted once rendered: no worker polls this pool."""
    parameters = {"name": "base_train", "run_name": "d20", "preset": "d20", "storage": "s3://bucket/nanochat",
                  "nnodes": NNODES, "nproc_per_node": GPUS}
    async with get_client() as client:
        pool = await client.read_work_pool("gpu-k8s")
        deployment = await client.read_deployment_by_name("stage/base_train")
        flow_run = await client.create_flow_run_from_deployment(
            deployment.id, parameters=parameters, job_variables={"nnodes": NNODES, "nproc_per_node": GPUS})
        with temporary_settings({PREFECT_API_URL: API_URL}):
            config = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                flow_run, client=client, work_pool=pool, worker_name="gpu-k8s-worker")
        await client.delete_flow_run(flow_run.id)
    return config, flow_run


@pytest.fixture(scope="module")
def rendered(deployed):
    return asyncio.run(render())


def test_make_deploy_k8s_refuses_without_an_image():
    refused = make_deploy_k8s()
    assert refused.returncode == 2 and "make deploy-k8s: give IMAGE=" in refused.stderr


def test_the_torchrun_stages_are_deployed_to_run_from_the_image(deployed):
    """The file lists the pipeline's torchrun rows in order, and the server holds exactly those on
    gpu-k8s, each running the image's code at the template's workingDir."""
    deployments = yaml.safe_load((KUBE / "prefect.yaml").read_text())["deployments"]
    assert [(d["name"], d["parameters"]) for d in deployments] == [(name, {"name": name}) for name in TORCHRUN]
    workdir = template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["workingDir"]

    async def read():
        async with get_client() as client:
            on_pool = await client.read_deployments(work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=["gpu-k8s"])))
            return on_pool, await client.read_deployment_by_name("stage/base_train")

    on_pool, base_train = asyncio.run(read())
    assert sorted(d.name for d in on_pool) == sorted(TORCHRUN)
    assert {d.flow_id for d in on_pool} == {base_train.flow_id}  # the flow "stage", as stage/base_train shows
    for d in on_pool:
        assert d.entrypoint == "flows/speedrun.py:one_stage" and d.parameters == {"name": d.name}
        assert d.job_variables == {"image": IMAGE}
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]


def pod_template(config):
    return config.job_manifest["spec"]["template"]


def test_every_placeholder_is_a_declared_variable_and_resolves(rendered):
    config, _ = rendered
    declared = set(template()["variables"]["properties"])
    assert {p.name for p in find_placeholders(template()["job_configuration"])} <= declared
    assert "{{" not in json.dumps(config.job_manifest)


def test_a_flow_run_is_an_indexed_job_of_nnodes_identical_pods(rendered):
    config, flow_run = rendered
    job = config.job_manifest
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == NNODES
    pod = pod_template(config)["spec"]
    [container] = pod["containers"]  # one template: every pod has this image, environment and GPUs
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"nvidia.com/gpu": GPUS}
    env = {e["name"]: e for e in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == str(flow_run.id)
    assert env["PREFECT_API_URL"]["value"] == API_URL
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert env["NANOCHAT_RDZV_ENDPOINT"]["value"] == f"$(JOB_NAME)-0.{pod['subdomain']}:29500"
    names = [e["name"] for e in container["env"]]
    assert names.index("JOB_NAME") < names.index("NANOCHAT_RDZV_ENDPOINT")  # $(VAR) sees only earlier entries


def test_pod_0_runs_the_flow_run_and_the_others_the_node(rendered, tmp_path):
    """The container's own command line, run by sh with stand-ins for `prefect` and `python` that
    print how they were called."""
    config, _ = rendered
    container = pod_template(config)["spec"]["containers"][0]
    for name in ("prefect", "python"):
        stub = tmp_path / name
        stub.write_text('#!/bin/sh\necho "$(basename "$0") $*"\n')
        stub.chmod(0o755)

    def started(index):
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": str(index)}
        return subprocess.run([*container["command"], *container["args"]], env=env, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    assert started(0) == config.command == KubernetesWorkerJobConfiguration._base_flow_run_command()
    assert [started(i) for i in range(1, NNODES)] == ["python -m flows.node"] * (NNODES - 1)
    assert importlib.util.find_spec("flows.node") is not None


def test_the_rendezvous_service_selects_pod_0_under_the_jobs_subdomain(rendered):
    config, _ = rendered
    service = yaml.safe_load((KUBE / "rendezvous-service.yaml").read_text())
    pod = pod_template(config)
    assert service["metadata"]["name"] == pod["spec"]["subdomain"] and service["spec"]["clusterIP"] == "None"

    def selected(index):  # Kubernetes labels each pod of an Indexed Job with its index
        labels = {**pod["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": str(index)}
        return service["spec"]["selector"].items() <= labels.items()

    assert selected(0) and not any(selected(i) for i in range(1, NNODES))
    endpoint = next(e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == "NANOCHAT_RDZV_ENDPOINT")
    assert int(endpoint.rsplit(":", 1)[1]) in [port["port"] for port in service["spec"]["ports"]]


def test_s3_credentials_come_from_a_secret(rendered):
    config, _ = rendered
    container = pod_template(config)["spec"]["containers"][0]
    assert {"secretRef": {"name": "nanochat-s3"}} in container["envFrom"]
    assert not [e["name"] for e in container["env"] if e["name"].startswith("AWS_")]
    assert "AWS_" not in json.dumps(template())  # the pool's template is config Prefect stores


def stages(dockerfile):
    """The instructions of each build stage, as (instruction, value) pairs."""
    out = []
    for item in dockerfile.structure:
        if item["instruction"] == "FROM":
            out.append([])
        if out and item["instruction"] != "COMMENT":
            out[-1].append((item["instruction"], item["value"]))
    return out


def test_the_dockerfile_builds_the_image_the_template_names():
    dockerfile = DockerfileParser(path=str(REPO / "Dockerfile"))
    workdir = template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["workingDir"]
    python = SpecifierSet(metadata("nanochat")["Requires-Python"])
    for image in dockerfile.parent_images:
        assert re.fullmatch(r"python:(\d+\.\d+)-slim-\w+", image) and python.contains(image.split(":")[1].split("-")[0])
    build, final = stages(dockerfile)

    # The project at the template's workingDir, its .venv made by `make setup`'s commands, with
    # the torch it pins from the index TORCH_INDEX names (CUDA by default, or CPU).
    assert ("WORKDIR", workdir) in build and ("COPY", ". .") in build
    assert ("WORKDIR", workdir) in final and f"--from=build --chown=nanochat:nanochat {workdir} {workdir}" in dict(final)["COPY"]
    [setup] = [value for instruction, value in build if instruction == "RUN" and "venv" in value]
    makefile = (REPO / "Makefile").read_text()
    torch = re.search(r"^TORCH := (\S+)$", makefile, re.M)[1]
    assert torch in requires("nanochat")
    assert "$(PYTHON) -m venv $(VENV)" in makefile and "install -q -e ." in makefile
    assert setup.startswith("python -m venv .venv ")
    assert f'pip install --no-cache-dir {torch} --index-url "$TORCH_INDEX"' in setup
    assert setup.index("--index-url") < setup.index("pip install --no-cache-dir -e .")
    assert any(instruction == "ARG" and value.startswith("TORCH_INDEX=") for instruction, value in build)

    # `prefect` and `python -m flows.node` resolve in the .venv, and nothing runs as root.
    assert dockerfile.envs["PATH"].startswith(f"{workdir}/.venv/bin:")
    user = [value for instruction, value in final if instruction == "USER"][-1]
    assert user not in ("root", "0")

    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "rustbpe/target", "rustbpe/_native", "**/__pycache__", ".pytest_cache", ".hypothesis",
            ".ruff_cache", "runs"} <= ignored
