"""The sandbox against real attacks (real bubblewrap, no mocks). Each attack must be contained,
score 0 with a reason, and leave its slot working for the next execution."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from rlpost.config import EnvConfig, SandboxConfig
from rlpost.envs.coding import Submission
from rlpost.envs.sandbox import SandboxPool, SandboxUnavailable, find_bwrap

needs_bwrap = pytest.mark.skipif(find_bwrap() is None or os.geteuid() != 0,
                                 reason="needs bubblewrap and root (CI installs bubblewrap and runs as root)")
SECRET = "rlpost-test-secret-5f1c"


@pytest.fixture(scope="module")
def pool():
    os.environ["RLPOST_TEST_SECRET"] = SECRET
    pool = SandboxPool(SandboxConfig(backend="bwrap", slots=1, wall_s=3.0, cpu_s=2, memory_mb=256, nproc=16,
                                     max_output_bytes=4096))
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def coding_env(pool):
    from rlpost.envs.coding import CodingEnv

    env = CodingEnv(EnvConfig(name="coding", num_eval=4), SandboxConfig(backend="bwrap", slots=1))
    env.pool = pool  # share the module's pool instead of starting another
    return env


def uid_processes(uid: int) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("Uid:") and int(line.split()[1]) == uid:
                        pids.append(int(pid))
        except OSError:
            continue
    return pids


def assert_slot_still_works(pool):
    res = pool.run_sync("print(6 * 7)")
    assert res.ok and res.stdout.strip() == "42", res
    assert uid_processes(pool.cfg.base_uid) == []


@needs_bwrap
def test_plain_execution_and_isolated_environment(pool):
    res = pool.run_sync("import os, sys\nprint(sorted(os.environ))\nprint(sys.stdin.read())", stdin="hello")
    assert res.ok, res
    assert res.stdout.splitlines() == ["['HOME', 'LANG', 'PATH', 'PWD', 'PYTHONDONTWRITEBYTECODE']", "hello"]
    assert SECRET not in res.stdout


ATTACKS = {
    "fork bomb": "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n",
    "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n",
    "infinite loop": "while True:\n    pass\n",
    "huge stdout": "while True:\n    print('x' * 10000)\n",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.kill(1, signal.SIGKILL)\n"
                       "os.kill(-1, signal.SIGKILL)\n",
}


@needs_bwrap
@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained_and_scored_zero(pool, coding_env, name):
    t0 = time.monotonic()
    result = coding_env.score_code([Submission(ATTACKS[name], ["assert f(2) == 4"], "f")])[0]
    assert result.reward == 0.0
    assert result.info.get("reason"), result.info  # a reason, not a silent zero
    assert time.monotonic() - t0 < pool.cfg.wall_s + 5
    assert_slot_still_works(pool)


@needs_bwrap
def test_reasons_name_the_limit(pool):
    assert pool.run_sync(ATTACKS["memory bomb"]).reason.startswith("memory limit")
    assert pool.run_sync(ATTACKS["infinite loop"]).reason.startswith(("cpu limit", "timeout"))
    flood = pool.run_sync(ATTACKS["huge stdout"])
    assert flood.reason.startswith("output limit") and flood.output_truncated
    assert len(flood.stdout) <= pool.cfg.max_output_bytes
    bomb = pool.run_sync(ATTACKS["fork bomb"])
    assert bomb.timed_out or bomb.reason
    assert_slot_still_works(pool)


@needs_bwrap
def test_busy_child_left_behind_is_killed(pool):
    code = "import os\nif os.fork() == 0:\n    os.setsid()\n    while True: pass\nprint('parent done')\n"
    res = pool.run_sync(code)
    assert res.stdout.strip() == "parent done"
    assert uid_processes(pool.cfg.base_uid) == []  # the orphan died with the run
    assert_slot_still_works(pool)


@needs_bwrap
def test_slot_launcher_is_reused_and_replaced_when_it_dies(pool):
    """One long-lived launcher per slot (an execution is a fork, not a Python start-up); if it
    dies, the execution it had is an error with a reason and the next one gets a new launcher."""
    assert_slot_still_works(pool)
    first = pool._slots[0].launcher.proc.pid
    assert_slot_still_works(pool)
    assert pool._slots[0].launcher.proc.pid == first
    os.kill(first, signal.SIGKILL)
    pool._slots[0].launcher.proc.wait()
    assert_slot_still_works(pool)
    assert pool._slots[0].launcher.proc.pid != first


@needs_bwrap
def test_unresponsive_launcher_is_killed_with_its_programs(pool):
    """A launcher that stops answering (here: SIGSTOP) is killed after the wall clock plus a
    grace period, every process of the slot's uid with it; the slot then works again."""
    assert_slot_still_works(pool)
    stuck = pool._slots[0].launcher.proc
    os.kill(stuck.pid, signal.SIGSTOP)
    res = pool.run_sync("print('never')", wall_s=0.5)
    assert res.timed_out and res.reason.startswith("timeout") and res.stdout == ""
    assert stuck.poll() is not None  # killed, not left stopped
    assert_slot_still_works(pool)


