"""The server: one batcher and one classify path (serve/call.py) behind every door (serve/doors/), on a
gRPC port (the doors' services, health, reflection) and, when asked, an HTTP port (serve/http.py), with
one guard (token and metrics, serve/guard.py) on both, and a graceful shutdown (health NOT_SERVING,
`stop(grace)`, drain the batcher).

One mapping (`status_of` in status.py, shared by every door) turns centra's errors into status codes;
anything else is INTERNAL, logged with its traceback and answered with one line that carries none.

Extension points: `CentraServer(guard=...)` (token, metrics), `credentials=` a `grpc.ServerCredentials`
and `ssl_context=` an `ssl.SSLContext` (TLS on the two ports), `doors=` (default: every door of
serve/doors); `swap_engine(engine)` replaces the served engine in one assignment (reload); per-batch
figures reach `server.batcher.listeners` (callables taking a BatchRecord) and `server.batcher.stats`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

from centra.errors import CentraError, FieldError, Name
from centra.runtime.engine import Engine
from centra.serve.batcher import Batcher
from centra.serve.call import Classifier, Limits
from centra.serve.guard import Guard
from centra.serve.status import host_port

HEALTH_OPEN = ("/grpc.health.v1.Health/",)  # gRPC health stays open without a token
RECEIVE_FACTOR = 4  # gRPC's receive limit, in largest valid calls
MAX_RECEIVE = 2**31 - 1  # gRPC's limits are C ints
ORIGIN_RE = re.compile(r"\Ahttps?://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?\Z")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (CentraServer.start returns the one bound)
    max_batch: int = 32  # rows per engine run (a single larger call still runs whole)
    max_wait_ms: float = 0.0  # how long past the end of a batch the calls queued behind it may wait for more
    max_queue: int = 1024  # queued rows beyond which calls are refused (RESOURCE_EXHAUSTED)
    max_inputs_per_call: int = 256
    max_call_bytes: int = 1 << 20  # UTF-8 bytes of texts, pairs, ids and task names in one call
    max_concurrent_rpcs: int = 128  # calls in progress at once; more are refused by gRPC (RESOURCE_EXHAUSTED)
    grace_s: float = 5.0  # on shutdown, in-flight calls get this long to finish
    drain_s: float = 1.0  # on shutdown, health says NOT_SERVING this long before the port closes
    http_port: int | None = None  # REST and OIP over HTTP on host:http_port (0: any free port); None: no HTTP
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the HTTP port (CORS); none: CORS off

    def check(self) -> None:
        """One-line refusals of bad options, before anything is loaded."""
        if not self.host:
            raise FieldError(Name("host"), " must not be empty")
        if not 0 <= self.port <= 65535:
            raise FieldError(Name("port"), f" must be in 0..65535, not {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise FieldError(Name("http_port"), f" must be in 0..65535, not {self.http_port}")
        for name in ("max_batch", "max_queue", "max_inputs_per_call", "max_call_bytes", "max_concurrent_rpcs"):
            if getattr(self, name) < 1:
                raise FieldError(Name(name), f" must be >= 1, not {getattr(self, name)}")
        for name in ("max_wait_ms", "grace_s", "drain_s"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise FieldError(Name(name), f" must be >= 0, not {getattr(self, name)}")
        if self.cors_origins and self.http_port is None:
            raise FieldError(Name("cors_origins"), " needs the HTTP port, which is off")
        for origin in self.cors_origins:
            check_origin(origin)
        if self.receive_bytes > MAX_RECEIVE:
            raise FieldError(Name("max_call_bytes"), f" {self.max_call_bytes:,} with ", Name("max_inputs_per_call"),
                             f" {self.max_inputs_per_call:,} asks gRPC to receive more than {MAX_RECEIVE:,} bytes")
        if self.max_queue < self.max_inputs_per_call:
            raise FieldError(Name("max_queue"), f" ({self.max_queue}) must be >= ", Name("max_inputs_per_call"),
                             f" ({self.max_inputs_per_call}), or the largest allowed call could never be queued")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_inputs_per_call, self.max_call_bytes)

    @property
    def receive_bytes(self) -> int:
        """gRPC's receive limit: RECEIVE_FACTOR x the largest valid call, so a call up to that size is
        refused INVALID_ARGUMENT on its length alone, unparsed, with our limit named; a larger one gets
        gRPC's own RESOURCE_EXHAUSTED ("Received message larger than max") before any of it is handed over."""
        return RECEIVE_FACTOR * self.limits.wire_bytes


