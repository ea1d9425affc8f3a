"""Per-slot launcher of the bubblewrap sandbox (trusted code; run as ``python3 -I -S``).

Why a separate process: it makes itself a *child subreaper*, so every process the untrusted code
leaves behind (double forks, daemons) is re-parented to it and reaped here; otherwise zombies
owned by the slot's uid pile up and exhaust RLIMIT_NPROC for the next execution in that slot.
Why a long-lived one (``--serve``): an execution then costs a fork, not a Python start-up (which
was about half of the ~65 ms an execution cost with a fresh launcher per run).

Protocol, over a SOCK_SEQPACKET socket (one message per read): a request is a JSON spec
``{uid, argv, rlimits, wall_s}`` with three to five file descriptors attached (the sandboxed
program's stdin, stdout and stderr, the seccomp filter bwrap reads from fd 3, and a secret the
program reads from fd 4); while it runs, a message ``{"stop": true}`` asks for an early stop (the
pool saw an output flood); the reply is one JSON status message. EOF on the socket ends the
launcher. Imports only the standard library, so nothing of rlpost (or its environment) reaches
the child.
"""

import ctypes
import fcntl
import json
import os
import resource
import select
import signal
import socket
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


def _reap_all(deadline_s=2.0):
    """Reap every child that is left (orphans re-parented to us); at most ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.002)


def _run_one(sock, spec, fds):
    """Run one sandboxed program with ``fds`` as its stdin/stdout/stderr; its status dict, or
    None when the pool went away mid-run (the launcher then exits)."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            sock.close()
            # stdin, stdout, stderr, then (optional) the seccomp filter on fd 3 for bwrap --seccomp 3
            # and a secret for the program on fd 4. Move every received descriptor above the
            # targets first, so no dup2 overwrites a source still to be moved.
            moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 16) for fd in fds]  # copies at >= 16
            for fd in fds:
                os.close(fd)
            for target, fd in enumerate(moved):
                os.dup2(fd, target)  # inheritable: bwrap and the program get them
            for fd in moved:
                os.close(fd)
            _child(spec)
        except BaseException as exc:  # noqa: BLE001 - report any set-up failure
            os.write(2, f"sandbox launcher: {type(exc).__name__}: {exc}\n".encode())
        os._exit(127)
    for fd in fds:  # the program holds them now; the pool sees EOF when it (and its children) end
        os.close(fd)
    deadline = start + spec["wall_s"]
    stopped = timed_out = pool_gone = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
        elif select.select([sock], [], [], 0.001)[0]:
            message = sock.recv(65536)
            pool_gone = not message
            stopped = True
        if stopped or timed_out:
            _kill_uid(spec["uid"])
            _, status = os.waitpid(pid, 0)
            break
    # Whatever the program left behind (busy children, daemons) dies with it.
    _kill_uid(spec["uid"])
    _reap_all()
    if pool_gone:
        return None
    result = {"timed_out": timed_out, "stopped": stopped, "duration_s": time.monotonic() - start}
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code > 128:  # bwrap's init exits with 128 + the signal that killed the program
            result["signal"] = code - 128
        result["returncode"] = code
    elif os.WIFSIGNALED(status):
        result["signal"] = os.WTERMSIG(status)
    return result


def serve(sock_fd):
    sock = socket.socket(fileno=sock_fd)
    os.set_inheritable(sock_fd, False)  # never reaches the sandboxed program
    setup_error = None
    if _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        setup_error = "prctl(PR_SET_CHILD_SUBREAPER) failed"
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 65536, 5)
        except ConnectionResetError:
            return 0
        if not message:
            return 0
        request = json.loads(message)
        if "stop" in request:  # a stop that crossed the reply of a run that had ended
            continue
        if setup_error or len(fds) not in (3, 4, 5):
            for fd in fds:
                os.close(fd)
            sock.send(json.dumps({"error": setup_error or f"expected 3 to 5 descriptors, got {len(fds)}"}).encode())
            continue
        result = _run_one(sock, request, fds)
        if result is None:
            return 0
        sock.send(json.dumps(result).encode())


def main():
    if sys.argv[1] == "--kill-uid":  # clean-up fallback used by the pool
        _kill_uid(int(sys.argv[2]))
        return 0
    if sys.argv[1] == "--serve":
        return serve(int(sys.argv[2]))
    print(f"usage: {sys.argv[0]} --serve FD | --kill-uid UID", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
