"""centra serve over HTTP (aiohttp, in the gRPC server's event loop): REST JSON and the Open Inference
Protocol's HTTP routes, beside centra.v1 and OIP over gRPC, through the same batcher.

- REST: `POST /v1/classify` (protobuf's JSON mapping of ClassifyRequest in, of ClassifyResponse out),
  `GET /v1/tasks` (ListTasksResponse), `GET /openapi.json` (serve/openapi.py).
- OIP (KServe v2): `GET /v2/health/live`, `/v2/health/ready`, `/v2`, `/v2/models/centra[/versions/V]`,
  `.../ready`, `POST .../infer` (JSON tensors, and the binary tensor extension tritonclient uses).

Every route goes through one middleware: the bearer token (`Authorization: Bearer`; health and the
OpenAPI document stay open, as gRPC health does), at most max_concurrent_rpcs calls in progress (more:
429), the metrics (calls by method and status code name, latency), and errors: the servicer's
`status_of` codes answered with an HTTP status (HTTP_STATUS) and a JSON body {"error", "code"}. A body is
refused on its Content-Length before it is read, and read with a cap (413) otherwise. Conversion is the
servicer's (convert.py, oip.py): the same checks and messages as a centra.v1 call. aiohttp is imported
inside functions.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from centra.errors import CentraError
from centra.serve.convert import ServeError, response_to_pb, rows_from_pb, tasks_to_pb
from centra.serve.status import host_port, one_line, status_of

log = logging.getLogger("centra.serve")
HTTP_STATUS = {"OK": 200, "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
TOO_LARGE = 413  # a body over the byte limit (code INVALID_ARGUMENT, as centra.v1 answers it)
CODE_OF_STATUS = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT", 400: "INVALID_ARGUMENT"}
OPEN_PATHS = ("/v2/health/", "/openapi.json")
HEADER_LENGTH = "Inference-Header-Content-Length"


class HttpError(Exception):
    """A refusal with its own HTTP status (413), not one of a gRPC code's."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class HttpDoor:
    """The HTTP server of one CentraServer. `token` (str), `ssl_context` and `metrics` are set by
    app.build() from the same options as the gRPC side."""

    def __init__(self, server, token: str | None = None, ssl_context=None, metrics=None):
        self.server = server
        self.token, self.ssl_context, self.metrics = token, ssl_context, metrics
        self.port: int | None = None
        self.inflight = 0
        self._runner = None

    @property
    def limits(self):
        return self.server.options.limits

    @property
    def body_bytes(self) -> int:
        """The largest body read at all: a valid call fits (JSON escapes cost bytes; OIP's framing too)."""
        from centra.serve.oip import wire_bytes

        return wire_bytes(self.limits)

    async def start(self, host: str, port: int) -> int:
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            return await self._guard(request, handler)

        app = web.Application(middlewares=[guard], client_max_size=self.body_bytes)
        routes = [web.post("/v1/classify", self.classify), web.get("/v1/tasks", self.tasks),
                  web.get("/openapi.json", self.openapi),
                  web.get("/v2/health/live", self.live), web.get("/v2/health/ready", self.ready),
                  web.get("/v2", self.server_metadata)]
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [web.get(base, self.model_metadata), web.get(base + "/ready", self.model_ready),
                       web.post(base + "/infer", self.infer)]
        app.add_routes(routes)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=self.server.options.grace_s)
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

    # ---------------------------------------------------------------------------------- middleware

    def _authorized(self, request) -> bool:
        if self.token is None or request.path.startswith(OPEN_PATHS):
            return True
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def _guard(self, request, handler):
        """Token, concurrency, metrics and errors around every route."""
        from aiohttp import web

        route = request.match_info.route.resource
        method = f"{request.method} {route.canonical if route is not None else 'unknown'}"
        start, code = time.perf_counter(), "UNKNOWN"
        counted = False
        try:
            if not self._authorized(request):
                raise HttpError(401, "UNAUTHENTICATED", "missing or wrong bearer token")
            if self.inflight >= self.server.options.max_concurrent_rpcs:
                raise ServeError(f"too many calls in progress (limit {self.server.options.max_concurrent_rpcs:,}); "
                                 "retry later", "RESOURCE_EXHAUSTED")
            self.inflight += 1
            counted = True
            response = await handler(request)
            code = "OK" if response.status < 400 else CODE_OF_STATUS.get(response.status, "UNAVAILABLE")
            return response
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except HttpError as exc:
            code = exc.code
            return error_response(exc.status, exc.code, str(exc))
        except web.HTTPException as exc:  # aiohttp's own: no such route, wrong method, body over the cap
            code = CODE_OF_STATUS.get(exc.status, "INVALID_ARGUMENT")
            message = exc.reason if exc.status != TOO_LARGE else too_large(request, self.body_bytes)
            return error_response(exc.status, code, message)
        except Exception as exc:
            code, message = status_of(exc)
            if code == "INTERNAL":
                log.exception("%s failed", method)
            return error_response(HTTP_STATUS.get(code, 500), code, message)
        finally:
            if counted:
                self.inflight -= 1
            if self.metrics is not None:
                self.metrics.calls.labels(method=method, code=code).inc()
                self.metrics.latency.labels(method=method).observe(time.perf_counter() - start)

    async def read_body(self, request) -> bytes:
        """The body, refused (413) on its Content-Length before it is read, or read with the cap."""
        from aiohttp import web

        if request.content_length is not None and request.content_length > self.body_bytes:
            raise HttpError(TOO_LARGE, "INVALID_ARGUMENT", too_large(request, self.body_bytes))
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpError(TOO_LARGE, "INVALID_ARGUMENT", too_large(request, self.body_bytes)) from None

    # ---------------------------------------------------------------------------------------- REST

    async def classify(self, request):
        from google.protobuf import json_format

        from centra.serve.v1 import centra_pb2 as pb

        body = await self.read_body(request)
        try:
            message = json_format.Parse(body, pb.ClassifyRequest())
        except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
            raise ServeError(f"the body is not a ClassifyRequest in JSON ({one_line(str(exc))[:200]})") from None
        batcher, limits = self.server.batcher, self.limits
        engine = batcher.engine
        rows = rows_from_pb(message, engine, limits)
        done = await batcher.submit(rows, None, checked=engine, recheck=lambda other: rows_from_pb(message, other,
                                                                                                  limits))
        return proto_response(response_to_pb(message, done.rows, done.engine, done.results))

    async def tasks(self, request):
        return proto_response(tasks_to_pb(self.server.engine))

    async def openapi(self, request):
        from aiohttp import web

        from centra.serve.openapi import document

        return web.json_response(document())

    # ----------------------------------------------------------------------------------------- OIP

    async def live(self, request):
        from aiohttp import web

        return web.json_response({"live": True})

    async def ready(self, request):
        from aiohttp import web

        return web.json_response({"ready": self.server.ready}, status=200 if self.server.ready else 503)

    async def server_metadata(self, request):
        from aiohttp import web

        return web.json_response({"name": "centra", "version": self.server.engine.version, "extensions": []})

    async def model_metadata(self, request):
        from aiohttp import web

        from centra.serve.oip import check_model, metadata

        engine = self.server.engine
        check_model(request.match_info["model"], request.match_info.get("version", ""), engine)
        return web.json_response(metadata(engine))

    async def model_ready(self, request):
        from aiohttp import web

        from centra.serve.oip import check_model

        check_model(request.match_info["model"], request.match_info.get("version", ""), self.server.engine)
        ready = self.server.ready
        return web.json_response({"name": request.match_info["model"], "ready": ready},
                                 status=200 if ready else 503)

    async def infer(self, request):
        from centra.serve import oip

        oip.check_model(request.match_info["model"], request.match_info.get("version", ""), self.server.engine)
        body = await self.read_body(request)
        doc, tensors, requested, binary = parse_infer(body, request.headers.get(HEADER_LENGTH))
        parameters = doc.get("parameters")
        deadline = oip.deadline_of(parameters, asyncio.get_running_loop().time())
        engine, outputs = await oip.infer(self.server.batcher, tensors, list(requested), self.limits, deadline,
                                          max_labels=oip.max_labels_of(parameters))
        return infer_response(doc, engine, outputs, requested, binary)


