"""Security options, off by default: TLS credentials and a bearer-token check. The token is compared in
constant time and never logged; health checks stay open so that a load balancer can probe."""

from __future__ import annotations

import hmac
from pathlib import Path

from centra.errors import CentraError

OPEN_METHODS = ("/grpc.health.v1.Health/", "/inference.GRPCInferenceService/ServerLive",
                "/inference.GRPCInferenceService/ServerReady")  # OIP's health, open as HTTP's /v2/health/


def read_secret(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CentraError(f"{path}: file not found ({what})") from None
    except OSError as exc:
        raise CentraError(f"{path}: cannot read {what} ({exc.strerror})") from None
    if not data.strip():
        raise CentraError(f"{path}: empty file ({what})")
    return data


def read_token(path: Path) -> str:
    """The bearer token: one word of visible ASCII (what gRPC metadata can carry)."""
    raw = read_secret(path, "token file").strip()
    if not all(0x21 <= byte <= 0x7E for byte in raw):
        raise CentraError(f"{path}: the token must be one word of visible ASCII characters on one line")
    return raw.decode("ascii")


def check_tls(cert: Path, key: Path) -> None:
    """Refuse, before anything is loaded, a certificate and key that do not make a TLS server."""
    import ssl

    for path, what in ((cert, "TLS certificate"), (key, "TLS key")):
        read_secret(path, what)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise CentraError(f"{cert}, {key}: not a PEM certificate chain and its private key ({exc.reason or exc})") \
            from None


def tls_credentials(cert: Path, key: Path):
    """Server credentials from a PEM certificate chain and its private key."""
    import grpc

    check_tls(cert, key)
    return grpc.ssl_server_credentials([(read_secret(key, "TLS key"), read_secret(cert, "TLS certificate"))])


def tls_context(cert: Path, key: Path):
    """An ssl.SSLContext serving the same certificate and key (HTTP)."""
    import ssl

    check_tls(cert, key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


def channel_credentials(ca: Path):
    """Client credentials that trust the PEM root certificate(s) in `ca`."""
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=read_secret(ca, "TLS CA"))


def unread(data: bytes) -> None:
    """The deserializer of a refused call: its message is never parsed (gRPC has received its bytes, within
    the receive limit, but parsing them would be work done for a caller without the token)."""
    return None


def token_interceptor(token: str):
    """Refuse, UNAUTHENTICATED, a call without `authorization: Bearer <token>` (health checks excepted),
    from its metadata alone: the refused call's message is not parsed."""
    import grpc

    expected = f"Bearer {token}".encode()

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    class TokenInterceptor(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation, details):
            if details.method.startswith(OPEN_METHODS):
                return await continuation(details)
            given = dict(details.invocation_metadata or ()).get("authorization", "")
            if hmac.compare_digest(given.encode(), expected):
                return await continuation(details)
            handler = await continuation(details)
            if handler is None:
                return None
            if handler.unary_unary is not None:
                return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=unread,
                                                           response_serializer=handler.response_serializer)
            if handler.unary_stream is not None:  # server reflection streams
                async def refuse_stream(request, context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
                    yield  # pragma: no cover
                return grpc.unary_stream_rpc_method_handler(refuse_stream,
                                                            request_deserializer=unread,
                                                            response_serializer=handler.response_serializer)
            if handler.stream_stream is not None:
                async def refuse_streams(requests, context):
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
                    yield  # pragma: no cover
                return grpc.stream_stream_rpc_method_handler(refuse_streams,
                                                             request_deserializer=unread,
                                                             response_serializer=handler.response_serializer)
            return handler

    return TokenInterceptor()