def check_origin(origin: str) -> None:
    """A CORS origin as browsers send it: scheme://host[:port], no path, no wildcard."""
    if not ORIGIN_RE.match(origin):
        raise FieldError(Name("cors_origins"), f" must be origins as browsers send them, scheme://host[:port] "
                         f"(e.g. https://app.example.com), with no path and no wildcard, not {origin[:80]!r}")


class CentraServer:
    """One batcher behind every door, on a gRPC port and optionally an HTTP port. Start and stop it in one
    loop."""

    def __init__(self, engine: Engine, options: ServeOptions | None = None, *, guard: Guard | None = None,
                 credentials=None, ssl_context=None, doors: Sequence | None = None, shadow=None):
        from centra.serve.doors import doors as every_door

        self.options = options or ServeOptions()
        self.options.check()
        self.batcher = Batcher(engine, self.options.max_batch, self.options.max_wait_ms, self.options.max_queue)
        self.classifier = Classifier(self.batcher, self.options.limits, shadow)  # shadow: serve/shadow.Shadow
        self.doors = tuple(doors) if doors is not None else every_door()
        self.guard = guard or Guard()
        opened = (*HEALTH_OPEN, *(p for door in self.doors for p in door.open_prefixes))
        self.guard.open_prefixes = tuple(dict.fromkeys((*self.guard.open_prefixes, *opened)))
        self.credentials = credentials
        self.port: int | None = None
        self.health = None  # grpc_health's aio HealthServicer, once started
        self._server = None
        self.http = None  # the HTTP port (serve/http.py), started and stopped with the gRPC port
        if self.options.http_port is not None:
            from centra.serve.http import HttpPort

            self.http = HttpPort(self.classifier, self.doors, self.guard, self.options.max_concurrent_rpcs,
                                 self.options.grace_s, ssl_context, self.options.cors_origins)

    @property
    def engine(self) -> Engine:
        return self.batcher.engine

    @property
    def ready(self) -> bool:
        """Serving, not starting or draining (health, OIP's ServerReady, /v2/health/ready)."""
        return self.classifier.ready

    def swap_engine(self, engine: Engine) -> Engine:
        """Serve `engine` from the next batch on (one assignment; batches already formed finish on the old
        one). Returns the old engine. The caller loads and warms the new engine first."""
        old, self.batcher.engine = self.batcher.engine, engine
        return old

    async def start(self) -> int:
        """Bind, start serving, health SERVING; returns the bound port."""
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        from centra.serve.reflection import enable_reflection

        opts = self.options
        server = grpc.aio.server(interceptors=[self.guard.grpc_interceptor()],
                                 maximum_concurrent_rpcs=opts.max_concurrent_rpcs,
                                 options=[("grpc.max_receive_message_length", opts.receive_bytes),
                                          # a port in use is an error, not a second server sharing it
                                          ("grpc.so_reuseport", 0)])
        services = [name for door in self.doors for name in door.grpc_services]
        for door in self.doors:
            door.add_grpc(server, self.classifier)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        enable_reflection(server, (*services, health.SERVICE_NAME),
                          [*(f for door in self.doors for f in door.grpc_files()), health_pb2.DESCRIPTOR])
        address = f"{host_port(opts.host, opts.port)}"
        try:
            port = (server.add_secure_port(address, self.credentials) if self.credentials is not None
                    else server.add_insecure_port(address))
        except RuntimeError:
            raise CentraError(f"cannot listen on {address} (address in use, or not this machine's?)") from None
        await self.batcher.start()  # before the port opens: no call may find it not running
        if self.http is not None:
            try:
                await self.http.start(opts.host, opts.http_port)
            except BaseException:
                await self.batcher.close(timeout=0)
                raise
        await server.start()
        self._server, self.port, self.classifier.ready = server, port, True
        for service in ("", *services):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING (for drain_s), stop accepting calls, give in-flight ones `grace` seconds
        (default: options.grace_s), then drain the batcher."""
        if self._server is None:
            return
        grace = self.options.grace_s if grace is None else grace
        self.classifier.ready = False
        await self.health.enter_graceful_shutdown()
        if self.options.drain_s:
            await asyncio.sleep(self.options.drain_s)
        await asyncio.gather(self._server.stop(grace), *([self.http.stop(grace)] if self.http is not None else []))
        await self.batcher.close(timeout=grace)
        self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
