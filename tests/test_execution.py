"""The sandbox against hostile programs: each one is contained, and the next program runs normally."""

import os
import socket
import threading

import psutil
import pytest

from nanochat.execution import MAX_OUTPUT_BYTES, calculator, execute, sandbox_user


def sandbox_processes():
    """Processes left running as the sandbox's user (nobody when the tests run as root); a zombie
    (dead, waiting for init to reap it) holds nothing."""
    user = sandbox_user()
    if user is None:
        return []  # the sandbox runs as ourselves: its leftovers would be among our own processes
    return [p for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and p.info["uids"].real == user[0] and p.info["status"] != psutil.STATUS_ZOMBIE]


@pytest.fixture(autouse=True)
def still_serves():
    """After every hostile program: nothing of it is left running, and a normal program runs."""
    yield
    assert sandbox_processes() == []
    result = execute("print(sum(range(10)))")
    assert result.success and result.stdout == "45\n", result


def test_a_normal_program():
    result = execute("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.success and result.stdout == "out\n" and result.stderr == "err\n"
    assert result.returncode == 0 and not result.timed_out and result.error is None


def test_an_exception_is_a_failure_with_its_message():
    result = execute("raise ValueError('bad input')")
    assert not result.success and result.returncode == 1
    assert result.error == "ValueError: bad input" and "Traceback" in result.stderr


def test_infinite_loop_times_out():
    result = execute("while True:\n    pass", timeout=1.0)
    assert not result.success and result.timed_out and result.error == "timed out after 1 s"


def test_fork_bomb_is_contained():
    result = execute("import os\nwhile True:\n    os.fork()", timeout=2.0)
    assert not result.success


def test_forked_sleepers_die_with_the_program():
    program = ("import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n"
               "print('parent done')")
    result = execute(program, timeout=2.0)
    assert result.stdout == "parent done\n"  # the autouse fixture then checks that no sleeper survived


def test_memory_bomb_is_contained():
    result = execute("x = bytearray(8 * 2**30)")
    assert not result.success and result.error == "MemoryError"
    result = execute("xs = []\nwhile True:\n    xs.append(bytearray(2**24))")
    assert not result.success and "MemoryError" in result.error


def test_huge_output_is_capped():
    result = execute("while True:\n    print('x' * 10000)", timeout=2.0)
    assert not result.success
    assert len(result.stdout) <= MAX_OUTPUT_BYTES + 100 and result.stdout.endswith("[output truncated]")


def test_huge_file_is_refused():
    result = execute("open('big', 'wb').write(b'x' * (64 * 2**20))")
    assert not result.success and "File too large" in result.error


def test_writing_outside_the_temp_dir_is_refused(tmp_path):
    if sandbox_user() is None:
        pytest.skip("the sandbox confines writes by running as nobody, which needs root")
    target = tmp_path / "pwned"
    repo_file = os.path.abspath(__file__)
    result = execute(f"open({str(target)!r}, 'w').write('x')")
    assert not result.success and "Permission denied" in result.error and not target.exists()
    result = execute(f"open({repo_file!r}, 'a').write('x')")
    assert not result.success and "Permission denied" in result.error
    assert execute("open('mine.txt', 'w').write('ok')\nprint(open('mine.txt').read())").stdout == "ok\n"


def test_the_parent_environment_is_not_readable(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    program = f"import os\nprint(sorted(os.environ))\nprint(open('/proc/{os.getpid()}/environ').read())"
    result = execute(program)
    assert "NANOCHAT_TEST_SECRET" not in result.stdout and "hunter2" not in result.stdout + result.stderr
    assert result.stdout.startswith("['HOME', 'LANG', 'PATH', 'TMPDIR']")
    assert not result.success  # /proc/<our pid>/environ: invisible in its PID namespace, or not ours to read


def test_no_network():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(3)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        try:
            accepted.append(server.accept())
        except TimeoutError:
            pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    result = execute(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')")
    assert not result.success and ("unreachable" in result.error or "refused" in result.error or "disabled" in result.error)
    thread.join()  # accept() times out: nobody connected
    server.close()
    assert accepted == []


def test_signalling_the_parent_is_contained():
    program = (f"import os, signal\n"
               f"for pid in (os.getppid(), {os.getpid()}):\n"
               f"    try:\n"
               f"        os.kill(pid, signal.SIGKILL)\n"
               f"    except OSError as e:\n"
               f"        print(type(e).__name__)\n")
    execute(program)
    assert psutil.pid_exists(os.getpid())  # we are still here to check


def test_calculator():
    assert calculator("3 * (4 + 5)") == "27"
    assert calculator("'strawberry'.count('r')") == "3"
    assert calculator("1 / 0") is None
    assert calculator("import os") is None  # a statement, not an expression
    assert calculator("2 ** 10 ** 10") is None  # times out (CPU limit), never hangs the caller
    assert calculator("x" * 1000) is None
