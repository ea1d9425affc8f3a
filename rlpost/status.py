"""What a run's Redis buffer holds: ``python -m rlpost.status RUN_DIR [--json]``.

Why: when a run stalls or ends short, the first questions are where its prompts are (waiting,
read by whom and for how long, parked, complete but untrained, dead-lettered and why) and whether
its workers still beat. This answers them from the buffer itself. A live run is read through the
URL in its ``placement.json``; a run whose private redis-server is gone is read post mortem from
its append-only file (``RUN_DIR/redis/appendonlydir``), loaded into a throwaway server on a copy.
Nothing is written to the run's keys; records are decoded as the run decodes them (never unpickled).

``--url URL --run RUN_ID`` reads any buffer (e.g. a shared server) without a run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import redis

from rlpost.buffer import GROUP_STREAMS, BufferDataError, RedisBuffer, connect


class StatusError(RuntimeError):
    """The run directory or buffer cannot be read; the message says what is missing."""


def report(buffer: RedisBuffer, dead_shown: int = 5) -> dict:
    """Streams (entries, unread, pending by consumer with its idle time), dead letters by stream
    with the latest reasons, trained/filtered counts, weight version, APRIL round, heartbeats."""
    c = buffer.client
    out: dict = {"run": buffer.run, "streams": {}}
    depth = buffer.depth()
    for name, group in GROUP_STREAMS:
        entries, pending = depth[name], depth[f"{name}_pending"]
        # every ack deletes its entry, so the rest of the stream is unread (Redis's own "lag"
        # cannot be determined once entries were deleted)
        info = {"entries": entries, "unread": max(entries - pending, 0), "pending": pending, "consumers": {}}
        if pending:
            for consumer in c.xinfo_consumers(buffer.key(name), group):
                if consumer["pending"]:
                    info["consumers"][consumer["name"].decode()] = {
                        "pending": int(consumer["pending"]), "idle_s": round(consumer["idle"] / 1000, 1)}
        out["streams"][name] = info
    dead = c.xrange(buffer.key("dead"))
    out["dead"] = {"entries": len(dead), "by_stream": dict(Counter(_text(f.get(b"stream")).rsplit(":", 1)[-1]
                                                                   for _, f in dead)),
                   "latest": [{"stream": _text(f.get(b"stream")), "reason": _text(f.get(b"reason"))}
                              for _, f in dead[-dead_shown:]]}
    out["trained_samples"] = int(c.scard(buffer.key("trained")))
    out["errors"] = []  # control keys holding something the run did not write: named, not fatal
    out["filtered_groups"] = _checked(buffer.filtered_groups, out["errors"])
    version = _checked(buffer.current_version, out["errors"])
    out["weight_version"] = None if version is None else version.version
    out["round"] = _checked(buffer.current_round, out["errors"])
    beats = _checked(buffer.workers, out["errors"]) or {}
    now = time.time()
    out["workers"] = {name: {"beat_age_s": round(now - beat["t"], 1), "version": beat.get("version"),
                             "tasks": beat.get("tasks"), "samples": beat.get("samples"),
                             "restarts": beat.get("restarts")}
                      for name, beat in sorted(beats.items())}
    return out


def _checked(read, errors: list[str]):
    try:
        return read()
    except BufferDataError as exc:
        errors.append(str(exc))
        return None


def _text(raw) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw or "")


def format_report(r: dict) -> str:
    lines = [f"run {r['run']}: {r['trained_samples']} samples trained, {r['filtered_groups']} groups "
             f"dropped by the filter, weights v{r['weight_version']}, round {r['round']}"]
    for name, s in r["streams"].items():
        who = ", ".join(f"{k} {v['pending']} (idle {v['idle_s']} s)" for k, v in s["consumers"].items())
        lines.append(f"  {name:<9} {s['entries']:>6} entries, {s['unread']:>6} unread, {s['pending']:>6} read "
                     f"and not acked{': ' + who if who else ''}")
    d = r["dead"]
    lines.append(f"  dead      {d['entries']:>6} entries" + (f" (from {d['by_stream']})" if d["entries"] else ""))
    lines += [f"    from {x['stream']}: {x['reason']}" for x in d["latest"]]
    for name, w in r["workers"].items():
        lines.append(f"  {name}: last beat {w['beat_age_s']} s ago, weights v{w['version']}, {w['tasks']} tasks, "
                     f"{w['samples']} samples, {w['restarts']} restarts")
    lines += [f"  error: {e}" for e in r["errors"]]
    return "\n".join(lines)


def _run_id(run_dir: str) -> str:
    path = os.path.join(run_dir, "run_id")
    if not os.path.exists(path):
        raise StatusError(f"{run_dir}: no run_id file (not an rlpost run directory, or it never started)")
    run = open(path).read().strip()
    if not run or ":" in run or "{" in run:
        raise StatusError(f"{path} holds {run[:60]!r}: not a run id")
    return run


def _live_buffer(run_dir: str, run: str) -> RedisBuffer | None:
    """The run's buffer through the URL it recorded, if that server still answers."""
    try:
        with open(os.path.join(run_dir, "placement.json")) as fh:
            url = json.load(fh).get("buffer")
    except (OSError, ValueError):
        return None
    if not url:
        return None
    password = os.environ.get("RLPOST_REDIS_PASSWORD") or _private_password(run_dir)
    # not buffer.connect: its ~30 s of reconnection retries would delay "the server is gone"
    try:
        buffer = RedisBuffer(redis.Redis.from_url(str(url), password=password, socket_connect_timeout=2), run)
    except ValueError as exc:
        raise StatusError(f"{run_dir}/placement.json: buffer={url!r}: {exc}") from None
    try:
        buffer.client.ping()
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
        return None
    return buffer


