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
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.s3server import free_port

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
        return subprocess.run(cmd, env={**os.environ, **self.env}, check=True, capture_output=True, text=True).stdout

    def steps_launched(self, job_id):
        """The steps of the job that slurmd launched ("12.0", ...), from its log."""
        log = (self.root / "slurmd.log").read_text()
        return [line.split("StepId=")[1].split()[0] for line in log.splitlines()
                if "launch task StepId=" in line and f"StepId={job_id}." in line]


@contextlib.contextmanager
def slurm_cluster(root):
    """Starts the three daemons on a fresh configuration in `root`, waits for the node to be idle,
    and at the end cancels every job, waits for them to be gone and stops the daemons."""
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
        wait_for(lambda: (root / "munge.socket").exists(), "munged's socket", procs)
        procs.append(daemon(root, "slurmctld", "-D", "-f", str(conf)))
        procs.append(daemon(root, "slurmd", "-D", "-f", str(conf)))
        wait_for(lambda: node_state(cluster) == "idle", "the node to be idle", procs)
        yield cluster
    finally:
        if len(procs) == len(DAEMONS):
            cancel_all(cluster)
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def daemon(root, name, *args):
    """A daemon in the foreground, its output in <root>/<name>.out."""
    with open(root / f"{name}.out", "w") as out:
        return subprocess.Popen([name, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def node_state(cluster):
    try:
        return cluster.run("sinfo", "--noheader", "--format=%T").strip()
    except subprocess.CalledProcessError:
        return None  # slurmctld not answering yet


def wait_for(condition, what, procs, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}) waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def cancel_all(cluster, timeout=30):
    """Cancels the cluster's jobs and waits until they are gone: a job's processes outlive slurmd."""
    jobs = cluster.run("squeue", "--noheader", "--format=%i").split()
    if jobs:
        cluster.run("scancel", *jobs)
    deadline = time.monotonic() + timeout
    while cluster.run("squeue", "--noheader", "--format=%i").split() and time.monotonic() < deadline:
        time.sleep(0.5)
