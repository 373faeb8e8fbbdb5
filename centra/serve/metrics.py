"""Prometheus metrics of one server: calls and errors by code, latency, inputs per task, batch sizes,
queue time, the served model version and reloads. One registry per server (tests run several)."""

from __future__ import annotations

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.calls = Counter("centra_calls", "Calls answered on every door, gRPC (centra.v1, OIP) and HTTP (REST, OIP, "
                             "/info, /health, /metrics), refused ones included: by method (the gRPC method's name, "
                             "or the HTTP method and route) and status code name", ["method", "code"], registry=r)
        self.latency = Histogram("centra_call_seconds", "Seconds from a call's arrival to its answer, gRPC and HTTP, "
                                 "by method (as centra_calls)", ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter("centra_inputs", "Inputs classified, by task (one per input and task asked for), from "
                              "every door", ["task"], registry=r)
        self.batch_rows = Histogram("centra_batch_rows", "Rows (inputs) per engine batch, the calls of every door "
                                    "together", buckets=ROW_BUCKETS, registry=r)
        self.batch_calls = Histogram("centra_batch_calls", "Calls merged into one engine batch, from any door",
                                     buckets=ROW_BUCKETS, registry=r)
        self.queue_seconds = Histogram("centra_queue_seconds", "Seconds a call waited in the queue before its batch "
                                       "ran", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram("centra_batch_seconds", "Engine seconds per batch (its trunk passes and "
                                       "branches)", buckets=LATENCY_BUCKETS, registry=r)
        self.model = Gauge("centra_model_version", "The served model: version name and content id (value 1)",
                           ["version", "id"], registry=r)
        self.reloads = Counter("centra_reloads", "Model reloads the watcher tried, by result (ok: swapped in; failed: "
                               "the old version kept serving)", ["result"], registry=r)

    def set_version(self, version: str, content_id: str = "") -> None:
        """The served model: its version name and content id (what a same-name rebuild changes)."""
        self.model.clear()
        self.model.labels(version=version or "unversioned", id=content_id or "none").set(1)

    def observe_batch(self, rows: int, calls: int, waits: list[float], seconds: float,
                      tasks: dict[str, int]) -> None:
        self.batch_rows.observe(rows)
        self.batch_calls.observe(calls)
        self.batch_seconds.observe(seconds)
        for wait in waits:
            self.queue_seconds.observe(wait)
        for task, count in tasks.items():
            self.inputs.labels(task=task).inc(count)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def serve_http(self, host: str, port: int):
        """Expose /metrics on host:port; returns the HTTP server (its .server_port is the bound port)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
