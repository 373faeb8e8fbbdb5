"""`centra serve` assembled: the server and its doors, Prometheus metrics, the model watcher (reload), TLS and
a token.

`serve_model` loads and warms the model, starts the server and the metrics endpoint, follows the
published `current` pointer (SIGHUP checks at once), and on SIGTERM or SIGINT shuts down gracefully:
health NOT_SERVING, in-flight calls drained, then the port closed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from centra.errors import CentraError, FieldError, Name
from centra.runtime.engine import Engine, Row
from centra.serve.guard import Guard
from centra.serve.metrics import Metrics
from centra.serve.reload import DEFAULT_INTERVAL, ModelWatcher, in_fresh_thread
from centra.serve.server import CentraServer, ServeOptions
from centra.serve.shadow import Shadow, ShadowOptions
from centra.serve.status import host_port

log = logging.getLogger("centra.serve")


@dataclass(frozen=True)
class AppOptions:
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9400  # None: no metrics endpoint
    watch: bool = True
    watch_interval: float = DEFAULT_INTERVAL
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    engine: str | None = None  # runtime override ("torch" | "onnx"); None: the one each version's manifest names
    shadow: ShadowOptions = field(default_factory=ShadowOptions)  # candidate heads: canary, disagreement sample

    def check(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise FieldError("give both ", Name("tls_cert"), " and ", Name("tls_key"), ", or neither")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise FieldError(Name("metrics_port"), f" must be in 0..65535, not {self.metrics_port}")
        if not self.watch_interval > 0:
            raise CentraError(f"the watch interval must be > 0 seconds, not {self.watch_interval}")
        if self.tls_cert is not None:
            from centra.serve.security import check_tls

            check_tls(self.tls_cert, self.tls_key)  # before the model loads
        if self.token_file is not None:
            from centra.serve.security import read_token

            read_token(self.token_file)
        self.shadow.check()


def load_engine(folder: Path, batch_size: int, engine_name: str | None = None) -> Engine:
    """Load a merged model and warm it up (one row through every task), before it serves a call."""
    engine = Engine.load(Path(folder), batch_size=batch_size, engine=engine_name)
    names = tuple(engine.branches)  # the candidate heads' detours too
    engine.run([Row("warm up", "warm up", names)])
    return engine


def build(model: Path, options: ServeOptions, app: AppOptions) -> tuple[CentraServer, Metrics, ModelWatcher | None]:
    """Everything checked and loaded, nothing listening yet."""
    from centra.core.versions import model_folder
    from centra.serve.security import read_token, tls_context, tls_credentials

    options.check()
    app.check()
    credentials = tls_credentials(app.tls_cert, app.tls_key) if app.tls_cert else None
    ssl_context = tls_context(app.tls_cert, app.tls_key) if app.tls_cert and options.http_port is not None else None
    token = read_token(app.token_file) if app.token_file else None
    folder = model_folder(model)  # the pointer read once: the version loaded is the version watched from
    engine = load_engine(folder, options.max_batch, app.engine)
    metrics = Metrics()
    metrics.set_version(engine.version, engine.content_id)
    # one guard for every door on both ports: the token, and metrics that count refused calls too
    server = CentraServer(engine, options, guard=Guard(token, metrics), credentials=credentials,
                          ssl_context=ssl_context, shadow=Shadow(app.shadow, metrics.registry))
    server.batcher.listeners.append(
        lambda r: metrics.observe_batch(r.rows, r.calls, list(r.waits), r.compute_s, r.tasks))
    watcher = None
    versioned = folder != Path(model) and app.watch  # a version folder given directly is not watched
    if versioned:
        def swap(new: Engine, version: str) -> None:
            server.swap_engine(new)
            metrics.set_version(version, new.content_id)

        watcher = ModelWatcher(Path(model), engine.version,
                               lambda f: load_engine(f, options.max_batch, app.engine), swap,
                               on_result=lambda result: metrics.reloads.labels(result=result).inc(),
                               interval=app.watch_interval, content_id=engine.content_id)
    return server, metrics, watcher


async def serve_model(model: Path, options: ServeOptions, app: AppOptions,
                      ready: Callable[[CentraServer, int | None], None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT; SIGHUP checks the published pointer at once. The handlers are
    installed before the model loads and stay until the server has drained: a signal at any stage is
    handled (SIGTERM while loading: stop once loaded, before listening; SIGHUP while loading or
    draining: logged and ignored), never the default action that kills the process mid-work."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    stage = {"now": "loading", "watcher": None}

    def on_stop() -> None:
        if stopping.is_set():
            log.info("already shutting down (%s)", stage["now"])
        stopping.set()

    def on_hup() -> None:
        watcher = stage["watcher"]
        if stage["now"] != "serving":
            log.info("SIGHUP while %s: ignored", stage["now"])
        elif watcher is None:
            log.info("SIGHUP: reload is off (--no-watch, or a version folder served)")
        else:
            watcher.poke()

    previous = install_handlers(loop, on_stop, on_hup)
    raise_fd_limit()
    exception_handler = loop.get_exception_handler()
    loop.set_exception_handler(QuietAccept(exception_handler))
    http = server = None
    try:
        server, metrics, watcher = await asyncio.to_thread(in_fresh_thread, build, model, options, app)
        if stopping.is_set():
            log.info("stopped while loading: never listened")
            return
        if app.metrics_port is not None:  # bound first: a busy metrics port leaves nothing listening
            try:
                http = metrics.serve_http(app.metrics_host, app.metrics_port)
            except OSError as exc:
                raise CentraError(f"cannot serve metrics on {host_port(app.metrics_host, app.metrics_port)} "
                                  f"({exc.strerror or exc})") from None
        await server.start()
        if watcher is not None:
            watcher.start()
        stage.update(now="serving", watcher=watcher)
        if ready is not None:
            ready(server, http.server_port if http is not None else None)
        await stopping.wait()
        log.info("shutting down: NOT_SERVING for %.1f s, then %.1f s grace for in-flight calls", options.drain_s,
                 options.grace_s)
    finally:
        stage["now"] = "shutting down"
        if stage["watcher"] is not None:
            await stage["watcher"].stop()
        if server is not None:
            await server.stop()
        if http is not None:
            http.shutdown()
            http.server_close()
        restore_handlers(loop, previous)
        loop.set_exception_handler(exception_handler)


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FD_LOG_EVERY_S = 10.0  # at most one line this often while the process is out of file descriptors


def raise_fd_limit() -> None:
    """Open files: the soft limit raised to the hard one (each connection holds one), so idle clients run
    into the connection deadlines long before the process runs out of descriptors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return