@needs_bwrap
def test_no_network_even_to_host_loopback(pool):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(2)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(_accept(server)), daemon=True).start()
    code = (f"import socket\ns = socket.socket()\ns.settimeout(1)\n"
            f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n"
            f"except OSError as e:\n    print('blocked', type(e).__name__)\n")
    res = pool.run_sync(code)
    assert "blocked" in res.stdout and "CONNECTED" not in res.stdout, res
    time.sleep(0.2)
    assert accepted in ([], [None])
    server.close()


def _accept(server):
    try:
        return server.accept()
    except OSError:
        return None


@needs_bwrap
def test_host_filesystem_is_invisible_or_read_only(pool, tmp_path):
    target = tmp_path / "pwned"
    code = f"""
import os
results = []
for path in ({str(target)!r}, '/tmp/pwned', '/usr/pwned', {os.getcwd() + '/pwned'!r}):
    try:
        open(path, 'w').write('x')
        results.append('wrote ' + path)
    except OSError as e:
        results.append('denied ' + type(e).__name__)
for path in ('/root', '/etc/shadow', '/home', {os.getcwd()!r}):
    try:
        print('READ', path, os.listdir(path) if os.path.isdir(path) else open(path).read()[:20])
    except OSError as e:
        print('hidden', path, type(e).__name__)
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            env = open(f'/proc/{{pid}}/environ', 'rb').read()
            print('environ', pid, {SECRET!r}.encode() in env)
        except OSError:
            pass
print(results)
"""
    res = pool.run_sync(code)
    assert "READ" not in res.stdout, res.stdout
    assert "True" not in res.stdout  # no process in the sandbox carries the host's secret
    assert not target.exists() and not os.path.exists("/usr/pwned") and not os.path.exists("pwned")
    assert SECRET not in res.stdout


def test_no_backend_refuses_unless_opted_in(monkeypatch):
    monkeypatch.setattr("rlpost.envs.sandbox.find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        SandboxPool(SandboxConfig(backend="auto"))
    with pytest.raises(SandboxUnavailable, match="refusing"):  # the coding env refuses at start-up
        from rlpost.envs.coding import CodingEnv

        CodingEnv(EnvConfig(name="coding", num_eval=2), SandboxConfig(backend="auto"))
    with pytest.raises(SandboxUnavailable, match="bwrap not found"):
        SandboxPool(SandboxConfig(backend="bwrap"))


def test_unsandboxed_opt_in_warns_every_start(capfd):
    pool = SandboxPool(SandboxConfig(backend="none", allow_unsandboxed=True, slots=2))
    try:
        assert "UNSANDBOXED" in capfd.readouterr().err
        assert pool.run_sync("print(1 + 1)").stdout.strip() == "2"
    finally:
        pool.close()
    SandboxPool(SandboxConfig(backend="none", allow_unsandboxed=True)).close()
    assert "UNSANDBOXED" in capfd.readouterr().err


@needs_bwrap
def test_abandoned_programs_are_killed_and_their_slot_works(pool):
    """Programs still running when the caller's budget runs out (a group's reward budget) are
    killed, not left running: no process of the slot's uid survives, and the slot serves the
    next program."""
    sleeper = "import time\nprint('started', flush=True)\ntime.sleep(30)\n"
    t0 = time.monotonic()
    results = pool.run_many([(sleeper, {}, ""), (sleeper, {}, "")], timeout_s=1.0)
    assert time.monotonic() - t0 < 2.0
    assert all(r.reason.startswith("abandoned") for r in results)
    deadline = time.monotonic() + 3
    while uid_processes(pool.cfg.base_uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_slot_still_works(pool)
