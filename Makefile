# nanochat: the README's commands. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pip is noisy here about extra indexes that lack a package; drop only those lines.
PIP := $(PY) -m pip --disable-pip-version-check
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
TORCH := torch==2.13.0
PRESET ?= tiny
RUN ?= speedrun-$(PRESET)
# Where the datasets come from: in this workplace a local mirror of the real sources (see
# ../shared/data/README.md); elsewhere leave it empty to download from the real URLs.
DATA_MIRROR ?= $(if $(wildcard ../shared/data/pretrain),$(abspath ../shared/data),)
export NANOCHAT_DATA_MIRROR ?= $(DATA_MIRROR)

SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
RUST_SOURCES := rustbpe/Cargo.toml $(wildcard rustbpe/src/*.rs)

# The Prefect server of `make server`, which `make worker` and `make deploy` talk to.
PREFECT_API ?= http://127.0.0.1:4200/api
unexport PREFECT_API  # Prefect would read it from the environment as its own `api` settings, and fail
# Where workers clone the deployed commit (HEAD) from: the origin remote, else this clone's own path
# (a worker on this machine).
GIT_URL ?= $(or $(shell git remote get-url origin 2>/dev/null),$(CURDIR))
# processes per node (default: the flow's, one per GPU on GPU presets, 2 on the cpu preset)
NPROC ?=
# stages `make speedrun` leaves out, comma-separated (mid_train,chat_rl: upstream's 2026 speedrun)
SKIP ?=
# your own identity conversations (`nanochat identity`), for mid_train and chat_sft: a path, made
# absolute for the stages, or a URI
IDENTITY ?=
# `make server` listens here; beyond loopback only with PREFECT_SERVER_API_AUTH_STRING set
HOST ?= 127.0.0.1
PORT ?= 4200
# a value as one shell word, whatever it holds (a run name with a space, or a `;`)
quote = '$(subst ','\'',$(1))'

.PHONY: help setup dev speedrun test lint bench gpu-wheels server worker deploy deploy-k8s clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' Makefile | sed -E 's/:.*## /\t/' | expand -t 12

setup: $(VENV)/.setup  ## create .venv and install nanochat (no-op when current)

dev: $(VENV)/.dev  ## setup + test and benchmark dependencies

$(VENV)/.setup: pyproject.toml $(RUST_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(QUIET_PIP)
	# A machine without an NVIDIA GPU gets the CPU build of torch (a local wheel here, else the
	# PyTorch CPU index), never the multi-GB CUDA build that PyPI serves by default.
	if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install -q "$(TORCH)" $(QUIET_PIP); \
	else \
	  $(PIP) install -q "$(TORCH)+cpu" $(QUIET_PIP) || \
	  $(PIP) install -q "$(TORCH)" --index-url https://download.pytorch.org/whl/cpu $(QUIET_PIP); \
	fi
	$(PIP) install -q -e . $(QUIET_PIP)
	touch $@

$(VENV)/.dev: $(VENV)/.setup
	$(PIP) install -q -e ".[dev]" $(QUIET_PIP)
	# Chromium for the web UI test (Debian's package), installed when missing.
	command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	# Slurm for the Slurm test (Debian's: slurmctld, slurmd, the client commands, munge), when missing;
	# as root only, as that test runs the daemons as root (a normal user's PATH lacks /usr/sbin, where they are).
	[ "$$(id -u)" != 0 ] || command -v slurmctld >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null; }
	# The upstream PyPI rustbpe, an oracle for ours: same import name, so it lives apart and
	# tests drive it in a subprocess.
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/upstream-rustbpe rustbpe==0.1.0 $(QUIET_PIP)
	touch $@

# The flow's temporary Prefect server gets 2 minutes to start (Prefect's 20 s is short for a first start on busy cores),
# and sends Prefect no usage telemetry (offline, each attempt logged an ERROR line).
speedrun: setup  ## run the pipeline flow now, no server needed (PRESET=tiny|cpu|d20|d24|d26|d32, RUN=name, NPROC=processes, SKIP=mid_train,chat_rl, IDENTITY=my.jsonl)
	PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=$${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-120} \
	PREFECT_SERVER_ANALYTICS_ENABLED=$${PREFECT_SERVER_ANALYTICS_ENABLED:-false} \
	$(PY) -m flows.speedrun --preset $(call quote,$(PRESET)) --run $(call quote,$(RUN)) $(if $(NPROC),--nproc-per-node $(call quote,$(NPROC))) \
	  $(if $(SKIP),--skip $(call quote,$(SKIP))) \
	  $(if $(IDENTITY),--identity $(call quote,$(if $(findstring ://,$(IDENTITY)),$(IDENTITY),$(abspath $(IDENTITY)))))

server: setup  ## Prefect server and UI on http://HOST:PORT, 127.0.0.1:4200 by default (SQLite under PREFECT_HOME, or PREFECT_API_DATABASE_CONNECTION_URL)
	@case "$(HOST)" in 127.0.0.1|localhost|::1) ;; *) [ -n "$${PREFECT_SERVER_API_AUTH_STRING:-}" ] || { \
	  echo "make server HOST=$(HOST): a server beyond loopback needs PREFECT_SERVER_API_AUTH_STRING=user:password" \
	       "(workers and clients then set PREFECT_API_AUTH_STRING to the same)" >&2; exit 2; } ;; esac
	$(VENV)/bin/prefect server start --host $(HOST) --port $(PORT)

worker: setup  ## a process worker on work pool "gpu" (creates the pool from deployments/gpu-pool.json)
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect work-pool create gpu --type process \
	  --base-job-template deployments/gpu-pool.json --overwrite
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect worker start --pool gpu

# The deployments are read from this tree, but workers run its commit: the two must be the same.
deploy: setup  ## register prefect.yaml's deployments (speedrun, one per stage); workers run HEAD, cloned from GIT_URL
	@[ -z "$$(git status --porcelain)" ] || { echo "make deploy: changes that are not committed, which workers" \
	  "would not run (new files too): commit them" >&2; git status --short >&2; exit 2; }
	@# pushed: HEAD is in the history of a branch or tag that GIT_URL has now (not a stale remote-tracking ref)
	@[ '$(GIT_URL)' = '$(CURDIR)' ] || git ls-remote --heads --tags $(call quote,$(GIT_URL)) | cut -f1 | \
	  while read -r sha; do git merge-base --is-ancestor HEAD "$$sha" 2>/dev/null && echo pushed; done | grep -q pushed || \
	  { echo "make deploy: HEAD is on no branch or tag of $(GIT_URL), so workers cloning it would not find it:" \
	  "push it (or GIT_URL=$(CURDIR) for a worker on this machine)" >&2; exit 2; }
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect work-pool create gpu --type process \
	  --base-job-template deployments/gpu-pool.json --overwrite
	# pool gpu-slurm (the slurm deployment's) as deployments/slurm/worker.sbatch creates it, if no worker has yet
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect work-pool inspect gpu-slurm >/dev/null 2>&1 || \
	  PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect work-pool create gpu-slurm --type process
	NANOCHAT_GIT_URL='$(GIT_URL)' NANOCHAT_COMMIT=$$(git rev-parse HEAD) PREFECT_API_URL=$(PREFECT_API) \
	  $(VENV)/bin/prefect --no-prompt deploy --all
	PREFECT_API_URL=$(PREFECT_API) $(PY) -m flows.notify

# The pods run IMAGE's code, not a clone of HEAD: build and push it from the commit `make deploy` registered.
deploy-k8s: setup  ## the torchrun stages' stage/* onto Kubernetes pool gpu-k8s (deployments/kubernetes/), IMAGE=registry/nanochat:tag
	@[ -n '$(IMAGE)' ] || { echo "make deploy-k8s: give IMAGE=registry/nanochat:tag, the image the pods run" \
	  "(the Dockerfile, built from the deployed commit and pushed where the cluster pulls from)" >&2; exit 2; }
	PREFECT_API_URL=$(PREFECT_API) $(VENV)/bin/prefect work-pool create gpu-k8s --type kubernetes \
	  --base-job-template deployments/kubernetes/base-job-template.json --overwrite
	NANOCHAT_IMAGE='$(IMAGE)' PREFECT_API_URL=$(PREFECT_API) \
	  $(VENV)/bin/prefect --no-prompt deploy --all --prefect-file deployments/kubernetes/prefect.yaml

# pytest runs in the environment make was started in, as a plain `pytest` does: without make's own
# variables, the command line's (`make test NPROC=2` would reach the makes that tests run) or the
# data mirror exported above (tests name the data they read).
TEST_UNSET := MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES MAKE_TERMOUT MAKE_TERMERR \
  $(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))) \
  $(if $(filter file,$(origin NANOCHAT_DATA_MIRROR)),NANOCHAT_DATA_MIRROR)

# Two pytest-xdist workers: much of the suite waits (servers starting, stages' processes, Prefect),
# so two share 2 cores well (tests/conftest.py keeps the full tiny run's tests on one of them);
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: dev  ## run the whole test suite (Rust and Python)
	cargo test --quiet --release --manifest-path rustbpe/Cargo.toml
	env $(addprefix -u ,$(TEST_UNSET)) $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup

lint: dev  ## ruff over the whole tree (configured in pyproject.toml)
	$(VENV)/bin/ruff check .

# The benchmarks that take minutes; learner_run, recipe_ablation and cpu_sweep take an hour or more,
# compare.py takes two commits and gpu_check.py a GPU: run those by hand (docs/ARCHITECTURE.md, "Benchmarks").
QUICK_BENCHES := inference peer_inference serve_load serve_soak train_throughput train_distributed dataloader \
  tokenizer_train orchestration

bench: dev  ## run the benchmarks that take minutes (each prints one JSON line), going on past any that fails
	for b in $(QUICK_BENCHES); do $(PY) bench/$$b.py || echo "bench/$$b.py failed" >&2; done

# What a GPU machine's own torch image commonly lacks for bench/gpu_check.py (rustbpe's cffi, the
# server, the openai client), as wheels at this venv's versions for that image's Python.
GPU_WHEELS := cffi fastapi starlette pydantic pydantic-core annotated-types typing-inspection opentelemetry-api \
  uvicorn openai httpx2 httpcore2 truststore jiter sniffio distro
GPU_PYTHON ?= 3.12

gpu-wheels: setup  ## wheels into .whl/ for a GPU machine without this venv (see bench/gpu_check.py), GPU_PYTHON=3.12
	rm -rf .whl
	$(PIP) download -q --no-deps --only-binary=:all: -d .whl --python-version $(GPU_PYTHON) --implementation cp \
	  $(addprefix --platform manylinux_2_,17_x86_64 27_x86_64 28_x86_64 34_x86_64) --platform manylinux2014_x86_64 \
	  $$($(PY) -c 'import sys, importlib.metadata as m; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $(GPU_WHEELS)) $(QUIET_PIP)
	du -sh .whl

clean:  ## remove build outputs (keeps .venv)
	rm -rf rustbpe/target rustbpe/_native .pytest_cache