class QuietAccept:
    """The event loop's exception handler: when the process is out of file descriptors, asyncio's accept
    loop reports every retry with a traceback; here that is one line per FD_LOG_EVERY_S (asyncio keeps
    retrying, so serving resumes as descriptors free up). Everything else goes to the previous handler."""

    def __init__(self, previous=None):
        self.previous = previous
        self.last = -FD_LOG_EVERY_S
        self.skipped = 0

    def __call__(self, loop, context: dict) -> None:
        exc = context.get("exception")
        if "socket" in context and isinstance(exc, OSError) and \
                exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):  # asyncio's accept loop
            now = time.monotonic()
            if now - self.last >= FD_LOG_EVERY_S:
                log.warning("out of file descriptors (%s): new connections wait%s", exc.strerror or exc,
                            f" ({self.skipped} more since the last line)" if self.skipped else "")
                self.last, self.skipped = now, 0
            else:
                self.skipped += 1
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


def install_handlers(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None],
                     on_hup: Callable[[], None]) -> dict:
    """SIGTERM and SIGINT -> on_stop, SIGHUP -> on_hup, in the loop; returns the handlers they replace."""
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    return previous


def restore_handlers(loop: asyncio.AbstractEventLoop, previous: dict) -> None:
    for sig in SIGNALS:
        loop.remove_signal_handler(sig)
        if previous.get(sig) is not None:
            signal.signal(sig, previous[sig])
