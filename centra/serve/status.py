"""centra's errors as status codes, for every door (centra.v1 and OIP over gRPC, REST and OIP over HTTP,
the Triton model): one mapping (`status_of`), one-line messages, and the servicer-method guard (`mapped`)
that answers with them. Anything that is not centra's is a server fault: INTERNAL, logged with its
traceback, answered with one line that carries none."""

from __future__ import annotations

import asyncio
import functools
import logging

from centra.errors import CentraError
from centra.serve.call import ServeError

log = logging.getLogger("centra.serve")
MAX_MESSAGE = 1000  # characters of an error message sent to a caller


def status_of(exc: BaseException) -> tuple[str, str]:
    """centra's errors -> (gRPC status code name, one-line message of at most MAX_MESSAGE characters, far
    under gRPC's metadata limit). Anything else is a server fault."""
    if isinstance(exc, ServeError):
        return exc.code, one_line(str(exc))
    if isinstance(exc, CentraError):
        return "INVALID_ARGUMENT", one_line(str(exc))
    return "INTERNAL", "internal error; the server log has the details"


def one_line(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def mapped(method):
    """Answer a servicer method's exceptions with the status code `status_of` gives."""

    @functools.wraps(method)
    async def guarded(self, request, context):
        import grpc

        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = status_of(exc)
            if code == "INTERNAL":
                log.exception("%s failed", method.__name__)
            await context.abort(getattr(grpc.StatusCode, code), message)
    return guarded


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
