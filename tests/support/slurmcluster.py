"""A real one-node Slurm cluster on 127.0.0.1 (Debian's slurm-wlm, `make dev` installs it) for tests:
munged, slurmctld and slurmd, each with its files in one temporary directory.

    with slurm_cluster(tmp_path) as cluster:
        subprocess.run(["sbatch", ...], env={**os.environ, **cluster.env})

The configuration has no cgroups (a container, or gVisor, gives none to write): processes are
tracked by parentage (proctrack/linuxproc) and tasks are not bound (task/none). No accounting
database either, so `sacct` has nothing; slurmd's log names every step it launches instead.
"""

import contextlib
import dataclasses
import os
import socket
import subprocess
from pathlib import Path

import psutil

from flows import launch
from tests.support.s3server import free_port
from tests.support.waiting import end, until

DAEMONS = ("munged", "slurmctld", "slurmd")

SLURM_CONF = """\
ClusterName=nanochat-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
# a node that registers comes up idle; a cancelled job is killed 2 s after its SIGTERM
ReturnToService=2
KillWait=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclasses.dataclass
class Cluster:
    root: Path
    env: dict  # for Slurm's commands: SLURM_CONF

    def run(self, *cmd):
        """A Slurm command's output (it raises on failure)."""
        return subprocess.run(cmd, env={**os.environ, **self.env}, check=True, capture_output=True, text=True,
                              timeout=60).stdout

    def steps_launched(self, job_id):
        """The steps of the job that slurmd launched ("12.0", ...), from its log."""
        log = (self.root / "slurmd.log").read_text()
        return [line.split("StepId=")[1].split()[0] for line in log.splitlines()
                if "launch task StepId=" in line and f"StepId={job_id}." in line]


@contextlib.contextmanager
def slurm_cluster(root):
    """Starts the three daemons on a fresh configuration in `root`, waits for the node to be idle,
    and at the end cancels every job, waits for them to be gone, stops the daemons and kills what
    is left of the jobs."""
    root = Path(root)
    for sub in ("state", "spool"):
        (root / sub).mkdir(parents=True)
    root.chmod(0o700)  # munged refuses a key in a directory others can write
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=free_port(), slurmd_port=free_port(),
                                      cpus=os.cpu_count()))
    cluster = Cluster(root, {"SLURM_CONF": str(conf)})
    procs = []
    try:
        procs.append(daemon(root, "munged", "--foreground", "--force", f"--key-file={key}",
                            f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid",
                            f"--seed-file={root}/munged.seed", f"--log-file={root}/munged.log"))
        until(lambda: (root / "munge.socket").exists(), 30, "munged's socket", procs=procs)
        procs.append(daemon(root, "slurmctld", "-D", "-f", str(conf)))
        procs.append(daemon(root, "slurmd", "-D", "-f", str(conf)))
        until(lambda: node_state(cluster), 30, "the node to be idle", done=lambda state: state == "idle", procs=procs)
        yield cluster
    finally:
        stop(cluster, procs)


def daemon(root, name, *args):
    """A daemon in the foreground, its output in <root>/<name>.out."""
    with open(root / f"{name}.out", "w") as out:
        return subprocess.Popen([name, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def node_state(cluster):
    try:
        return cluster.run("sinfo", "--noheader", "--format=%T").strip()
    except subprocess.CalledProcessError:
        return None  # slurmctld not answering yet


def stop(cluster, daemons):
    """Cancels the cluster's jobs, stops its daemons, then kills whatever of the jobs is left: a job's
    processes outlive slurmd, and carry the cluster's SLURM_CONF (sbatch passes the submitting
    environment on)."""
    try:
        if len(daemons) == len(DAEMONS):
            cancel_all(cluster)
    finally:
        for proc in reversed(daemons):
            end(proc)
        launch.kill_tree(with_env("SLURM_CONF", cluster.env["SLURM_CONF"]), grace=5)


def cancel_all(cluster, timeout=30):
    """Cancels the cluster's jobs and waits up to `timeout` s for them to be gone."""
    jobs = cluster.run("squeue", "--noheader", "--format=%i").split()
    if jobs:
        cluster.run("scancel", *jobs)
    with contextlib.suppress(TimeoutError):  # stop() kills what is left
        until(lambda: not cluster.run("squeue", "--noheader", "--format=%i").split(), timeout, "the cancelled jobs to go")


def with_env(name, value):
    """The processes (but this one) whose environment has name=value."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(name) == value:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
