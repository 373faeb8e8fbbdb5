"""A server in a background thread with its own event loop: for the demo, the benchmark and tests."""

from __future__ import annotations

import asyncio
import threading

from centra.runtime.engine import Engine
from centra.serve.server import CentraServer, ServeOptions
from centra.serve.status import host_port


class BackgroundServer:
    """`with BackgroundServer(engine) as server:` serves `engine` on a free loopback port (server.target)
    and shuts it down gracefully on exit."""

    def __init__(self, engine: Engine, options: ServeOptions | None = None, **server_kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="centra-server", daemon=True)
        self.server = CentraServer(engine, options or ServeOptions(port=0), **server_kwargs)
        self.target = ""

    def do(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        try:
            self.target = host_port(self.server.options.host, self.do(self.server.start()))
        except BaseException:
            self._stop_loop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.do(self.server.stop(1.0))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        if not self.thread.is_alive():
            self.loop.close()
