"""An :class:`~spm.SpmClient` that talks to VDSM (or the served simulator) over STOMP/JSON-RPC.

The wire is VDSM's: STOMP 1.2 (``CONNECT`` with ``accept-version:1.2``, ``host`` and heart-beats;
``SUBSCRIBE`` to a reply destination unique to this connection before anything is sent; each
call a ``SEND`` of a JSON-RPC 2.0 request to ``jms.topic.vdsm_requests`` with ``reply-to``),
answers matched to calls by JSON-RPC id, the method names and parameter names of VDSM's API
schema (``Host.getAllTasksStatuses``, ``Task.clear``, ``Volume.create`` with ``storagepoolID``,
``storagedomainID`` ...). ``stomp://host:port`` is plain TCP; ``stomp+tls://host:port`` is TLS
with CA verification and, as VDSM requires, a client certificate.

The frame codec is this package's own (:mod:`spm._stomp`), not stomp.py: stomp.py's parser
accepts malformed frames silently (an unknown command is dropped, a body that overruns its
``content-length`` is cut at the next NUL), it reconnects only inside ``connect()`` rather than
after a drop, and its receive thread calls listeners in a way that makes failing every call
in flight at the moment a connection drops awkward. Here one I/O thread per connection owns the
socket, and every failure mode ends each waiting call promptly with a typed error.

Failure semantics of every call (all are :class:`~spm.SpmError` subclasses):

* :class:`NotConnectedError` (a :class:`~spm.SpmConnectionError`) — there was no connection, so
  the request was never sent. Raised at once while the client is waiting to reconnect.
* :class:`~spm.SpmConnectionError` — the connection dropped (or the server sent an ERROR frame,
  or a malformed frame) while the call was in flight; whether the SPM acted on it is unknown.
* :class:`~spm.SpmTimeoutError` — no answer within the call's timeout; the SPM may have acted.
* :class:`~spm.BadAnswerError` — an answer of the wrong shape.
* any other :class:`~spm.SpmError` — the SPM's own answer, with VDSM's code
  (``error_for_code``: 401 → ``UnknownTaskError``, 654 → ``NotSpmError`` ...).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final, cast
from urllib.parse import parse_qs, urlsplit

from spm._client import SpmClient, TaskInfo, TaskStatus
from spm._errors import (
    BadAnswerError,
    GenericError,
    SpmConnectionError,
    SpmError,
    SpmTimeoutError,
    error_for_code,
)
from spm._stomp import (
    DEFAULT_REPLY_DESTINATION,
    POOL_PARAM,
    REQUEST_QUEUE,
    SERVER_COMMANDS,
    VERB_BINDINGS,
    ConnectionClosedError,
    Frame,
    FrameStream,
    StompProtocolError,
    heartbeat_intervals,
    parse_heartbeat,
)

log = logging.getLogger("spm.stomp.client")

DEFAULT_PORT: Final = 54321
"""VDSM's port."""


class NotConnectedError(SpmConnectionError):
    """No connection to the SPM's host: the request was not sent, so nothing happened."""

    default_message = "Not connected to the SPM"


class RpcProtocolError(SpmError):
    """A JSON-RPC level error (parse error, unknown method, bad params, internal error).

    ``code`` is 100 like VDSM's general exception; ``rpc_code`` keeps JSON-RPC's negative code.
    """

    code = 100
    default_message = "JSON-RPC error"

    def __init__(self, message: str | None = None, *, rpc_code: int = 0) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_rpc_error, (self.message, self.rpc_code))


def _rebuild_rpc_error(message: str, rpc_code: int) -> RpcProtocolError:
    return RpcProtocolError(message, rpc_code=rpc_code)


class StompServerError(ConnectionError):
    """The server sent an ERROR frame; it closes the connection after one."""


# --------------------------------------------------------------------------------------------
# URLs and TLS
# --------------------------------------------------------------------------------------------


_URL_OPTIONS = frozenset({"ca", "cert", "key", "timeout", "check_hostname"})


