"""The trusted judge that scores a candidate program inside the sandbox (standard library only:
this file is shipped as the sandbox's ``main.py``; nothing here imports rlpost).

Why two processes. A harness that ``exec``s model-written code in its own interpreter shares
everything with it: builtins (``builtins.exec = noop``), ``__main__`` (the tests, the pass counter,
the nonce), ``json.dumps``, the verdict printer, ``atexit``. Observed on the old harness: 12 cheats
scored 1.0. So the judge forks *before it reads anything secret*; the child closes the secret
descriptor, drops stdin and stdout, loads the candidate and serves calls of its functions over a
pipe; the judge alone reads the nonce and the tests from the secret descriptor, runs the (trusted) tests in its own interpreter with a proxy
in place of the candidate's function, and alone writes the verdict to stdout. Values cross the
pipe as tagged JSON decoded into fresh builtin objects only (``type(x) is int``, lists, tuples,
dicts, ...), so an object whose ``__eq__`` always returns True never reaches a comparison.

The judge makes itself non-dumpable first (``prctl(PR_SET_DUMPABLE, 0)``), so a same-uid
candidate can neither ptrace it nor open its ``/proc/<pid>/fd`` (the verdict channel, the secret
descriptor) or ``/proc/<pid>/mem``. If it cannot, it refuses to judge (no verdict: reward
0). A candidate that kills, stops or floods the judge only loses its own reward.

Protocol on the secret descriptor (``--secret-fd N`` in argv; the sandbox passes it apart from
stdin, read-only), two lines: the nonce; a JSON object ``{"entry", "context", "tests",
"deadline_s"}``. ``context`` is trusted code run in the judge's namespace first (a HumanEval
prompt: imports and helpers the tests use, e.g. ``poly``). Output: one line
``<nonce> {"passed", "total", "error"}`` on stdout.
"""

import builtins
import json
import math
import os
import select
import signal
import sys
import time

REPLY_LIMIT = 1 << 20  # bytes of one reply from the candidate


