"""Start the app on a host and port: in the foreground (`sparse-embed serve`) or on a
background thread with its own event loop (demo --serve, tests, benchmarks)."""
from __future__ import annotations

import asyncio
import signal
import threading

from .access import ACCESS

LOOPBACK = "127.0.0.1"


def address(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


async def start_site(app, host: str, port: int, *, reuse_port: bool = False):
    """Listen on host:port (0: a free port; `reuse_port`: beside other processes on that
    port, SO_REUSEPORT); -> (runner, the page's address)."""
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ValueError(f"Cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") from None
    bound = runner.addresses[0]
    if ACCESS in app:
        app[ACCESS].port = bound[1]  # a Host header naming another port is refused from now on
    return runner, address(host, bound[1])


async def serve_forever(app, host: str, port: int, on_ready=print, *, reuse_port: bool = False) -> str:
    """Serve until SIGINT (Ctrl-C) or SIGTERM (a service manager's stop), then close every
    connection and the app's resources; returns the signal's name."""
    runner, url = await start_site(app, host, port, reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future = loop.create_future()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, lambda s=sig: stopped.done() or stopped.set_result(s.name))
    try:
        on_ready(url)
        return await stopped
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


class BackgroundServer:
    """The app on a daemon thread: start() returns its address, stop() closes it."""

    def __init__(self, app, host: str = LOOPBACK, port: int = 0):
        self.app, self.host, self.port = app, host, port
        self.url: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="serve", daemon=True)
        self._runner = None

    def start(self) -> str:
        self._thread.start()
        self._runner, self.url = asyncio.run_coroutine_threadsafe(start_site(self.app, self.host, self.port),
                                                                  self._loop).result(timeout=60)
        return self.url

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> "BackgroundServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
