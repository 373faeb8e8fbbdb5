"""The doors: one module per protocol. Each builds the one call type (serve/call.py) from its own wire
format, awaits the one classify path, and writes the answer back in its format; token, metrics, limits on
the ports and errors are the server's (serve/server.py, serve/http.py, serve/guard.py), once for all.

A door declares what it adds to the gRPC port (services, registered by name for health, and their proto
files for reflection: serve/reflection.py) and to the HTTP port (aiohttp routes), and which of its methods
or paths need no token (health). Adding a protocol is one new module here (with a `DOOR`) plus its name
in `DOORS`.

    v1     centra.v1 over gRPC: Classify, ListTasks
    rest   centra.v1's messages as JSON over HTTP: POST /v1/classify, GET /v1/tasks, GET /openapi.json
    oip    the Open Inference Protocol (KServe v2) over gRPC and HTTP, model `centra`
    info   what TEI and Triton users look for: GET /health, /info, /metrics
    triton the same tensors inside Triton's python backend (a door without a port: Triton owns it)
"""

from __future__ import annotations


class Door:
    """A protocol's entry into the server. Subclasses override what they add."""

    name = ""
    grpc_services: tuple[str, ...] = ()  # full service names this door serves on the gRPC port
    open_prefixes: tuple[str, ...] = ()  # gRPC method names or HTTP paths (prefixes) that need no token

    def add_grpc(self, server, classifier) -> None:
        """Register the door's services on a grpc.aio server (before it starts)."""

    def grpc_files(self) -> list:
        """The protobuf FileDescriptors that define grpc_services (served by reflection)."""
        return []

    def http_routes(self, classifier, http) -> list:
        """aiohttp route definitions; `http` is the HTTP port (serve/http.py: read_body, body limit)."""
        return []


DOORS = ("v1", "rest", "oip", "info")  # modules of this package, each with a DOOR: the doors a server opens, in order


def doors() -> tuple[Door, ...]:
    """Every door a server opens, in order."""
    import importlib

    return tuple(importlib.import_module(f"{__name__}.{name}").DOOR for name in DOORS)