def encode(x):
    """Plain data only, by exact type (a subclass of int or list is refused, not converted)."""
    t = type(x)
    if x is None or t is bool or t is int or t is str:
        return x
    if t is float:
        return x if math.isfinite(x) else {"f": repr(x)}
    if t is list:
        return [encode(v) for v in x]
    if t is tuple:
        return {"t": [encode(v) for v in x]}
    if t is dict:
        return {"d": [[encode(k), encode(v)] for k, v in x.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "z": [encode(v) for v in x]}
    if t is bytes:
        return {"b": x.hex()}
    raise TypeError("a value of type %s cannot cross to the judge" % t.__name__)


def decode(x):
    """Builtin objects from :func:`encode`'s output; anything else is a ValueError."""
    t = type(x)
    if x is None or t is bool or t is int or t is str or t is float:
        return x
    if t is list:
        return [decode(v) for v in x]
    if t is dict and len(x) == 1:
        (tag, body), = x.items()
        if tag == "f" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if type(body) is list:
            if tag == "t":
                return tuple(decode(v) for v in body)
            if tag == "s":
                return {decode(v) for v in body}
            if tag == "z":
                return frozenset(decode(v) for v in body)
            if tag == "d" and all(type(p) is list and len(p) == 2 for p in body):
                return {decode(k): decode(v) for k, v in body}
    raise ValueError("malformed value from the candidate")


def _no_constants(name):
    raise ValueError("non-standard JSON constant %s" % name)


def serve(requests, replies):
    """The candidate's side (forked before any secret was read): load candidate.py, then call
    its functions on request. Everything here is reachable by the candidate and trusted by no one."""
    sys.stdout = sys.stderr
    namespace = {"__name__": "__main__"}
    for line in requests:
        try:
            msg = json.loads(line)
            if msg["op"] == "load":
                with open("candidate.py") as fh:
                    exec(compile(fh.read(), "candidate.py", "exec"), namespace)
                result = None
            else:
                fn = namespace[msg["fn"]]
                result = fn(*decode(msg["args"]), **decode(msg["kwargs"]))
            reply = {"ok": encode(result)}
        except BaseException as exc:  # noqa: BLE001 - reported to the judge as a failure
            try:
                reply = {"error": type(exc).__name__, "message": str(exc)[:200]}
            except BaseException:  # noqa: BLE001 - a hostile exception
                reply = {"error": "Exception", "message": "unprintable exception"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class Candidate:
    """The judge's handle on the candidate process: calls with a deadline, replies decoded."""

    def __init__(self, pid, requests, replies, deadline):
        self.pid, self.requests, self.replies, self.deadline = pid, requests, replies, deadline
        self.pending = b""
        self.dead = ""

    def ask(self, msg):
        if self.dead:
            raise RuntimeError(self.dead)
        try:
            os.write(self.requests, (json.dumps(msg) + "\n").encode())
        except OSError:
            self.stop("the candidate process is gone")
            raise RuntimeError(self.dead)
        while b"\n" not in self.pending:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                self.stop("timeout: the candidate did not answer in time")
                raise TimeoutError(self.dead)
            chunk = os.read(self.replies, 65536)
            if not chunk:
                self.stop("the candidate process is gone")
                raise RuntimeError(self.dead)
            self.pending += chunk
            if len(self.pending) > REPLY_LIMIT:
                self.stop("the candidate's reply is too long")
                raise RuntimeError(self.dead)
        line, self.pending = self.pending.split(b"\n", 1)
        reply = json.loads(line, parse_constant=_no_constants)
        if type(reply) is not dict:
            raise ValueError("malformed reply from the candidate")
        if "error" in reply:
            name, message = str(reply.get("error")), str(reply.get("message", ""))[:200]
            cls = getattr(builtins, name, None)
            if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
                raise cls(message)
            raise RuntimeError("%s: %s" % (name, message))
        return decode(reply.get("ok"))

    def proxy(self, name):
        def call(*args, **kwargs):
            return self.ask({"op": "call", "fn": name, "args": encode(list(args)), "kwargs": encode(kwargs)})
        call.__name__ = name
        return call

    def stop(self, why):
        self.dead = self.dead or why
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass


def main():
    import ctypes

    if ctypes.CDLL(None).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE = 4
        sys.stderr.write("judge: cannot make itself non-dumpable; refusing to judge\n")
        os._exit(3)
    secret_fd = int(sys.argv[sys.argv.index("--secret-fd") + 1]) if "--secret-fd" in sys.argv else 0
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the candidate: no secret descriptor, no stdin, stdout is stderr
        if secret_fd:
            os.close(secret_fd)
        os.close(req_w)
        os.close(rep_r)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(2, 1)
        os.close(null)
        try:
            serve(os.fdopen(req_r, "r"), os.fdopen(rep_w, "w"))
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(rep_w)
    with os.fdopen(secret_fd, "r") as secret:
        nonce = secret.readline().strip()
        spec = json.loads(secret.readline())
    if secret_fd:
        os.close(0)
    tests, entry = spec["tests"], spec["entry"]
    candidate = Candidate(pid, req_w, rep_r, time.monotonic() + float(spec["deadline_s"]))
    passed, first_error = 0, ""
    context = {"__name__": "__judge__"}
    try:
        exec(compile(spec.get("context", ""), "context.py", "exec"), context)
        candidate.ask({"op": "load"})
        loaded = True
    except BaseException as exc:  # noqa: BLE001
        loaded = False
        first_error = "code failed to load: %s: %s" % (type(exc).__name__, str(exc)[:200])
    if loaded:
        for test in tests:
            namespace = dict(context)
            namespace[entry] = candidate.proxy(entry)
            try:
                exec(compile(test, "test.py", "exec"), namespace)
                passed += 1
            except BaseException as exc:  # noqa: BLE001
                first_error = first_error or "test failed: %s: %s" % (type(exc).__name__, str(exc)[:200])
    candidate.stop("done")
    sys.stdout.write("\n%s %s\n" % (nonce, json.dumps({"passed": passed, "total": len(tests), "error": first_error})))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