def _private_password(run_dir: str) -> str | None:
    """A private TCP server's password, from the 0600 file the driver wrote for redis-server."""
    try:
        for line in open(os.path.join(run_dir, "redis", "redis-auth.conf")):
            if line.startswith("requirepass "):
                return line.split(" ", 1)[1].strip()
    except OSError:
        pass
    return None


def _post_mortem(run_dir: str):
    """A throwaway redis-server on a copy of the run's append-only file."""
    from rlpost.redis_server import start_private_redis

    folder = os.path.join(run_dir, "redis")
    aof_dir, aof_file = os.path.join(folder, "appendonlydir"), os.path.join(folder, "appendonly.aof")  # Redis 7, 6
    if not (os.path.isdir(aof_dir) or os.path.isfile(aof_file)):
        raise StatusError(f"{run_dir}: its redis-server is not running and there is no append-only file in {folder} "
                          "(buffer.appendonly=false, a shared buffer.url, or a private server in a temp dir)")
    workdir = tempfile.mkdtemp(prefix="rlpost-status-")
    if os.path.isdir(aof_dir):
        shutil.copytree(aof_dir, os.path.join(workdir, "appendonlydir"))
    else:
        shutil.copy(aof_file, workdir)
    return start_private_redis(workdir, appendonly=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlpost.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="the run directory (live, or post mortem from its AOF)")
    parser.add_argument("--url", help="a buffer URL to read instead (with --run)")
    parser.add_argument("--run", help="the run id under --url (the run directory's run_id)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    server = None
    try:
        if args.url:
            if not args.run:
                raise StatusError("--url needs --run (the run id: the run directory's run_id file)")
            buffer = RedisBuffer(connect(args.url, password=os.environ.get("RLPOST_REDIS_PASSWORD")), args.run)
            source = args.url
        elif args.run_dir:
            run = _run_id(args.run_dir)
            buffer = _live_buffer(args.run_dir, run)
            source = "live"
            if buffer is None:
                server = _post_mortem(args.run_dir)
                buffer = RedisBuffer(server.client(), run)
                source = "post mortem, from the append-only file"
        else:
            raise StatusError("give a run directory, or --url and --run")
        r = {**report(buffer), "source": source}
    except StatusError as exc:
        print(f"rlpost.status: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.workdir, ignore_errors=True)
    print(json.dumps(r, indent=1) if args.json else f"({r['source']})\n{format_report(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
