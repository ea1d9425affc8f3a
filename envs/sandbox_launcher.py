"""Per-execution launcher of the bubblewrap sandbox (trusted code; run as ``python3 -I -S``).

Why a separate process: it makes itself a *child subreaper*, so every process the untrusted code
leaves behind (double forks, daemons) is re-parented to it and reaped here; otherwise zombies
owned by the slot's uid pile up and exhaust RLIMIT_NPROC for the next execution in that slot.

Protocol: argv[1] is a JSON spec ``{uid, argv, rlimits, wall_s}``; stdin/stdout/stderr are passed
through to the sandboxed program; one JSON status line is written to fd ``status_fd`` at the end.
Imports only the standard library, so nothing of rlpost (or its environment) reaches the child.
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _child(spec):
    """In the forked child: drop to the slot uid, apply limits, exec bwrap."""
    os.setsid()
    for name, (soft, hard) in spec["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    os.setgroups([])
    os.setgid(spec["uid"])
    os.setuid(spec["uid"])
    # After setuid: a credential change clears the parent-death signal.
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # launcher dies -> sandbox dies
    if os.getppid() == 1:
        os._exit(126)
    os.execv(spec["argv"][0], spec["argv"])


def _kill_uid(uid):
    """SIGKILL every process owned by ``uid`` (kill(-1) from a process running as that uid)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # kills this helper too
        finally:
            os._exit(0)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _reap_all():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


_stop_requested = []


def main():
    if sys.argv[1] == "--kill-uid":  # clean-up fallback used by the pool
        _kill_uid(int(sys.argv[2]))
        return 0
    spec = json.loads(sys.argv[1])
    # The pool asks for an early stop (output flood) with SIGTERM: clean up, then report.
    signal.signal(signal.SIGTERM, lambda *_: _stop_requested.append(True))
    status_fd = spec["status_fd"]
    libc = _libc()
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.write(status_fd, json.dumps({"error": "prctl(PR_SET_CHILD_SUBREAPER) failed"}).encode())
        return 2
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(status_fd)
            _child(spec)
        except BaseException as exc:  # noqa: BLE001 - report any set-up failure
            os.write(2, f"sandbox launcher: {type(exc).__name__}: {exc}\n".encode())
        os._exit(127)
    deadline = start + spec["wall_s"]
    status = None
    timed_out = False
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        if _stop_requested or time.monotonic() > deadline:
            timed_out = not _stop_requested
            _kill_uid(spec["uid"])
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.002)
    # Whatever the program left behind (busy children, daemons) dies with it.
    _kill_uid(spec["uid"])
    deadline_reap = time.monotonic() + 2
    while time.monotonic() < deadline_reap:
        _reap_all()
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        time.sleep(0.005)
    result = {"timed_out": timed_out, "stopped": bool(_stop_requested), "duration_s": time.monotonic() - start}
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code > 128:  # bwrap's init exits with 128 + the signal that killed the program
            result["signal"] = code - 128
        result["returncode"] = code
    elif os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
    os.write(status_fd, json.dumps(result).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
