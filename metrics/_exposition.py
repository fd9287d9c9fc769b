"""Serving the runtime's metrics: an HTTP server of its own, or a WSGI app for a host server.

Both serve the Prometheus text format (or OpenMetrics when the scraper asks for it) of one
registry: a :class:`~metrics._metrics.RuntimeMetrics`'s own, or any ``CollectorRegistry``.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CollectorRegistry

from metrics._metrics import RuntimeMetrics

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

_STOP_TIMEOUT_S = 5.0


def _registry_of(metrics_or_registry: RuntimeMetrics | CollectorRegistry) -> CollectorRegistry:
    if isinstance(metrics_or_registry, RuntimeMetrics):
        return metrics_or_registry.registry
    if isinstance(metrics_or_registry, CollectorRegistry):
        return metrics_or_registry
    raise TypeError(
        f"expected RuntimeMetrics or CollectorRegistry, got {type(metrics_or_registry).__name__}"
    )


def make_wsgi_app(metrics_or_registry: RuntimeMetrics | CollectorRegistry) -> WSGIApplication:
    """A WSGI app serving the metrics of ``metrics_or_registry`` on every path it is mounted at.

    Mount it in the host's web server (e.g. under ``/metrics``). Raises ``TypeError`` for
    anything but a ``RuntimeMetrics`` or a ``CollectorRegistry``.
    """
    app: WSGIApplication = prometheus_client.make_wsgi_app(_registry_of(metrics_or_registry))
    return app


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One thread per scrape, so a slow scraper does not hold up the others."""

    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """Writes no access log line to stderr for every scrape."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer:
    """A running HTTP server exposing metrics at ``/metrics`` (and every other path).

    Made by :func:`start_metrics_server`; a context manager that stops the server on exit.
    """

    def __init__(self, server: WSGIServer, thread: threading.Thread, addr: str) -> None:
        self._server = server
        self._thread = thread
        self._stopped = False
        self._stop_lock = threading.Lock()
        self.addr = addr
        """The address the server is bound to."""
        self.port: int = server.server_address[1]
        """The port the server is bound to (the one the OS chose when started with port 0)."""

    @property
    def url(self) -> str:
        """``http://ADDR:PORT/metrics``, with an IPv6 address in brackets."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and free the port; waits for the serving thread up to 5 s.

        Idempotent. A scrape in progress finishes on its own thread.
        """
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(_STOP_TIMEOUT_S)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_metrics_server(
    metrics_or_registry: RuntimeMetrics | CollectorRegistry,
    port: int = 0,
    addr: str = "127.0.0.1",
) -> MetricsServer:
    """Serve the metrics of ``metrics_or_registry`` over HTTP on ``addr:port``.

    Binds 127.0.0.1 by default (pass ``"0.0.0.0"`` or ``"::"`` deliberately to expose it);
    ``port=0`` lets the OS choose a free port, read back from :attr:`MetricsServer.port`. Serves
    on a daemon thread until :meth:`MetricsServer.stop`. Raises ``OSError`` when the address
    cannot be bound (port in use, address not on this host) and ``TypeError`` for an argument
    that is not a ``RuntimeMetrics`` or a ``CollectorRegistry``; nothing is left running then.
    """
    app = make_wsgi_app(metrics_or_registry)
    server_class = _ThreadingWSGIServer6 if ":" in addr else _ThreadingWSGIServer
    server = make_server(addr, port, app, server_class, handler_class=_QuietHandler)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.1},
        name=f"spmchain-metrics-{server.server_address[1]}",
        daemon=True,
    )
    thread.start()
    return MetricsServer(server, thread, addr)
