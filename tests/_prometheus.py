"""A real Prometheus server for tests: started on 127.0.0.1, scraping given targets, then stopped.

Uses the ``prometheus`` binary of Debian's ``prometheus`` package (``.ci/run`` installs it). The
server gets a free port of its own, a config file and a TSDB directory under the test's temporary
directory, so it never depends on or collides with a system Prometheus on :9090.

Typical use, in a test module::

    @pytest.fixture
    def prometheus_scraping(tmp_path):
        with PrometheusLauncher(tmp_path) as launch:
            yield launch                      # launch("127.0.0.1:PORT") -> PrometheusServer

    def test_x(prometheus_scraping):
        prom = prometheus_scraping(f"127.0.0.1:{metrics_server.port}")
        prom.wait_for("spmchain_chains_ended_total")

The target can be any ``host:port`` serving ``/metrics``: a ``MetricsServer`` or a running
runtime's metrics port.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PROMETHEUS: str | None = shutil.which("prometheus")
"""Path of the ``prometheus`` binary, or None when it is not installed."""

SKIP_REASON = (
    "the prometheus binary is not installed (Debian package 'prometheus'; .ci/run installs it)"
)

Sample = dict[str, Any]
"""One element of an instant vector: ``{"metric": {labels}, "value": [ts, "value"]}``."""

_POLL_S = 0.1
_START_ATTEMPTS = 3


class PrometheusError(RuntimeError):
    """Prometheus did not start, did not answer, or refused a query (the message says which)."""


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait(seconds: float) -> None:
    """Pause between two polls of an external process (nothing in-process to synchronise on)."""
    threading.Event().wait(seconds)


class PrometheusServer:
    """A Prometheus process started by :func:`start_prometheus`; stop it with :meth:`stop`."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        """The last lines Prometheus wrote (for failure messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _get(self, path: str, params: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise PrometheusError(f"GET {url}: HTTP {e.code}: {body}") from None

    def query(self, promql: str) -> list[Sample]:
        """Evaluate ``promql`` now through ``/api/v1/query``; returns the instant vector.

        Raises :class:`PrometheusError` when Prometheus refuses the query (bad PromQL) or the
        result is not a vector.
        """
        answer = self._get("/api/v1/query", {"query": promql})
        if answer.get("status") != "success":
            raise PrometheusError(f"query {promql!r}: {answer}")
        data = answer["data"]
        if data["resultType"] != "vector":
            raise PrometheusError(f"query {promql!r}: {data['resultType']}, not a vector")
        result: list[Sample] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their health and last error."""
        answer = self._get("/api/v1/targets")
        active: list[dict[str, Any]] = answer["data"]["activeTargets"]
        return active

    def wait_for(
        self,
        promql: str,
        until: Callable[[list[Sample]], bool] = bool,
        timeout: float = 30.0,
        between: Callable[[], None] | None = None,
    ) -> list[Sample]:
        """Query ``promql`` until ``until(result)`` holds (default: the result is not empty).

        ``between`` runs before each attempt (e.g. to keep recording events while Prometheus
        scrapes). Raises ``TimeoutError`` after ``timeout`` seconds with the last result, the
        scrape targets' health and the end of Prometheus' log.
        """
        deadline = time.monotonic() + timeout
        result: list[Sample] = []
        while True:
            if between is not None:
                between()
            result = self.query(promql)
            if until(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{promql!r} did not reach the expected result within {timeout}s; last "
                    f"result {result}; targets {self.targets()}; log:\n{self.log_tail()}"
                )
            _wait(_POLL_S)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the process by its pid and wait for it; kill it if it outlives ``timeout``."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def _write_config(path: Path, targets: Sequence[str], scrape_interval: str) -> None:
    # JSON is YAML: no YAML library needed.
    config = {
        "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval},
        "scrape_configs": [
            {
                "job_name": "spmchain",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(json.dumps(config, indent=2))


def start_prometheus(
    targets: Sequence[str],
    workdir: Path,
    *,
    scrape_interval: str = "250ms",
    startup_timeout: float = 30.0,
) -> PrometheusServer:
    """Start Prometheus on 127.0.0.1 (free port) scraping ``targets`` (``host:port`` each).

    Config, TSDB and log live under ``workdir``. Returns once ``/-/ready`` answers. If the
    process exits during start-up (e.g. its port was taken meanwhile) it is retried on another
    port, up to 3 times; then raises :class:`PrometheusError` with the log. Raises
    ``TimeoutError`` (after stopping the process) when it is not ready within
    ``startup_timeout``.
    """
    if PROMETHEUS is None:
        raise PrometheusError(SKIP_REASON)
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "prometheus.yml"
    _write_config(config_path, targets, scrape_interval)
    last_log = ""
    for attempt in range(_START_ATTEMPTS):
        port = free_port()
        log_path = workdir / f"prometheus-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = PrometheusServer(process, port, log_path)
        try:
            if _wait_ready(server, startup_timeout):
                return server
        except BaseException:
            server.stop()
            raise
        last_log = server.log_tail()
        server.stop()
    raise PrometheusError(
        f"prometheus exited during start-up {_START_ATTEMPTS} times; last log:\n{last_log}"
    )


def _wait_ready(server: PrometheusServer, timeout: float) -> bool:
    """True once ``/-/ready`` answers 200; False if the process exits first; TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(server.url + "/-/ready", timeout=1.0) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"prometheus not ready within {timeout}s; log:\n{server.log_tail()}")
        _wait(_POLL_S)


class PrometheusLauncher:
    """Starts Prometheus servers on demand and stops every one of them on exit.

    ``launch("127.0.0.1:PORT")`` returns a ready :class:`PrometheusServer` scraping that target;
    each gets its own directory under ``workdir``. Use it as a context manager (or call
    :meth:`close`) so no Prometheus outlives the test, whatever the test's outcome.
    """

    def __init__(self, workdir: Path, scrape_interval: str = "250ms") -> None:
        self._workdir = workdir
        self._scrape_interval = scrape_interval
        self._servers: list[PrometheusServer] = []

    def __call__(self, *targets: str) -> PrometheusServer:
        server = start_prometheus(
            targets,
            self._workdir / f"prometheus-{len(self._servers)}",
            scrape_interval=self._scrape_interval,
        )
        self._servers.append(server)
        return server

    def close(self) -> None:
        """Stop every server started, in reverse order."""
        while self._servers:
            self._servers.pop().stop()

    def __enter__(self) -> PrometheusLauncher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
