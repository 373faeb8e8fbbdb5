"""The soak's slow and idle HTTP connections: a few connections whose request head is never finished, and
a few that send a body a byte every TICK_S, held open against the HTTP port for the whole soak while the
clients' calls must keep being answered.

The server closes a head that is not in within its IDLE_S, and a body past its deadline (BODY_BASE_S plus
its size at BODY_MIN_RATE, answered 408): centra/serve/http.py. What the server closes (or answers) is
counted and opened again; a soak shorter than those deadlines may see none closed.
"""

from __future__ import annotations

import select
import socket
import threading

TICK_S = 1.0
BODY_BYTES = 4096  # the slow body's Content-Length: far more than a soak's seconds at a byte a second


class SlowConnections:
    """`heads` connections with a half-sent request head, `bodies` sending a body slowly (thread: `run`)."""

    def __init__(self, http_target: str, token: str, heads: int = 4, bodies: int = 4):
        host, _, port = http_target.rpartition(":")
        self.address = (host.strip("[]"), int(port))
        self.token = token
        self.kinds = ["head"] * heads + ["body"] * bodies
        self.counts = {kind: {"opened": 0, "closed_by_server": 0, "open_failed": 0} for kind in ("head", "body")}
        self.answers: dict[str, int] = {}  # what the server answered a slow body before closing: status -> count
        self.lock = threading.Lock()

    def head(self, kind: str) -> bytes:
        if kind == "head":  # no blank line: the head never ends
            return b"POST /v1/classify HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
        return (f"POST /v1/classify HTTP/1.1\r\nHost: soak\r\nAuthorization: Bearer {self.token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {BODY_BYTES}\r\n\r\n").encode("ascii")

    def open(self, kind: str) -> socket.socket | None:
        try:
            sock = socket.create_connection(self.address, timeout=5)
            sock.sendall(self.head(kind))
        except OSError:
            with self.lock:
                self.counts[kind]["open_failed"] += 1
            return None
        sock.setblocking(False)
        with self.lock:
            self.counts[kind]["opened"] += 1
        return sock

    def closed(self, kind: str, sock: socket.socket) -> bool:
        """Whether the server answered or closed it (what it answered is counted)."""
        try:
            readable = select.select([sock], [], [], 0)[0]
            data = sock.recv(4096) if readable else None
        except OSError:
            data = b""
        if data is None:
            return False
        if data.startswith(b"HTTP/1."):
            status = data.split(b" ", 2)[1].decode("ascii", "replace")
            with self.lock:
                self.answers[status] = self.answers.get(status, 0) + 1
        return True

    def run(self, stop: threading.Event) -> None:
        socks: list[socket.socket | None] = [self.open(kind) for kind in self.kinds]
        sent = [0] * len(socks)
        try:
            while not stop.wait(TICK_S):
                for i, kind in enumerate(self.kinds):
                    sock = socks[i]
                    gone = sock is None
                    if sock is not None and self.closed(kind, sock):
                        with self.lock:
                            self.counts[kind]["closed_by_server"] += 1
                        gone = True
                    elif sock is not None and kind == "body" and sent[i] < BODY_BYTES - 1:
                        try:
                            sent[i] += sock.send(b" ")  # JSON's whitespace: the body stays valid, and never ends
                        except BlockingIOError:
                            pass
                        except OSError:
                            with self.lock:
                                self.counts[kind]["closed_by_server"] += 1
                            gone = True
                    if gone:
                        if sock is not None:
                            sock.close()
                        socks[i], sent[i] = self.open(kind), 0
        finally:
            for sock in socks:
                if sock is not None:
                    sock.close()

    def figures(self) -> dict:
        with self.lock:
            return {"heads": dict(self.counts["head"]), "bodies": dict(self.counts["body"]),
                    "answered": dict(sorted(self.answers.items()))}
