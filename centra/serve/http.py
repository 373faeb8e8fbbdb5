"""The HTTP port (aiohttp, in the gRPC server's event loop): the doors' routes (REST, OIP over HTTP) behind
one middleware, beside the gRPC port, through the same classify path.

Every route goes through the middleware: the bearer token (serve/guard.py's check, the same as gRPC's;
each door's health paths stay open), the metrics (calls by method and status code name, latency), and
errors: `status_of`'s codes answered with an HTTP status (HTTP_STATUS) and a JSON body {"error", "code"};
a client that left is counted CANCELLED, never logged as a fault.

Connections have deadlines: a request head must be in within IDLE_S of the connection opening (or of the
previous response: the same bound is the keep-alive idle time); a body within BODY_BASE_S plus its size at
BODY_MIN_RATE (408 past that, and the connection closed). A body is refused on its Content-Length before
it is read, and read with a cap (413) otherwise (`read_body`). A call takes one of max_concurrent_rpcs
slots only once its body is in (more: 429), so slow senders hold connections, never slots; a call whose
client disconnects is cancelled (its queued rows are dropped, never computed) and frees its slot.
At most MAX_READING_FACTOR x max_concurrent_rpcs bodies are received at once (503 beyond), so memory for
bodies in flight is bounded. Large bodies are parsed in a worker thread (`parse_off_loop`): protobuf's
JSON parse is Python code that gives the event loop its turns; json.loads is C and holds the GIL, but
the counts before it (objects_over, strings_over) bound its work. aiohttp is imported inside functions.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from centra.errors import CentraError
from centra.serve.call import ServeError
from centra.serve.status import host_port, one_line, status_of

log = logging.getLogger("centra.serve")
HTTP_STATUS = {"OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
TOO_LARGE = 413  # a body over the byte limit (code INVALID_ARGUMENT, as centra.v1 answers it)
CODE_OF_STATUS = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 400: "INVALID_ARGUMENT",
                  408: "DEADLINE_EXCEEDED", 403: "PERMISSION_DENIED"}
IDLE_S = 15.0  # a connection's request head (and the keep-alive idle time between requests)
BODY_BASE_S = 10.0  # a body's deadline: this, plus its size at BODY_MIN_RATE
BODY_MIN_RATE = 64 * 1024  # bytes per second
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed in a worker thread
# a JSON string, escapes and all; an unterminated one runs to the end (so a scan never backtracks: linear)
JSON_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)'
STRING = re.compile(JSON_STRING, re.DOTALL)
STRING_OR_OBJECT = re.compile(JSON_STRING + rb"|\{", re.DOTALL)
RETRY_AFTER_S = 1  # seconds: the Retry-After of a 429 or 503
MAX_READING_FACTOR = 4  # bodies being read at once: this many times max_concurrent_rpcs (more: 503 at once)
LINGER_S = 2.0  # after refusing a body, read what the client still sends this long before closing


class HttpError(Exception):
    """A refusal with its own HTTP status (413, 401), not one of a gRPC code's."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class HttpPort:
    """The HTTP server of one CentraServer: the routes of `doors` over `classifier`, behind `guard`."""

    def __init__(self, classifier, doors, guard, max_concurrent: int, grace_s: float, ssl_context=None,
                 cors_origins: tuple[str, ...] = ()):
        self.classifier = classifier
        self.cors_origins = tuple(cors_origins)
        self.doors = doors
        self.guard = guard
        self.max_concurrent = max_concurrent
        self.grace_s = grace_s
        self.ssl_context = ssl_context
        self.port: int | None = None
        self.inflight = 0
        self.reading = 0  # bodies being received now
        self._slots: set[int] = set()  # requests (by id) holding a concurrency slot
        self._closing: set[int] = set()  # requests whose connection closes after the answer
        self._runner = None

    @property
    def body_bytes(self) -> int:
        """The largest body read at all: a valid call fits (JSON escapes cost bytes; OIP's framing too)."""
        return self.classifier.limits.framed_bytes

    async def start(self, host: str, port: int) -> int:
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            response = await self._guard(request, handler)
            if self.cors_origins:  # the answer's CORS headers depend on the Origin asked with: caches must know
                response.headers["Vary"] = "Origin"
            return response

        app = web.Application(middlewares=[guard], client_max_size=self.body_bytes)
        for door in self.doors:
            app.add_routes(door.http_routes(self.classifier, self))
        if self.cors_origins:
            allow_cors(app, self.cors_origins)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=self.grace_s,
                               keepalive_timeout=IDLE_S, handler_cancellation=True,
                               lingering_time=LINGER_S)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self.ssl_context, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise CentraError(f"cannot serve HTTP on {host_port(host, port)} ({exc.strerror or exc})") from None
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop listening; calls in progress get the runner's shutdown timeout (the server's grace_s)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _guard(self, request, handler):
        """Token, concurrency, metrics and errors around every route."""
        from aiohttp import web

        route = request.match_info.route.resource
        method = f"{request.method} {route.canonical if route is not None else 'unknown'}"
        start, code = time.perf_counter(), "UNKNOWN"
        try:
            # a CORS preflight (OPTIONS) never carries credentials (Fetch standard); it runs no call either
            if request.method != "OPTIONS" and \
                    not self.guard.allows(request.path, request.headers.get("Authorization", "")):
                raise HttpError(401, "UNAUTHENTICATED", "missing or wrong bearer token")
            response = await handler(request)
            code = "OK" if response.status < 400 else CODE_OF_STATUS.get(response.status, "UNAVAILABLE")
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except ConnectionError:  # the client left mid-body: nobody reads an answer, nothing to log
            code = "CANCELLED"
            return web.Response(status=400)
        except HttpError as exc:
            code = exc.code
            response = error_response(exc.status, exc.code, str(exc))
            if exc.status == 401:
                response.headers["WWW-Authenticate"] = "Bearer"
            if id(request) in self._closing:
                response.force_close()
            return response
        except web.HTTPException as exc:  # aiohttp's own: no such route, wrong method, body over the cap
            code = CODE_OF_STATUS.get(exc.status, "INVALID_ARGUMENT")
            message = {TOO_LARGE: too_large(request, self.body_bytes), 403: exc.text}.get(exc.status, exc.reason)
            response = error_response(exc.status, code, message)
            if "Allow" in exc.headers:  # 405: the methods the route takes
                response.headers["Allow"] = exc.headers["Allow"]
            return response
        except Exception as exc:
            code, message = status_of(exc)
            if code == "INTERNAL":
                log.exception("%s failed", method)
            response = error_response(HTTP_STATUS.get(code, 500), code, message)
            if code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
                response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        finally:
            self._closing.discard(id(request))
            if id(request) in self._slots:
                self._slots.discard(id(request))
                self.inflight -= 1
            self.guard.record(method, code, time.perf_counter() - start)

    async def read_body(self, request) -> bytes:
        """The body, refused (413) on its Content-Length before it is read, or read with the cap, within its
        deadline (408); then the call takes a concurrency slot (429 when none is free), which the
        middleware gives back when the call ends."""
        from aiohttp import web

        size = request.content_length
        if size is not None and size > self.body_bytes:
            raise HttpError(TOO_LARGE, "INVALID_ARGUMENT", too_large(request, self.body_bytes))
        seconds = BODY_BASE_S + (size if size is not None else self.body_bytes) / BODY_MIN_RATE
        if self.reading >= MAX_READING_FACTOR * self.max_concurrent:  # bodies in memory at once are bounded
            raise ServeError(f"{self.reading:,} bodies are being received, the limit; retry later", "UNAVAILABLE")
        self.reading += 1
        try:
            body = await asyncio.wait_for(request.read(), seconds)
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(TOO_LARGE, "INVALID_ARGUMENT", too_large(request, self.body_bytes)) from None
        except asyncio.TimeoutError:
            self._closing.add(id(request))  # a connection this slow is not kept: closed after the answer
            raise HttpError(408, "DEADLINE_EXCEEDED", f"the body did not arrive within {seconds:.0f} s "
                            f"(at least {BODY_MIN_RATE // 1024} KB/s)") from None
        finally:
            self.reading -= 1
        if self.inflight >= self.max_concurrent:
            raise ServeError(f"too many calls in progress (limit {self.max_concurrent:,}); retry later",
                             "RESOURCE_EXHAUSTED")
        self.inflight += 1
        self._slots.add(id(request))
        return body


