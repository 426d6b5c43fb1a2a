"""The sandbox against hostile programs, in each way it runs: as root (the program runs as nobody)
and as an unprivileged user (a throwaway uid when we are root, else ourselves), each also with the
seccomp fallback forced. Each program is contained and leaves no process behind, and after them
all a normal program still runs. Where the harm depends on the user's rights, the same program run
outside the sandbox first shows that the harm is real."""

import json
import os
import pwd
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

from nanochat.execution import MAX_OUTPUT_BYTES, ExecutionResult, calculator, execute, interpreter, sandbox_user
from tests.support.stagerun import missing
from tests.support.waiting import end

REPO = Path(__file__).resolve().parent.parent
USERS = ["root", "user"]
WITH_SECCOMP = [*USERS, "user+seccomp"]  # what the fallback contains too; files stay as readable as its user's rights allow
EVERY_WAY = [*WITH_SECCOMP, "root+seccomp"]
SECRET = "PRIVATE-KEY-hunter2"
ANSWER_TIMEOUT = 60  # seconds a driver or an unsandboxed program may take (each program's own limit is 5)

# Runs in the mode's user: one execute() per line of stdin, one JSON line back, with what it logged.
DRIVER = """
import dataclasses, json, logging, sys
from nanochat.execution import execute
log = []
handler = logging.Handler()
handler.emit = lambda record: log.append(record.getMessage())
logging.getLogger().addHandler(handler)
for line in sys.stdin:
    print(json.dumps({"result": dataclasses.asdict(execute(**json.loads(line))), "log": log}), flush=True)
    log.clear()
"""


