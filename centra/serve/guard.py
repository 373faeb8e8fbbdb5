"""The token check and the call metrics, written once for every door on both ports: a gRPC interceptor
and the HTTP middleware (serve/http.py) ask the same `Guard`.

- The bearer token (`authorization: Bearer <token>`), compared in constant time and never logged. Health
  and readiness (each door names its open methods and paths) stay open, so a load balancer can probe. A
  refused gRPC call's message is never parsed: work done for a caller without the token is none.
- Metrics: every unary call by method and final status code name, and its latency. A refused call is
  counted too. A gRPC call whose client gave up is CANCELLED; one whose deadline ran out, DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import hmac
import time

REFUSED = "missing or wrong bearer token"
# a cancel this close to the deadline is counted as the deadline: the client's clock runs out first (the
# server's starts when the call arrives), and its cancel arrives with about one network trip left here
DEADLINE_SLACK = 0.25
# Streaming calls (health Watch, reflection) open at once: they hold gRPC's concurrency slots for as long as
# their clients like, so they get a small budget of their own (more: RESOURCE_EXHAUSTED at once)
MAX_STREAMS = 16


class Guard:
    """What every door's calls pass: `token` (None: no check), `metrics` (None: not counted), and the
    method or path prefixes that need no token."""

    def __init__(self, token: str | None = None, metrics=None, open_prefixes: tuple[str, ...] = ()):
        self.token = token
        self.metrics = metrics
        self.open_prefixes = tuple(open_prefixes)
        self._expected = f"Bearer {token}".encode() if token is not None else None
        self.streams = 0  # streaming calls open now (health Watch, reflection)

    def allows(self, method: str, authorization: str) -> bool:
        """May a call to `method` (a gRPC method's full name, or an HTTP path) with this Authorization run?"""
        if self._expected is None or method.startswith(self.open_prefixes):
            return True
        return hmac.compare_digest(authorization.encode(), self._expected)

    def record(self, method: str, code: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.calls.labels(method=method, code=code).inc()
            self.metrics.latency.labels(method=method).observe(seconds)

    def grpc_interceptor(self):
        """The gRPC side: refuses calls without the token (from their metadata alone, unparsed) and counts
        every unary call by method and code."""
        return _grpc_interceptor(self)


def unread(data: bytes) -> None:
    """The deserializer of a refused call: gRPC has received its bytes (within the receive limit), but
    parsing them would be work done for a caller without the token."""
    return None


def _refusing(handler):
    """`handler` with its method replaced by an UNAUTHENTICATED refusal (unary or streaming), unparsed."""
    import grpc

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)

    async def refuse_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)
        yield  # pragma: no cover

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=unread, response_serializer=serializer)
    if handler.unary_stream is not None:  # server reflection streams
        return grpc.unary_stream_rpc_method_handler(refuse_stream, request_deserializer=unread,
                                                    response_serializer=serializer)
    if handler.stream_stream is not None:
        async def refuse_streams(requests, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)
            yield  # pragma: no cover
        return grpc.stream_stream_rpc_method_handler(refuse_streams, request_deserializer=unread,
                                                     response_serializer=serializer)
    return handler


def _streams_within_budget(handler, guard: Guard):
    """`handler` (a streaming one) refused RESOURCE_EXHAUSTED while MAX_STREAMS streams are open."""
    import inspect

    import grpc

    def limited(inner):
        async def call(request, context):
            if guard.streams >= MAX_STREAMS:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"{MAX_STREAMS} streams are open, the limit; retry later")
            guard.streams += 1
            try:
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        await context.write(item)
                else:
                    await result
            finally:
                guard.streams -= 1
        return call

    kinds = {"request_deserializer": handler.request_deserializer,
             "response_serializer": handler.response_serializer}
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(limited(handler.unary_stream), **kinds)
    return grpc.stream_stream_rpc_method_handler(limited(handler.stream_stream), **kinds)


def _grpc_interceptor(guard: Guard):
    import grpc

    class GuardInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            handler = await continuation(details)
            if handler is None:
                return None
            given = dict(details.invocation_metadata or ()).get("authorization", "")
            if not guard.allows(details.method, given):
                handler = _refusing(handler)
            elif handler.unary_stream is not None or handler.stream_stream is not None:
                return _streams_within_budget(handler, guard)
            if handler.unary_unary is None or guard.metrics is None:
                return handler
            return grpc.unary_unary_rpc_method_handler(
                timed(handler.unary_unary, details.method.rsplit("/", 1)[-1]),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def timed(inner, method: str):
        async def call(request, context):
            start = time.perf_counter()
            code = grpc.StatusCode.UNKNOWN
            try:
                response = await inner(request, context)
                code = context.code() or grpc.StatusCode.OK
                return response
            except asyncio.CancelledError:  # grpc cancels the handler: the deadline passed, or the client left
                remaining = context.time_remaining()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= DEADLINE_SLACK \
                    else grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                guard.record(method, code.name if isinstance(code, grpc.StatusCode) else str(code),
                             time.perf_counter() - start)
        return call

    return GuardInterceptor()