CORS_MAX_AGE_S = 600  # how long a browser may keep a preflight's answer


def allow_cors(app, origins: tuple[str, ...]) -> None:
    """CORS on every route of `app` for `origins` only (aiohttp-cors): a preflight from one of them is
    answered with the method and headers it asks for (when allowed), one from any other origin is refused
    403; an answer to an allowed origin carries Access-Control-Allow-Origin (its own origin, echoed), an
    answer to any other carries no CORS header."""
    import aiohttp_cors

    from centra.core.protocol import HEADER_LENGTH  # binary OIP tensors: sent and read
    from centra.serve.call import HEAD_HEADER, REQUEST_ID_HEADER  # a task's head, the canary's request id

    # what a browser's script may send and read besides the simple headers
    options = aiohttp_cors.ResourceOptions(allow_headers=("Authorization", "Content-Type", HEADER_LENGTH,
                                                          HEAD_HEADER, REQUEST_ID_HEADER),
                                           expose_headers=("Retry-After", "WWW-Authenticate", "Allow", HEADER_LENGTH),
                                           max_age=CORS_MAX_AGE_S)
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)


def strings_over(body: bytes, limit: int) -> bool:
    """Does the JSON body hold more than `limit` strings? Counted without parsing it, and the count stops
    past the limit, so a body of a million strings costs what limit + 1 of them cost."""
    return _count(STRING, body, limit, lambda match: True) > limit


def objects_over(body: bytes, limit: int) -> bool:
    """Does the JSON body hold more than `limit` objects (braces outside strings)? As strings_over."""
    return _count(STRING_OR_OBJECT, body, limit, lambda match: match.group() == b"{") > limit


def _count(pattern, body: bytes, limit: int, counted) -> int:
    found = 0
    for match in pattern.finditer(body):
        if counted(match):
            found += 1
            if found > limit:
                break
    return found


async def parse_off_loop(parse, body: bytes):
    """parse(body), in a worker thread when the body is large (the event loop keeps serving meanwhile)."""
    if len(body) <= OFF_LOOP_BYTES:
        return parse(body)
    return await asyncio.to_thread(parse, body)


def too_large(request, limit: int) -> str:
    given = f"{request.content_length:,} bytes" if request.content_length is not None else "the body"
    return f"{given} over the limit of {limit:,} bytes per call (fewer inputs or shorter texts per call)"


def error_response(status: int, code: str, message: str):
    from aiohttp import web

    return web.json_response({"error": one_line(message), "code": code}, status=status)


def json_response(data, status: int = 200):
    from aiohttp import web

    return web.json_response(data, status=status)