def too_large(request, limit: int) -> str:
    given = f"{request.content_length:,} bytes" if request.content_length is not None else "the body"
    return f"{given} over the limit of {limit:,} bytes per call (fewer inputs or shorter texts per call)"


def error_response(status: int, code: str, message: str):
    from aiohttp import web

    return web.json_response({"error": one_line(message), "code": code}, status=status)


def proto_response(message):
    from aiohttp import web
    from google.protobuf import json_format

    return web.json_response(json_format.MessageToDict(message, always_print_fields_with_no_presence=True))


def parse_infer(body: bytes, header_length: str | None):
    """An OIP inference request body (JSON, or JSON + binary tensors) -> (its JSON, input Tensors,
    {requested output: binary?}, binary_data_output)."""
    from centra.serve.oip import Tensor, deserialize_bytes

    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise ServeError(f"{HEADER_LENGTH} is not a number") from None
        if not 0 <= size <= len(body):
            raise ServeError(f"{HEADER_LENGTH} {size:,} is outside the body's {len(body):,} bytes")
        head, blob = body[:size], body[size:]
    else:
        head, blob = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServeError(f"the body is not an inference request in JSON ({one_line(str(exc))[:200]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ServeError("the body is not an inference request: no list of inputs")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ServeError("the request's parameters are not an object")
    binary_output = bool(params.get("binary_data_output", False))
    tensors, offset = [], 0
    for item in doc["inputs"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ServeError("an input is not an object with a name")
        name, shape = item["name"], item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ServeError(f"input {name[:80]}: no shape (a list of integers)")
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or not 0 <= size <= len(blob) - offset:
                raise ServeError(f"input {name[:80]}: binary_data_size {size!r} is outside the body")
            values = deserialize_bytes(blob[offset:offset + size], name) if item.get("datatype") == "BYTES" else []
            offset += size
        else:
            values = flatten(item.get("data", []), name)
        tensors.append(Tensor(name, str(item.get("datatype", "")), tuple(shape), values))
    if offset != len(blob):
        raise ServeError(f"{len(blob) - offset:,} bytes of binary data that no input claims")
    requested = {}
    for item in doc.get("outputs") or []:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ServeError("an output is not an object with a name")
        requested[item["name"]] = bool((item.get("parameters") or {}).get("binary_data", binary_output))
    return doc, tensors, requested, binary_output


def flatten(data, name: str) -> list:
    """JSON tensor data, nested or flat, as a flat list of strings."""
    out, stack = [], [data]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(reversed(value))
        elif isinstance(value, str):
            out.append(value)
        else:
            raise ServeError(f"input {name[:80]}: BYTES data must be strings")
    return out


def infer_response(doc: dict, engine, outputs, requested: dict[str, bool], binary_output: bool):
    from aiohttp import web

    from centra.serve.oip import MODEL

    head = {"model_name": MODEL, "model_version": engine.version, "outputs": []}
    if isinstance(doc.get("id"), str) and doc["id"]:
        head["id"] = doc["id"]
    blobs = []
    for output in outputs:
        entry = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if requested.get(output.name, binary_output):
            raw = output.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = output.data()
        head["outputs"].append(entry)
    text = json.dumps(head, ensure_ascii=False).encode("utf-8")
    if not blobs:
        return web.Response(body=text, content_type="application/json")
    return web.Response(body=text + b"".join(blobs), headers={HEADER_LENGTH: str(len(text))},
                        content_type="application/octet-stream")
