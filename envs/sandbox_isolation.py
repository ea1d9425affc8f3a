"""What the sandbox adds to bubblewrap's namespaces: a seccomp filter, and slot uids that no
other process on the host uses.

Why a seccomp filter. Inside bubblewrap alone, a program could still create a user namespace
(and hold every capability inside it), attach ptrace to its neighbours, use keyrings, BPF,
perf events and any socket family of its (empty) network namespace: kernel attack surface that
a reward-hacking policy has no business reaching. The filter is compiled here with libseccomp
(``pyseccomp``), on the trusted side, and handed to bwrap as a file descriptor (``--seccomp``).

Why host-wide uid leases. ``RLIMIT_NPROC`` and the clean-up ``kill(-1)`` are per uid, so a slot's
uid must belong to that slot alone on the whole host: two pools (two rollout workers on one
machine) that both counted from ``sandbox.base_uid`` killed each other's programs, and a run
killed an unrelated process that happened to have the same uid. A lease is an exclusive
``flock`` on ``<lock dir>/uid-<n>.lock`` held for the pool's lifetime (released by the kernel if
the process dies), taken only for a uid with no account and no running process.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import socket

# Denied with EPERM: namespaces and mounts, tracing other processes, keyrings, BPF, perf, module
# and kexec loading, userfaultfd, io_uring (its operations bypass seccomp).
DENIED_SYSCALLS = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "ptrace", "process_vm_readv", "process_vm_writev",
    "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "acct", "swapon", "swapoff", "reboot", "syslog",
)
CLONE_NAMESPACE_FLAGS = (0x10000000, 0x00020000, 0x40000000, 0x08000000, 0x04000000, 0x20000000,
                         0x02000000, 0x00000080)  # USER, NS, NET, IPC, UTS, PID, CGROUP, TIME
LOCK_DIR = "/tmp/rlpost-sandbox-uids"


class IsolationUnavailable(RuntimeError):
    pass


def seccomp_program() -> bytes:
    """The compiled BPF filter (for this machine's architecture): everything allowed except
    :data:`DENIED_SYSCALLS`, ``clone`` with a namespace flag, ``clone3`` (its flags live in
    memory a filter cannot read; ENOSYS makes libc fall back to ``clone``) and sockets of any
    family but AF_UNIX."""
    try:
        import pyseccomp as seccomp
    except (ImportError, OSError) as exc:  # the package, or libseccomp.so.2, is missing
        raise IsolationUnavailable(f"seccomp is unavailable ({exc}); install libseccomp2 and pyseccomp") from exc
    import tempfile

    filt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            filt.add_rule(seccomp.ERRNO(errno.EPERM), name)
        except (RuntimeError, ValueError, OSError):  # a syscall this kernel/arch does not have
            continue
    for flag in CLONE_NAMESPACE_FLAGS:
        filt.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    filt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    filt.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
    filt.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socketpair", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
    with tempfile.TemporaryFile() as fh:
        filt.export_bpf(fh)
        fh.seek(0)
        return fh.read()


def sealed_memfd(name: str, data: bytes) -> int:
    """A read-only descriptor of an anonymous, sealed in-memory file holding ``data``: a sandboxed
    program can read it, not write it, and its ``/proc/self/fd`` link names no host path."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        _write_all(fd, data)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                    | fcntl.F_SEAL_WRITE)
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def uid_in_use(uid: int) -> str:
    """Why ``uid`` cannot be a slot uid ('' when it can): an account, or a running process."""
    try:
        return f"it is the account {pwd.getpwuid(uid).pw_name!r}"
    except KeyError:
        pass
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("Uid:"):
                        if uid in (int(x) for x in line.split()[1:]):
                            return f"process {pid} runs as it"
                        break
        except OSError:
            continue
    return ""


class UidLease:
    """Exclusive, host-wide use of one uid while this object (and its process) lives."""

    def __init__(self, uid: int, fd: int):
        self.uid, self._fd = uid, fd

    @classmethod
    def take(cls, first: int, span: int = 10000) -> "UidLease":
        """The first uid from ``first`` on that no pool on this host holds (this pool's other
        slots included: a second flock on the same file fails even in the same process), with no
        account and no process; raises IsolationUnavailable if ``span`` uids are all in use."""
        os.makedirs(LOCK_DIR, mode=0o700, exist_ok=True)
        for uid in range(first, first + span):
            fd = os.open(os.path.join(LOCK_DIR, f"uid-{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if uid_in_use(uid):
                os.close(fd)
                continue
            return cls(uid, fd)
        raise IsolationUnavailable(f"no free sandbox uid in [{first}, {first + span}) (sandbox.base_uid)")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
