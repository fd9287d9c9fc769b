"""Prometheus metrics of an spmchain runtime, on a registry of its own.

``RuntimeMetrics`` holds every metric (``spmchain_*``); ``start_metrics_server`` serves them on
127.0.0.1 by default; ``make_wsgi_app`` mounts them in a host web server.
"""

from metrics._exposition import MetricsServer, make_wsgi_app, start_metrics_server
from metrics._metrics import (
    ENDED_SUCCESSFULLY,
    ENDED_WITH_FAILURE,
    OUTCOMES,
    Outcome,
    RuntimeMetrics,
)

__all__ = [
    "ENDED_SUCCESSFULLY",
    "ENDED_WITH_FAILURE",
    "OUTCOMES",
    "MetricsServer",
    "Outcome",
    "RuntimeMetrics",
    "make_wsgi_app",
    "start_metrics_server",
]