def parse_stomp_url(url: str) -> tuple[str, int, bool, dict[str, str]]:
    """``stomp://host:port`` or ``stomp+tls://host:port[?cert=..&key=..&ca=..&timeout=..]`` as
    (host, port, tls, options). The port defaults to VDSM's 54321. Raises ValueError naming the
    URL and what is wrong with it: another scheme, no host, a bad IPv6 literal, a port that is
    not a number, out of range or 0, a user or password, an option it does not know (a
    misspelt one would be ignored), a timeout that is not a positive number of seconds."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed or bad [IPv6] literal
        raise ValueError(f"stomp URL {url!r}: bad host: {exc}") from None
    if parts.scheme not in ("stomp", "stomp+tls", "stomp+ssl"):
        raise ValueError(f"not a stomp:// or stomp+tls:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port
    except ValueError:
        text = parts.netloc.rpartition("]")[2].rpartition(":")[2]
        what = "out of range 1-65535" if text.isascii() and text.isdigit() else "not a number"
        raise ValueError(f"stomp URL {url!r}: port {text!r} is {what}") from None
    if port is None:
        port = DEFAULT_PORT
    elif port == 0:
        raise ValueError(f"stomp URL {url!r}: port 0 cannot be connected to")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"stomp URL {url!r}: a user or password is not used (TLS client "
                         "certificates authenticate: ?cert=..&key=..)")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(f"stomp URL {url!r}: the query is not name=value pairs joined by "
                         "'&'") from None
    options = {k: v[-1] for k, v in query.items()}
    unknown = sorted(set(options) - _URL_OPTIONS)
    if unknown:
        raise ValueError(f"stomp URL {url!r}: unknown option {unknown[0]!r} (known: "
                         f"{', '.join(sorted(_URL_OPTIONS))})")
    if options.get("check_hostname", "1") not in ("0", "1"):
        raise ValueError(f"stomp URL {url!r}: check_hostname must be 0 or 1")
    if "timeout" in options:
        try:
            _seconds("timeout", float(options["timeout"]))
        except ValueError:
            raise ValueError(
                f"stomp URL {url!r}: timeout {options['timeout']!r} is not a positive, finite "
                "number of seconds"
            ) from None
    return parts.hostname, port, parts.scheme != "stomp", options


def client_ssl_context(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A TLS context that verifies the server against ``ca`` (the system CAs when None) and
    presents ``cert``/``key`` as the client certificate when given. Raises ValueError naming
    the file that cannot be read or loaded."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except OSError as exc:  # ssl.SSLError too
        raise ValueError(f"ca {ca!r} cannot be loaded: {exc.strerror or exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = check_hostname
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key)
        except OSError as exc:
            files = f"cert {cert!r}" + (f" with key {key!r}" if key is not None else "")
            raise ValueError(f"{files} cannot be loaded: {exc.strerror or exc}") from None
    return ctx


def _seconds(name: str, value: float) -> float:
    """``value`` when it is a positive, finite number; ValueError naming ``name`` otherwise."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# The connection
# --------------------------------------------------------------------------------------------


class _Call:
    __slots__ = ("error", "event", "result")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.result: Any = None
        self.error: SpmError | None = None

    def succeed(self, result: Any) -> None:
        self.result = result
        self.event.set()

    def fail(self, error: SpmError) -> None:
        self.error = error
        self.event.set()


_CONNECTING, _CONNECTED, _WAITING, _CLOSED = "connecting", "connected", "waiting", "closed"


