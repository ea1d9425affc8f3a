"""A unix-socket proxy in front of a real redis-server that loses replies on demand.

Why: a Redis that dies after it ran (and, with appendfsync=always, persisted) a command but before
its reply reached the client looks to the client like a dropped connection; redis-py's retry then
sends the command again. The proxy makes that happen on demand: the command reaches the server and
runs, its reply is swallowed and the client's connection closed. Whatever rlpost writes must come
out of that the same as if the reply had arrived.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading


class LostReplyProxy:
    def __init__(self, upstream_socket: str):
        self.upstream = upstream_socket
        self.path = os.path.join(tempfile.mkdtemp(prefix="rlpost-proxy-"), "proxy.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(16)
        self._armed: tuple[bytes, ...] = ()
        self._rules: list[list] = []  # [every n-th, commands, requests matched so far]
        self.dropped = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def lose_reply_to(self, *commands: bytes) -> None:
        """The next request carrying one of ``commands`` (b"EXEC", b"EVALSHA", ...) that runs on
        the server loses its reply, and its connection. (A NOSCRIPT error did not run anything:
        it is passed on and the next such request is the one.)"""
        with self._lock:
            self._armed = commands

    def lose_every(self, n: int, *commands: bytes) -> None:
        """From now on every ``n``-th request carrying one of ``commands`` loses its reply (one
        rule per call; a request counts for the first rule it matches)."""
        with self._lock:
            self._rules.append([n, commands, 0])

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.connect(self.upstream)
            # lose: drop the reply to the request just forwarded; rearm: the one-shot commands
            # to arm again if that request turns out not to have run (NOSCRIPT)
            state = {"lose": False, "rearm": ()}
            threading.Thread(target=self._to_server, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client, state), daemon=True).start()

    def _to_server(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        try:
            while chunk := client.recv(1 << 16):
                with self._lock:
                    if any(c in chunk for c in self._armed):
                        state.update(lose=True, rearm=self._armed)
                        self._armed = ()
                    else:
                        rule = next((r for r in self._rules if any(c in chunk for c in r[1])), None)
                        if rule is not None:
                            rule[2] += 1
                            if rule[2] % rule[0] == 0:
                                state.update(lose=True, rearm=())
                server.sendall(chunk)
        except OSError:
            pass
        _close(client, server)

    def _to_client(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while chunk := server.recv(1 << 16):
                if state["lose"]:
                    if chunk.startswith(b"-NOSCRIPT"):  # nothing ran: wait for the real request
                        with self._lock:
                            self._armed = state["rearm"] or self._armed
                            state["lose"] = False
                    else:  # the server ran the request: its reply never arrives
                        self.dropped += 1
                        break
                client.sendall(chunk)
        except OSError:
            pass
        _close(client, server)

    def close(self) -> None:
        self._listener.close()
        shutil.rmtree(os.path.dirname(self.path), ignore_errors=True)  # its socket's private dir


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