def free_uid():
    """A uid no account and no process has: our throwaway user, gone when its processes are."""
    taken = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
    while True:
        uid = random.randrange(200_000, 300_000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in taken:
                return uid


class Sandbox:
    """A driver process that calls execute() as the mode's user, in a home holding private files
    (~/.ssh/id_rsa and a file in its working directory, both mode 600)."""

    def __init__(self, mode):
        if mode.startswith("root") and os.getuid() != 0:
            missing("the root mode of the sandbox needs the tests to run as root")
        self.mode = mode
        self.user = None if mode.startswith("root") or os.getuid() != 0 else (free_uid(),) * 2
        self.base = Path(tempfile.mkdtemp(prefix="nanochat-sandbox-test-"))
        self.base.chmod(0o755)
        self.home, self.cwd = self.base / "home", self.base / "home" / "project"
        (self.home / ".ssh").mkdir(parents=True)
        self.cwd.mkdir()
        self.secrets = [self.home / ".ssh" / "id_rsa", self.cwd / "token"]
        for path in self.secrets:
            path.write_text(SECRET)
            path.chmod(0o600)
        (self.base / "tmp").mkdir()
        if self.user:
            for path in (self.home, *self.home.rglob("*"), self.base / "tmp"):
                os.chown(path, *self.user)
        self.python = interpreter(self.user) if self.user else sys.executable
        psutil_site = Path(psutil.__file__).parent.parent
        self.env = {"PATH": os.environ["PATH"], "HOME": str(self.home), "TMPDIR": str(self.base / "tmp"),
                    "PYTHONPATH": f"{REPO}:{psutil_site}", "NANOCHAT_TEST_SECRET": SECRET}
        if mode.endswith("+seccomp"):
            self.env["NANOCHAT_SANDBOX"] = "seccomp"
        self.driver = self.popen(["-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.log = []

    def popen(self, args, **kwargs):
        user = {"user": self.user[0], "group": self.user[1], "extra_groups": []} if self.user else {}
        return subprocess.Popen([self.python, *args], cwd=self.cwd, env=self.env, text=True, **user, **kwargs)

    @property
    def uid(self):
        """The uid the sandboxed programs run as."""
        return (self.user or sandbox_user() or (os.getuid(),))[0]

    def run(self, program, **kwargs):
        """The ExecutionResult of `program` run by the driver's execute()."""
        self.driver.stdin.write(json.dumps({"program": program, **kwargs}) + "\n")
        self.driver.stdin.flush()
        # execute() ends every program within its timeout; a driver silent for much longer is stuck
        if not select.select([self.driver.stdout], [], [], ANSWER_TIMEOUT)[0]:
            end(self.driver)
            raise TimeoutError(f"the {self.mode} driver gave no answer in {ANSWER_TIMEOUT} s")
        line = self.driver.stdout.readline()
        assert line, f"the driver died (exit code {self.driver.wait()})"
        answer = json.loads(line)
        self.log += answer["log"]
        return ExecutionResult(**answer["result"])

    def unsandboxed(self, program):
        """`program` run directly as the mode's user, as the driver could: what the sandbox prevents."""
        done = self.popen(["-I", "-c", program], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return done.communicate(timeout=ANSWER_TIMEOUT)[0]
        finally:
            end(done)

    def leftovers(self):
        """Processes of this sandbox's programs still running as the sandbox user (their command
        line holds their directory, under ours); a zombie holds nothing."""
        return [p for p in psutil.process_iter(["uids", "status", "cmdline"])
                if p.info["uids"] and p.info["uids"].real == self.uid and p.info["status"] != psutil.STATUS_ZOMBIE
                and str(self.base) in " ".join(p.info["cmdline"] or [])]

    def close(self):
        self.driver.kill()  # it may be in the middle of a program, if a test failed
        self.driver.wait()
        shutil.rmtree(self.base)


@pytest.fixture(scope="module")
def sandboxes():
    """The modes' sandboxes, each started when first asked for. At the end, after all the hostile
    programs, each still runs a normal program."""
    started = {}
    try:
        yield started
        results = {mode: sandbox.run("print(sum(range(10)))") for mode, sandbox in started.items()}
    finally:
        for sandbox in started.values():
            sandbox.close()
    assert all(r.success and r.stdout == "45\n" for r in results.values()), results


@pytest.fixture(params=USERS)
def sandbox(request, sandboxes):
    """The mode's sandbox; after the test, nothing of its programs runs."""
    if request.param not in sandboxes:
        sandboxes[request.param] = Sandbox(request.param)
    yield sandboxes[request.param]
    assert sandboxes[request.param].leftovers() == []


@pytest.mark.parametrize("sandbox", EVERY_WAY, indirect=True)
def test_a_normal_program_and_the_log(sandbox):
    """A program runs; the log says when the sandbox falls back to seccomp, and only then."""
    result = sandbox.run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.success and result.stdout == "out\n" and result.stderr == "err\n"
    assert result.returncode == 0 and not result.timed_out and result.error is None
    warned = [line for line in sandbox.log if line.startswith("sandbox: no namespaces")]
    if sandbox.mode.endswith("+seccomp"):
        assert len(warned) == 1 and "(NANOCHAT_SANDBOX=seccomp)" in warned[0] and f"what uid {sandbox.uid} can" in warned[0]
    else:
        assert warned == [], warned


def test_an_exception_is_a_failure_with_its_message(sandbox):
    result = sandbox.run("raise ValueError('bad input')")
    assert not result.success and result.returncode == 1
    assert result.error == "ValueError: bad input" and "Traceback" in result.stderr


@pytest.mark.parametrize("sandbox", WITH_SECCOMP, indirect=True)
def test_fork_bomb_is_contained(sandbox):
    result = sandbox.run("import os\nwhile True:\n    os.fork()", timeout=2.0)
    assert not result.success  # the fixture then checks that none of the bomb's processes is left


@pytest.mark.parametrize("sandbox", WITH_SECCOMP, indirect=True)
def test_forked_sleepers_die_with_the_program(sandbox):
    """Children that try to leave the program's session; then the program leaves it itself, and
    sleeps until it is killed at the timeout."""
    program = ("import os, time\n"
               "def leave():\n    try:\n        os.setsid()\n    except OSError:\n        pass\n"
               "for _ in range(3):\n    if os.fork() == 0:\n        leave()\n        time.sleep(60)\n"
               "print('parent done', flush=True)\nleave()\ntime.sleep(60)")
    # 2 s: the program must start and print first (under a busy machine's load, 0.5 s once was too little)
    result = sandbox.run(program, timeout=2.0)
    assert result.stdout == "parent done\n" and result.timed_out and result.error == "timed out after 2 s"
    assert result.returncode is None and not result.success  # the fixture then checks that no sleeper survived


def test_memory_bomb_is_contained(sandbox):
    result = sandbox.run("x = bytearray(8 * 2**30)")
    assert not result.success and result.error == "MemoryError"
    result = sandbox.run("xs = []\nwhile True:\n    xs.append(bytearray(2**24))", memory_bytes=128 * 2**20)
    assert not result.success and "MemoryError" in result.error


def test_huge_output_is_capped(sandbox):
    result = sandbox.run("while True:\n    print('x' * 10000)", timeout=2.0)
    assert not result.success
    assert len(result.stdout) <= MAX_OUTPUT_BYTES + 100 and result.stdout.endswith("[output truncated]")


def test_huge_file_is_refused(sandbox):
    result = sandbox.run("open('big', 'wb').write(b'x' * (64 * 2**20))")
    assert not result.success and "File too large" in result.error


def test_private_files_are_not_readable(sandbox):
    program = (f"for path in {[str(p) for p in sandbox.secrets]!r}:\n"
               f"    try:\n        print(open(path).read())\n    except OSError as e:\n        print(type(e).__name__)")
    assert sandbox.unsandboxed(program).count(SECRET) == 2  # the user can read them
    result = sandbox.run(program)
    assert result.success and SECRET not in result.stdout + result.stderr
    assert result.stdout.split() == ["FileNotFoundError"] * 2  # they are not in the sandbox's view


def test_writing_outside_its_directory_is_refused(sandbox):
    targets = [sandbox.home / "pwned", sandbox.cwd / "pwned"]
    program = f"for path in {[str(p) for p in targets]!r}:\n    open(path, 'w').write('x')"
    assert sandbox.unsandboxed(program) == "" and all(t.exists() for t in targets)  # the user can write there
    for target in targets:
        target.unlink()
    result = sandbox.run(program)
    assert not result.success and not any(t.exists() for t in targets)
    assert sandbox.run("open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())").stdout == "ok\n"


def test_the_callers_environment_is_not_readable(sandbox):
    program = f"import os\nprint(sorted(os.environ))\nprint(open('/proc/{sandbox.driver.pid}/environ').read())"
    assert SECRET in sandbox.unsandboxed(program)  # the driver's environment, readable by its user
    result = sandbox.run(program)
    assert SECRET not in result.stdout + result.stderr
    assert result.stdout == "['HOME', 'LANG', 'PATH', 'TMPDIR']\n" and not result.success


@pytest.mark.parametrize("sandbox", WITH_SECCOMP, indirect=True)
def test_no_network(sandbox):
    """A connection to a server on 127.0.0.1, through the C module under `socket` too."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        program = f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {server.getsockname()[1]}))\ns.send(b'hi')"
        assert sandbox.unsandboxed(program) == ""
        server.accept()[0].close()  # it connected
        result = sandbox.run(program)
        assert not result.success and ("unreachable" in result.error or "not permitted" in result.error), result.error
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # nobody else connected: the program is gone, so no connection is on its way
            server.accept()


@pytest.mark.parametrize("sandbox", EVERY_WAY, indirect=True)
def test_the_program_holds_no_privilege(sandbox):
    """Not root, and no capability: it cannot unshare a mount namespace (which would be harmless)."""
    program = "import ctypes, os\nprint(os.getuid() == 0, ctypes.CDLL(None).unshare(0x20000) == 0)"
    if sandbox.mode.startswith("root"):
        assert sandbox.unsandboxed(program) == "True True\n"  # what the driver could do
    assert sandbox.run(program).stdout == "False False\n"


@pytest.mark.parametrize("sandbox", WITH_SECCOMP, indirect=True)
def test_signalling_the_callers_group_is_refused(sandbox):
    """The program signals the driver that runs it (its caller), the driver's process group, and
    everything its user may signal: the driver lives on to answer."""
    caller = sandbox.driver.pid  # the leader of its own process group
    program = (f"import os, signal\n"
               f"for target in ({caller}, -{caller}, -1):\n"
               f"    try:\n        os.kill(target, signal.SIGKILL)\n        print('killed')\n"
               f"    except OSError as e:\n        print(type(e).__name__)\n")
    result = sandbox.run(program)
    assert result.success and "killed" not in result.stdout, result.stdout
    assert sandbox.driver.poll() is None


def test_a_bad_isolation_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SANDBOX", "none")
    with pytest.raises(ValueError, match="NANOCHAT_SANDBOX must be 'seccomp' or unset, not 'none'"):
        execute("pass")


def test_calculator():
    assert calculator("3 * (4 + 5)") == "27"
    assert calculator("'strawberry'.count('r')") == "3"
    assert calculator("1 / 0") is None
    assert calculator("import os") is None  # a statement, not an expression
    assert calculator("2 ** 10 ** 10") is None  # times out (CPU limit), never hangs the caller
    assert calculator("x" * 1000) is None