class StompRpcConnection:
    """JSON-RPC 2.0 over one STOMP 1.2 connection, reconnecting after every drop. Thread-safe.

    A background thread connects (TCP, TLS when ``ssl_context`` is given, CONNECT, SUBSCRIBE to
    a reply destination of its own), then owns the socket: it sends and checks heart-beats
    (``heartbeat_ms`` = (can send every, want every) in ms; a server silent for twice the
    negotiated interval counts as gone), and routes answers to calls by JSON-RPC id (an answer
    that does not decode as JSON is logged and dropped). When the connection fails — end of
    stream, socket error, ERROR frame, malformed frame, missed heart-beats, or any unexpected
    error on the thread — every call in flight fails at once with SpmConnectionError and the thread
    reconnects after a delay that doubles from ``reconnect_delay[0]`` to ``reconnect_delay[1]``
    seconds (with jitter). :meth:`call` raises as the module says. A ``timeout`` or
    ``connect_timeout`` that is not a positive, finite number of seconds raises ValueError.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 10.0,
        heartbeat_ms: tuple[int, int] = (5000, 5000),
        reconnect_delay: tuple[float, float] = (0.05, 5.0),
        request_destination: str = REQUEST_QUEUE,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = _seconds("timeout", timeout)
        self.connect_timeout = _seconds("connect_timeout", connect_timeout)
        self._ssl = ssl_context
        self._heartbeat = (max(heartbeat_ms[0], 0), max(heartbeat_ms[1], 0))
        self._delay_min, self._delay_max = reconnect_delay
        self._request_destination = request_destination
        connection_id = uuid.uuid4()
        self.reply_destination = f"{DEFAULT_REPLY_DESTINATION}.{connection_id}"
        """This connection's reply-to destination (unique per connection object)."""
        # JSON-RPC ids: UUIDs unique per connection (its random high 64 bits, a counter in the
        # low 64), without a uuid4 (an os.urandom call) per call.
        self._id_base = (connection_id.int >> 64) << 64
        self._req_ids = itertools.count(1)
        self._cond = threading.Condition()
        self._state = _CONNECTING
        self._stream: FrameStream | None = None
        self._calls: dict[str, _Call] = {}
        self._last_error = "not connected yet"
        self._send_every = 0.0
        self._expect_every = 0.0
        self._random = random.Random()
        self.connects = 0
        """How many times a connection was established (1 + reconnects)."""
        self._thread = threading.Thread(
            target=self._run, name=f"spm-stomp-client-{host}:{port}", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        """``host:port`` of the server."""
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        """True while a connection is up (the next call will be sent)."""
        with self._cond:
            return self._state == _CONNECTED

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a connection; True if one is up."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._state != _CONNECTED:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._state == _CLOSED:
                    return False
                self._cond.wait(remaining)
            return True

    def call(self, method: str, params: Mapping[str, Any], timeout: float | None = None) -> Any:
        """Send one request and wait for its answer's ``result``.

        While a connection attempt is under way the call waits for it (within its timeout);
        while the client waits to reconnect it fails at once with NotConnectedError.
        Parameters JSON cannot carry raise GenericError before anything is sent.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        call = _Call()
        req_id = str(uuid.UUID(int=self._id_base | next(self._req_ids), version=4))
        try:
            body = json.dumps(
                {"jsonrpc": "2.0", "method": method, "params": dict(params), "id": req_id}
            ).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise GenericError(f"{method}: parameters that JSON cannot carry: {exc}") from None
        frame = Frame(
            "SEND",
            {
                "destination": self._request_destination,
                "content-type": "application/json",
                "reply-to": self.reply_destination,
            },
            body,
        )
        with self._cond:
            while self._state != _CONNECTED:
                if self._state == _CLOSED:
                    raise NotConnectedError(f"{method}: the client is closed")
                if self._state == _WAITING:
                    raise NotConnectedError(
                        f"{method}: not connected to {self.address} ({self._last_error})"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NotConnectedError(
                        f"{method}: no connection to {self.address} within {limit:g} s"
                    )
                self._cond.wait(remaining)
            stream = self._stream
            assert stream is not None
            self._calls[req_id] = call
        try:
            stream.send_frame(frame)
        except ConnectionClosedError:
            with self._cond:
                self._calls.pop(req_id, None)
            if call.event.is_set() and call.error is not None:
                raise call.error from None
            raise NotConnectedError(f"{method}: connection to {self.address} closed") from None
        if not call.event.wait(max(deadline - time.monotonic(), 0.0)):
            with self._cond:
                self._calls.pop(req_id, None)
            if not call.event.is_set():
                raise SpmTimeoutError(f"{method}: no answer from {self.address} in {limit:g} s")
        if call.error is not None:
            raise call.error
        return call.result

    def close(self, timeout: float = 2.0) -> None:
        """Disconnect (DISCONNECT frame, best effort) and stop the thread. Calls in flight fail
        with SpmConnectionError; later calls with NotConnectedError. Idempotent."""
        with self._cond:
            if self._state == _CLOSED:
                return
            self._state = _CLOSED
            stream = self._stream
            self._cond.notify_all()
        if stream is not None:
            with contextlib.suppress(ConnectionClosedError):
                stream.send_frame(Frame("DISCONNECT", {"receipt": "close"}))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the I/O thread -----------------------------------------------------------------------

    def _closed(self) -> bool:
        with self._cond:
            return self._state == _CLOSED

    def _run(self) -> None:
        delay = self._delay_min
        while not self._closed():
            with self._cond:
                if self._state == _CLOSED:
                    break
                self._state = _CONNECTING
                self._cond.notify_all()
            try:
                stream = self._open()
            except Exception as exc:
                if isinstance(exc, OSError | StompProtocolError | ValueError):
                    reason = f"connecting failed: {exc}"
                    log.info("STOMP connection to %s failed: %s", self.address, exc)
                else:
                    reason = f"connecting failed: {_unexpected(exc)}"
                    log.exception("STOMP connection to %s failed", self.address)
                self._go_down(reason)
                self._pause(delay)
                delay = min(delay * 2, self._delay_max)
                continue
            delay = self._delay_min
            with self._cond:
                if self._state == _CLOSED:
                    stream.close()
                    break
                self._stream = stream
                self._state = _CONNECTED
                self.connects += 1
                self._cond.notify_all()
            log.info("STOMP connection to %s established", self.address)
            reason = "connection closed"
            try:
                self._pump(stream)
            except (OSError, StompProtocolError) as exc:
                reason = str(exc) or type(exc).__name__
                log.warning("STOMP connection to %s lost: %s", self.address, reason)
            except Exception as exc:
                # A bug in handling what the server sent: going on with this connection could
                # leave calls unanswered, so it is dropped as if the server had dropped it.
                reason = _unexpected(exc)
                log.exception("STOMP connection to %s dropped after an error", self.address)
            finally:
                # Down before the stream closes: a call must never find the client connected
                # on a closed stream (nor wait_connected say True for it).
                self._go_down(reason)
                stream.close()
            if not self._closed():
                self._pause(self._delay_min)
        self._go_down("the client is closed")

    def _pause(self, delay: float) -> None:
        deadline = time.monotonic() + delay * self._random.uniform(0.8, 1.2)
        with self._cond:
            while self._state != _CLOSED:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)

    def _go_down(self, reason: str) -> None:
        with self._cond:
            self._stream = None
            if self._state != _CLOSED:
                self._state = _WAITING
            self._last_error = reason
            calls, self._calls = self._calls, {}
            self._cond.notify_all()
        for call in calls.values():
            call.fail(SpmConnectionError(f"connection to {self.address} lost: {reason}"))

    def _open(self) -> FrameStream:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        stream = FrameStream(sock, SERVER_COMMANDS)
        try:
            self._handshake(stream)
        except BaseException:
            stream.close()
            raise
        return stream

    def _handshake(self, stream: FrameStream) -> None:
        mine = self._heartbeat
        stream.send_frame(
            Frame(
                "CONNECT",
                {
                    "accept-version": "1.2",
                    "host": self.host,
                    "heart-beat": f"{mine[0]},{mine[1]}",
                },
            )
        )
        deadline = time.monotonic() + self.connect_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no CONNECTED from {self.address} in {self.connect_timeout:g} s"
                )
            if self._closed():
                raise ConnectionClosedError("the client is closed")
            frames = stream.poll(min(remaining, 0.1))
            if not frames:
                continue
            frame = frames[0]
            if frame.command == "ERROR":
                raise StompServerError(_error_text(frame))
            if frame.command != "CONNECTED":
                raise StompProtocolError(f"expected CONNECTED, got {frame.command}")
            if frame.headers.get("version", "1.2") != "1.2":
                raise StompProtocolError(f"server speaks STOMP {frame.headers.get('version')}")
            theirs = parse_heartbeat(frame.headers.get("heart-beat"))
            self._send_every, self._expect_every = heartbeat_intervals(mine, theirs)
            # Subscribe before anything is sent: the server answers to subscribers only.
            stream.send_frame(
                Frame(
                    "SUBSCRIBE",
                    {"destination": self.reply_destination, "id": str(uuid.uuid4()), "ack": "auto"},
                )
            )
            for extra in frames[1:]:
                self._on_frame(extra)
            return

    def _tick(self) -> float:
        tick = 0.25
        if self._send_every:
            tick = min(tick, self._send_every / 2)
        if self._expect_every:
            tick = min(tick, self._expect_every / 2)
        return tick

    def _pump(self, stream: FrameStream) -> None:
        while True:
            if self._closed():
                stream.flush(0.5)
                return
            for frame in stream.poll(self._tick()):
                self._on_frame(frame)
            now = time.monotonic()
            if self._send_every and now - stream.last_sent >= self._send_every:
                stream.send_heartbeat()
            if self._expect_every and now - stream.last_received > 2 * self._expect_every:
                raise TimeoutError(f"no heart-beat from the server in {2 * self._expect_every:g} s")

    def _on_frame(self, frame: Frame) -> None:
        if frame.command == "MESSAGE":
            self._on_message(frame)
        elif frame.command == "ERROR":
            raise StompServerError(f"server sent ERROR: {_error_text(frame)}")
        elif frame.command != "RECEIPT":
            raise StompProtocolError(f"unexpected {frame.command} frame")

    def _on_message(self, frame: Frame) -> None:
        try:
            answer = json.loads(frame.body)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
            log.warning("Answer from %s that is not JSON: %r", self.address, frame.body[:200])
            return
        for response in answer if isinstance(answer, list) else [answer]:
            if not isinstance(response, dict):
                log.warning("Answer from %s of the wrong shape: %r", self.address, response)
                continue
            req_id = response.get("id")
            with self._cond:
                call = self._calls.pop(req_id, None) if isinstance(req_id, str) else None
            if call is None:
                if req_id is None and "error" in response:
                    log.warning("Error answer without id from %s: %r", self.address, response)
                continue
            if "error" in response:
                call.fail(_error_from(response["error"]))
            elif "result" in response:
                call.succeed(response["result"])
            else:
                call.fail(BadAnswerError(f"answer with neither result nor error: {response!r}"))


def _unexpected(exc: Exception) -> str:
    return f"unexpected {type(exc).__name__}" + (f": {exc}" if str(exc) else "")


def _error_text(frame: Frame) -> str:
    message = frame.headers.get("message", "")
    body = frame.body.decode("utf-8", "replace").strip()
    if body and body != message:
        return f"{message}: {body}" if message else body
    return message or "ERROR frame"


def _error_from(error: Any) -> SpmError:
    if not isinstance(error, dict) or not isinstance(error.get("code"), int):
        return BadAnswerError(f"JSON-RPC error of the wrong shape: {error!r}")
    code = cast(int, error["code"])
    message = str(error.get("message", ""))
    if code < 0:
        return RpcProtocolError(f"{message} (JSON-RPC {code})", rpc_code=code)
    return error_for_code(code, message or None)


# --------------------------------------------------------------------------------------------
# Answer shapes
# --------------------------------------------------------------------------------------------

_STATES: Final = frozenset({"init", "running", "finished", "aborting", "cleaning", "unknown"})
_RESULTS: Final = frozenset({"success", "cleanSuccess", "cleanFailure", ""})


def _task_status(value: Any) -> TaskStatus:
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("taskID"), str)
        or value.get("taskState") not in _STATES
        or value.get("taskResult") not in _RESULTS
        or not isinstance(value.get("code"), int)
        or not isinstance(value.get("message"), str)
    ):
        raise BadAnswerError(f"not a task status: {value!r}")
    return TaskStatus(
        taskID=value["taskID"],
        taskState=value["taskState"],
        taskResult=value["taskResult"],
        code=value["code"],
        message=value["message"],
    )


def _task_info(value: Any) -> TaskInfo:
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("id"), str)
        or not isinstance(value.get("verb"), str)
    ):
        raise BadAnswerError(f"not a task info: {value!r}")
    info = TaskInfo(id=value["id"], verb=value["verb"])
    params = value.get("params")
    if isinstance(params, dict):
        info["params"] = params  # the simulator's extension
    return info


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise BadAnswerError(f"{what}: expected an object by task id, got {value!r}"[:300])
    return value


# --------------------------------------------------------------------------------------------
# The SpmClient
# --------------------------------------------------------------------------------------------


class StompSpmClient(SpmClient):
    """The SPM of storage pool ``pool`` at ``url`` (``stomp://`` or ``stomp+tls://``).

    Every call carries ``storagepoolID`` so one server can serve many pools; VDSM's
    ``Host.*`` and ``Task.*`` methods take no pool, and VDSM ignores the extra parameter
    (outside its developer-only strict API mode). ``fire`` maps VDSM's verb names and ``hsm.py``
    parameter names to the API's (``createVolume`` → ``Volume.create``, ``sdUUID`` →
    ``storagedomainID`` ..., see :data:`spm._stomp.VERB_BINDINGS`); a verb containing a dot is
    sent as that JSON-RPC method unchanged.

    ``timeout`` bounds every call (ValueError unless it is a positive, finite number of
    seconds). For TLS give ``ca`` (server verification), ``cert`` and
    ``key`` (the client certificate VDSM requires), or a ready ``ssl_context``; options can also
    come from the URL's query (``?ca=..&cert=..&key=..&timeout=..``). Pass ``connection`` to
    share one :class:`StompRpcConnection` between the clients of several pools (it is then not
    closed by :meth:`close`). Thread-safe. A URL that cannot be used, or TLS files that cannot
    be loaded, raise ValueError naming the URL and the problem.
    """

    def __init__(
        self,
        url: str,
        pool: str,
        *,
        timeout: float | None = None,
        connect_timeout: float = 10.0,
        heartbeat_ms: tuple[int, int] = (5000, 5000),
        reconnect_delay: tuple[float, float] = (0.05, 5.0),
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        check_hostname: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        connection: StompRpcConnection | None = None,
    ) -> None:
        host, port, tls, options = parse_stomp_url(url)
        self.pool = pool
        self.url = url
        if timeout is None:
            timeout = float(options.get("timeout", 30.0))
        self.timeout = _seconds("timeout", timeout)
        if connection is not None:
            self._connection = connection
            self._owns_connection = False
            return
        if tls and ssl_context is None:
            try:
                ssl_context = client_ssl_context(
                    ca or options.get("ca"),
                    cert or options.get("cert"),
                    key or options.get("key"),
                    check_hostname=check_hostname and options.get("check_hostname", "1") != "0",
                )
            except ValueError as exc:
                raise ValueError(f"stomp URL {url!r}: {exc}") from None
        self._connection = StompRpcConnection(
            host,
            port,
            ssl_context=ssl_context if tls else None,
            timeout=timeout,
            connect_timeout=connect_timeout,
            heartbeat_ms=heartbeat_ms,
            reconnect_delay=reconnect_delay,
        )
        self._owns_connection = True

    @property
    def connection(self) -> StompRpcConnection:
        """The STOMP connection this client sends on."""
        return self._connection

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the connection to be up; True if it is."""
        return self._connection.wait_connected(timeout)

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call any JSON-RPC ``method`` for this pool (``storagepoolID`` added); its result."""
        wire = dict(params or {})
        wire.setdefault(POOL_PARAM, self.pool)
        return self._connection.call(method, wire, self.timeout)

    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        binding = VERB_BINDINGS.get(verb)
        if binding is not None:
            method, wire = binding.method, binding.to_wire(params)
        elif "." in verb:
            method, wire = verb, dict(params)
        else:
            raise GenericError(f"Unknown verb: {verb}")
        if wire.setdefault(POOL_PARAM, self.pool) != self.pool:
            raise GenericError(f"{verb}: pool {wire[POOL_PARAM]!r} is not this SPM's {self.pool!r}")
        task_id = self._connection.call(method, wire, self.timeout)
        if not isinstance(task_id, str) or not task_id:
            raise BadAnswerError(f"{method}: expected a task id, got {task_id!r}")
        return task_id

    def getAllTasksStatuses(self) -> dict[str, TaskStatus]:
        result = _mapping(self.call("Host.getAllTasksStatuses"), "getAllTasksStatuses")
        return {task_id: _task_status(status) for task_id, status in result.items()}

    def getAllTasksInfo(self) -> dict[str, TaskInfo]:
        result = _mapping(self.call("Host.getAllTasksInfo"), "getAllTasksInfo")
        return {task_id: _task_info(info) for task_id, info in result.items()}

    def getTaskStatus(self, task_id: str) -> TaskStatus:
        return _task_status(self.call("Task.getStatus", {"taskID": task_id}))

    def clearTask(self, task_id: str) -> None:
        self.call("Task.clear", {"taskID": task_id})

    def stopTask(self, task_id: str) -> None:
        self.call("Task.stop", {"taskID": task_id})

    def revertTask(self, task_id: str) -> None:
        self.call("Task.revert", {"taskID": task_id})

    def spmStop(self) -> None:
        """VDSM's ``StoragePool.spmStop``: this host gives up the SPM role of the pool."""
        self.call("StoragePool.spmStop")

    def spmStart(self) -> None:
        """VDSM's ``StoragePool.spmStart``: this host takes the SPM role of the pool."""
        self.call(
            "StoragePool.spmStart",
            {"prevID": -1, "prevLver": "-1", "enableScsiFencing": "false"},
        )

    def getLedger(self) -> dict[str, Any]:
        """The served simulator's ledger (``Simulator.getLedger``, not a VDSM verb):
        ``{"objects": [...], "duplicated_effects": n, "duplicates": [...], "stats": {...}}``,
        each object as the simulator describes it (``kind``, ``sd_uuid``, ``img_uuid``,
        ``vol_uuid``, ``task_id``, ``verb`` ...). A real VDSM answers -32601
        (RpcProtocolError)."""
        result = self.call("Simulator.getLedger")
        if not isinstance(result, dict):
            raise BadAnswerError(f"Simulator.getLedger: expected an object, got {result!r}")
        return result

    def ledger_summary(self) -> dict[str, Any]:
        """The same as :meth:`getLedger` (the name the loadtest looks for)."""
        return self.getLedger()

    def close(self) -> None:
        """Close the connection (unless it was given to the constructor). Idempotent."""
        if self._owns_connection:
            self._connection.close()


def client_for_url(url: str, pool: str, **options: Any) -> SpmClient:
    """The SpmClient for ``pool`` behind ``url``: a :class:`StompSpmClient` for ``stomp://``
    and ``stomp+tls://`` URLs (``options`` go to its constructor). Raises ValueError naming the
    URL for any other URL, one :func:`parse_stomp_url` refuses, or TLS files that cannot be
    loaded."""
    return StompSpmClient(url, pool, **options)


def connected_pools(url: str, *, timeout: float = 10.0, **options: Any) -> list[str]:
    """The pools the server at ``url`` serves (VDSM's ``Host.getConnectedStoragePools``).

    Raises SpmError subclasses as any call does (NotConnectedError when nothing listens there).
    """
    client = StompSpmClient(url, "", timeout=timeout, **options)
    try:
        client.wait_connected(timeout)
        pools = client.connection.call("Host.getConnectedStoragePools", {}, timeout)
    finally:
        client.close()
    if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
        raise BadAnswerError(f"Host.getConnectedStoragePools: {pools!r}")
    return pools
