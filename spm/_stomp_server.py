"""Serving SPMs over VDSM's wire protocol: a STOMP 1.2 server carrying JSON-RPC 2.0.

:class:`SpmStompServer` answers what an engine sends to VDSM — ``Host.getAllTasksStatuses``,
``Task.clear``, ``Volume.create`` ... — for any number of storage pools, each served by an
:class:`~spm.SpmClient` (normally a simulator). It behaves as VDSM's ``stompserver.py`` does where
that matters to a client: CONNECTED with heart-beat negotiation (each non-zero interval raised
to at least ``min_heartbeat_ms``, 1000 in VDSM), replies sent as MESSAGE frames to every
subscriber of the request's ``reply-to`` destination, JSON-RPC errors carrying VDSM's codes.
Where VDSM merely logs, it follows STOMP 1.2 and sends an ERROR frame and closes: a malformed
frame, a version other than 1.2, a SEND to a destination nobody serves or subscribes to, a
command it does not implement (transactions, ACK/NACK).

A request finds its pool by its ``storagepoolID`` parameter (the name VDSM's API gives it),
else by the sub-destination it was sent to (``jms.topic.vdsm_requests.<pool>``), else — when
only one pool is served — that pool; otherwise it fails with VDSM's 309 (pool unknown).
Besides VDSM's verbs it answers ``StoragePool.spmStop`` / ``StoragePool.spmStart`` by taking the
SPM role away from / giving it back to the simulator, and the simulator-only
``Simulator.getLedger`` (the ledger's objects, duplicated effects and the simulator's stats).

One thread per connection does that connection's I/O; requests run on a small thread pool so a
slow SPM call never delays heart-beats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from spm._client import SpmClient
from spm._errors import SpmError, UnknownTaskError
from spm._stomp import (
    CLIENT_COMMANDS,
    DEFAULT_REPLY_DESTINATION,
    METHOD_VERBS,
    POOL_PARAM,
    POOL_UNKNOWN_CODE,
    REQUEST_QUEUE,
    RPC_INTERNAL_ERROR,
    RPC_INVALID_PARAMS,
    RPC_INVALID_REQUEST,
    RPC_METHOD_NOT_FOUND,
    RPC_PARSE_ERROR,
    ConnectionClosedError,
    Frame,
    FrameStream,
    StompProtocolError,
    parse_heartbeat,
)

log = logging.getLogger("spm.stomp.server")


def server_ssl_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A TLS context for :class:`SpmStompServer` presenting ``cert``/``key``.

    With ``ca``, clients must present a certificate signed by it (as VDSM requires of an
    engine); a client without one fails the handshake and is never served. Raises OSError or
    ``ssl.SSLError`` for unreadable or mismatched files.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca is not None:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# --------------------------------------------------------------------------------------------
# JSON-RPC
# --------------------------------------------------------------------------------------------


class _RpcError(Exception):
    """A JSON-RPC error answer: VDSM's code (or JSON-RPC's negative one) and its message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses, named tuples and mappings become objects
    (keys as text), sets sorted lists, other tuples lists, enums their values; anything else
    its ``str``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, tuple) and hasattr(value, "_asdict"):  # a NamedTuple
        return to_jsonable(value._asdict())
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        items = [to_jsonable(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    return str(value)


def _param_str(params: Mapping[str, Any], name: str, method: str) -> str:
    value = params.get(name)
    if value is None:
        raise _RpcError(
            RPC_INVALID_PARAMS,
            f"Required parameter {name} is not provided when calling {method}",
        )
    if not isinstance(value, str):
        raise _RpcError(RPC_INVALID_PARAMS, f"Parameter {name} is not string type")
    return value


def _simulator_attr(spm: object, name: str, method: str) -> Any:
    attr = getattr(spm, name, None)
    if attr is None:
        raise _RpcError(
            RPC_METHOD_NOT_FOUND,
            f"The method does not exist or is not available: {{'method': '{method}'}}",
        )
    return attr


_Handler = Callable[[SpmClient, Mapping[str, Any], str], Any]


def _task_info(spm: SpmClient, params: Mapping[str, Any], method: str) -> Any:
    task_id = _param_str(params, "taskID", method)
    info = spm.getAllTasksInfo().get(task_id)
    if info is None:
        raise UnknownTaskError(f"Task id unknown: {task_id}")
    return info


def _clear(spm: SpmClient, params: Mapping[str, Any], method: str) -> Any:
    spm.clearTask(_param_str(params, "taskID", method))
    return True


def _stop(spm: SpmClient, params: Mapping[str, Any], method: str) -> Any:
    spm.stopTask(_param_str(params, "taskID", method))
    return True


def _revert(spm: SpmClient, params: Mapping[str, Any], method: str) -> Any:
    spm.revertTask(_param_str(params, "taskID", method))
    return True


def _spm_stop(spm: SpmClient, params: Mapping[str, Any], method: str) -> Any:
    _simulator_attr(spm, "spm_stop", method)()
    return True


def _spm_start(spm: SpmClient, params: Mapping[str, Any], method: str) -> Any:
    result = _simulator_attr(spm, "spm_start", method)()
    # VDSM answers spmStart with the id of the task that acquires the role.
    return result if isinstance(result, str) else True


def _ledger(spm: SpmClient, params: Mapping[str, Any], method: str) -> Any:
    # The simulator answers objects() / duplicated_effects() itself, or through a ``ledger``.
    source = spm if hasattr(spm, "objects") else _simulator_attr(spm, "ledger", method)
    objects = _simulator_attr(source, "objects", method)
    duplicated = _simulator_attr(source, "duplicated_effects", method)
    duplicates = getattr(source, "duplicates", None)
    stats = getattr(spm, "stats", None)
    stats_value = stats() if stats is not None else {}
    as_dict = getattr(stats_value, "as_dict", None)
    return {
        "objects": to_jsonable(objects()),
        "duplicated_effects": to_jsonable(duplicated()),
        "duplicates": to_jsonable(duplicates()) if duplicates is not None else [],
        "stats": to_jsonable(as_dict() if as_dict is not None else stats_value),
    }


def _spm_status(spm: SpmClient, params: Mapping[str, Any], method: str) -> Any:
    # VDSM's SpmStatus: spmStatus is SPM, Free or Contend; no lease ids are simulated.
    is_spm = getattr(spm, "is_spm", True)
    return {"spmStatus": "SPM" if is_spm else "Free", "spmLver": -1, "spmId": -1}


_POOL_HANDLERS: dict[str, _Handler] = {
    "Host.getAllTasksStatuses": lambda spm, p, m: spm.getAllTasksStatuses(),
    "Host.getAllTasksInfo": lambda spm, p, m: spm.getAllTasksInfo(),
    "Task.getStatus": lambda spm, p, m: spm.getTaskStatus(_param_str(p, "taskID", m)),
    "Task.getInfo": _task_info,
    "Task.clear": _clear,
    "Task.stop": _stop,
    "Task.revert": _revert,
    "StoragePool.spmStop": _spm_stop,
    "StoragePool.spmStart": _spm_start,
    "StoragePool.getSpmStatus": _spm_status,
    "Simulator.getLedger": _ledger,
}


class SpmRpcDispatcher:
    """Answers JSON-RPC 2.0 messages (single or batch) for a set of pools, as VDSM would.

    Never raises for anything the message contains: every failure becomes a JSON-RPC error
    answer (parse error -32700, invalid request -32600, unknown method -32601, bad params
    -32602, an SPM error with its VDSM code, anything unexpected -32603 and logged).
    """

    def __init__(self, spms: Mapping[str, SpmClient]) -> None:
        self._spms = dict(spms)

    def handle(self, body: bytes, destination: str = REQUEST_QUEUE) -> bytes | None:
        """The encoded answer to ``body``, or None when it held only notifications."""
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
            return self._encode(
                self._error(
                    None,
                    RPC_PARSE_ERROR,
                    "Invalid JSON was received by the server. An error occurred on the server "
                    "while parsing the JSON text.",
                )
            )
        if isinstance(message, list):
            if not message:
                return self._encode(
                    self._error(
                        None, RPC_INVALID_REQUEST, "Invalid request: request batch is empty"
                    )
                )
            answers = [a for a in (self._one(m, destination) for m in message) if a is not None]
            return self._encode(answers) if answers else None
        answer = self._one(message, destination)
        return None if answer is None else self._encode(answer)

    @staticmethod
    def _encode(answer: Any) -> bytes:
        return json.dumps(answer, default=str).encode("utf-8")

    @staticmethod
    def _error(req_id: Any, code: int, message: str) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}}

    def _one(self, request: Any, destination: str) -> dict[str, Any] | None:
        if not isinstance(request, dict):
            return self._error(None, RPC_INVALID_REQUEST, "Invalid request: not an object")
        req_id = request.get("id")
        if request.get("jsonrpc") != "2.0":
            return self._error(
                req_id, RPC_INVALID_REQUEST, "Invalid request: Wrong protocol version"
            )
        method = request.get("method")
        if not isinstance(method, str):
            return self._error(
                req_id, RPC_INVALID_REQUEST, "Invalid request: missing method header in method"
            )
        params = request.get("params", {})
        if isinstance(params, list) and not params:
            params = {}
        if not isinstance(params, dict):
            return self._error(
                req_id, RPC_INVALID_PARAMS, "Invalid method parameter(s): expected named params"
            )
        try:
            result = self._call(method, params, destination)
        except _RpcError as exc:
            answer = self._error(req_id, exc.code, exc.message)
        except SpmError as exc:
            answer = self._error(req_id, exc.code, exc.message)
        except Exception as exc:
            log.exception("Internal server error in %s", method)
            answer = self._error(req_id, RPC_INTERNAL_ERROR, f"Internal JSON-RPC error: {exc}")
        else:
            answer = {"jsonrpc": "2.0", "id": req_id, "result": True if result is None else result}
        if req_id is None:
            return None  # a notification gets no answer
        return answer

    def _pool(self, params: Mapping[str, Any], destination: str) -> tuple[str, SpmClient]:
        pool = params.get(POOL_PARAM)
        if pool is None and destination.startswith(REQUEST_QUEUE + "."):
            pool = destination[len(REQUEST_QUEUE) + 1 :]
        if pool is None:
            if len(self._spms) == 1:
                return next(iter(self._spms.items()))
            raise _RpcError(
                POOL_UNKNOWN_CODE,
                f"Unknown pool id, pool not connected: no {POOL_PARAM} given and "
                f"{len(self._spms)} pools served",
            )
        spm = self._spms.get(pool) if isinstance(pool, str) else None
        if spm is None:
            raise _RpcError(POOL_UNKNOWN_CODE, f"Unknown pool id, pool not connected: {pool!r}")
        return pool, spm

    def _call(self, method: str, params: Mapping[str, Any], destination: str) -> Any:
        if method == "Host.getConnectedStoragePools":
            return sorted(self._spms)
        if method in ("Host.ping2", "Host.ping"):
            return True
        binding = METHOD_VERBS.get(method)
        handler = _POOL_HANDLERS.get(method)
        if binding is None and handler is None:
            raise _RpcError(
                RPC_METHOD_NOT_FOUND,
                f"The method does not exist or is not available: {{'method': '{method}'}}",
            )
        pool, spm = self._pool(params, destination)
        if binding is not None:
            verb_params = binding.from_wire(params)
            verb_params["spUUID"] = pool
            task_id = spm.fire(binding.verb, verb_params)
            if not isinstance(task_id, str):
                raise _RpcError(RPC_INTERNAL_ERROR, f"{binding.verb} gave no task id")
            return task_id
        assert handler is not None
        return handler(spm, params, method)


# --------------------------------------------------------------------------------------------
# STOMP
# --------------------------------------------------------------------------------------------


class _CloseWith(Exception):
    """Ends a connection after sending ``frame`` (an ERROR, or the RECEIPT of a DISCONNECT)."""

    def __init__(self, frame: Frame | None) -> None:
        super().__init__(frame.command if frame else "close")
        self.frame = frame


def _error_frame(message: str, request: Frame | None = None, detail: str = "") -> Frame:
    headers = {"message": message, "content-type": "text/plain"}
    if request is not None and "receipt" in request.headers:
        headers["receipt-id"] = request.headers["receipt"]
    return Frame("ERROR", headers, (detail or message).encode("utf-8"))


@dataclasses.dataclass(eq=False)
class _Subscription:
    connection: _Connection
    sub_id: str
    destination: str


class _Connection:
    """One client connection; its thread runs :meth:`run` until the connection ends."""

    def __init__(self, server: SpmStompServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.peer = peer
        self._sock = sock
        self.stream: FrameStream | None = None
        self.subscriptions: dict[str, _Subscription] = {}
        self._connected = False
        self._send_every = 0.0
        self._expect_every = 0.0
        self._stop = threading.Event()

    def abort(self) -> None:
        """Ask the connection to end; its thread closes it."""
        self._stop.set()
        stream = self.stream
        if stream is not None:
            stream.abort()
        else:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        """Serve the connection until it ends, whichever way: after a failed TLS handshake
        too, the server forgets it before its socket closes (a client that saw the close is
        no longer counted)."""
        stream: FrameStream | None = None
        try:
            stream = self._open()
            if stream is not None:
                self._serve(stream)
        finally:
            self.server._forget(self)
            if stream is not None:
                stream.close()
            else:
                with contextlib.suppress(OSError):
                    self._sock.close()

    def _open(self) -> FrameStream | None:
        """The connection's frame stream, after the TLS handshake when serving TLS; None when
        the handshake fails."""
        try:
            if self.server.ssl_context is not None:
                self._sock.settimeout(self.server.handshake_timeout)
                # Handshake after wrapping: a failed one leaves the socket to run() to close.
                tls = self.server.ssl_context.wrap_socket(
                    self._sock, server_side=True, do_handshake_on_connect=False
                )
                self._sock = tls
                tls.do_handshake()
            self.stream = FrameStream(self._sock, CLIENT_COMMANDS)
        except (OSError, ValueError) as exc:
            log.info("TLS handshake with %s failed: %s", self.peer, exc)
            return None
        return self.stream

    def _serve(self, stream: FrameStream) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                for frame in stream.poll(self._tick()):
                    self._handle(frame)
                now = time.monotonic()
                if self._send_every and now - stream.last_sent >= self._send_every:
                    stream.send_heartbeat()
                if self._expect_every and now - stream.last_received > 2 * self._expect_every:
                    log.info("No heart-beat from %s: closing", self.peer)
                    break
                if not self._connected and now - started > self.server.handshake_timeout:
                    raise _CloseWith(_error_frame("No CONNECT frame in time"))
        except _CloseWith as close:
            if close.frame is not None:
                self._send_and_flush(close.frame)
        except StompProtocolError as exc:
            log.info("Malformed frame from %s: %s", self.peer, exc)
            self._send_and_flush(_error_frame("Malformed frame", detail=str(exc)))
        except (ConnectionClosedError, OSError) as exc:
            log.debug("Connection from %s ended: %s", self.peer, exc)

    def _send_and_flush(self, frame: Frame) -> None:
        assert self.stream is not None
        with contextlib.suppress(ConnectionClosedError, OSError):
            self.stream.send_frame(frame)
            self.stream.flush(1.0)

    def _tick(self) -> float:
        tick = 0.25
        if self._send_every:
            tick = min(tick, self._send_every / 2)
        if self._expect_every:
            tick = min(tick, self._expect_every / 2)
        return tick

    def _handle(self, frame: Frame) -> None:
        assert self.stream is not None
        command = frame.command
        if not self._connected:
            if command not in ("CONNECT", "STOMP"):
                raise _CloseWith(_error_frame(f"Expected CONNECT, got {command}", frame))
            self._connect(frame)
            return
        if command == "SEND":
            self._send(frame)
        elif command == "SUBSCRIBE":
            destination = frame.headers.get("destination")
            sub_id = frame.headers.get("id")
            if not destination or not sub_id:
                raise _CloseWith(
                    _error_frame("Missing destination or subscription id header", frame)
                )
            if sub_id in self.subscriptions:
                raise _CloseWith(_error_frame("Subscription id already exists", frame))
            sub = _Subscription(self, sub_id, destination)
            self.subscriptions[sub_id] = sub
            self.server._subscribe(sub)
        elif command == "UNSUBSCRIBE":
            sub_id = frame.headers.get("id")
            if not sub_id:
                raise _CloseWith(_error_frame("Missing id header", frame))
            removed = self.subscriptions.pop(sub_id, None)
            if removed is not None:
                self.server._unsubscribe(removed)
        elif command == "DISCONNECT":
            receipt = frame.headers.get("receipt")
            raise _CloseWith(Frame("RECEIPT", {"receipt-id": receipt}) if receipt else None)
        elif command in ("CONNECT", "STOMP"):
            raise _CloseWith(_error_frame("Already connected", frame))
        else:
            raise _CloseWith(_error_frame(f"Unsupported command {command}", frame))
        receipt = frame.headers.get("receipt")
        if receipt:
            self.stream.send_frame(Frame("RECEIPT", {"receipt-id": receipt}))

    def _connect(self, frame: Frame) -> None:
        assert self.stream is not None
        versions = [v.strip() for v in frame.headers.get("accept-version", "1.0").split(",")]
        if "1.2" not in versions:
            error = _error_frame("Version unsupported", frame, "Supported protocol versions: 1.2")
            error.headers["version"] = "1.2"
            raise _CloseWith(error)
        cx, cy = parse_heartbeat(frame.headers.get("heart-beat"))
        floor = self.server.min_heartbeat_ms
        cx = max(cx, floor) if cx else 0
        cy = max(cy, floor) if cy else 0
        # As VDSM: the server sends every cy ms (what the client asked for) and expects the
        # client's every cx ms (what the client promised).
        self._send_every = cy / 1000.0
        self._expect_every = cx / 1000.0
        self._connected = True
        self.stream.send_frame(
            Frame(
                "CONNECTED",
                {
                    "version": "1.2",
                    "heart-beat": f"{cy},{cx}",
                    "server": "spmchain-spm",
                    "session": uuid.uuid4().hex,
                },
            )
        )

    def _send(self, frame: Frame) -> None:
        destination = frame.headers.get("destination")
        if not destination:
            raise _CloseWith(_error_frame("Missing destination header", frame))
        if destination == REQUEST_QUEUE or destination.startswith(REQUEST_QUEUE + "."):
            reply_to = frame.headers.get("reply-to") or DEFAULT_REPLY_DESTINATION
            self.server._submit_request(frame.body, destination, reply_to)
            return
        if not self.server._forward(frame, destination):
            raise _CloseWith(_error_frame(f"Subscription not available: {destination}", frame))


class SpmStompServer:
    """A STOMP 1.2 / JSON-RPC server answering VDSM's SPM verbs for ``spms`` (pool id → SPM).

    Binds ``host`` (127.0.0.1 by default) on ``port`` (0: a free one, see :attr:`port`) when
    :meth:`start` runs; with ``ssl_context`` every connection is TLS (see
    :func:`server_ssl_context`; a handshake that fails — no client certificate where one is
    required — closes the connection before any frame). :meth:`stop` closes the listener and
    every connection and waits for their threads; requests still running finish, their answers
    are dropped. Usable as a context manager.
    """

    def __init__(
        self,
        spms: Mapping[str, SpmClient],
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        *,
        min_heartbeat_ms: int = 1000,
        workers: int = 8,
        handshake_timeout: float = 10.0,
    ) -> None:
        if not spms:
            raise ValueError("spms: at least one pool to serve")
        self.dispatcher = SpmRpcDispatcher(spms)
        self.pools = sorted(spms)
        self.host = host
        self.ssl_context = ssl_context
        self.min_heartbeat_ms = min_heartbeat_ms
        self.handshake_timeout = handshake_timeout
        self._requested_port = port
        self._workers = workers
        self._lock = threading.Lock()
        self._subs: dict[str, list[_Subscription]] = {}
        self._connections: dict[_Connection, threading.Thread] = {}
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = threading.Event()
        self._port = 0

    @property
    def port(self) -> int:
        """The bound port (valid after :meth:`start`)."""
        return self._port

    @property
    def url(self) -> str:
        """``stomp://host:port``, or ``stomp+tls://host:port`` when serving TLS."""
        scheme = "stomp+tls" if self.ssl_context is not None else "stomp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self._port}"

    def start(self) -> SpmStompServer:
        """Bind and start accepting. Raises OSError when the address cannot be bound."""
        if self._listener is not None:
            raise RuntimeError("server already started")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.create_server((self.host, self._requested_port), family=family)
        listener.settimeout(0.2)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="spm-stomp-rpc")
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"spm-stomp-accept-{self._port}", daemon=True
        )
        self._accept_thread.start()
        log.info("Serving pools %s on %s", ", ".join(self.pools), self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, wait for the threads. Idempotent."""
        self._stopping.set()
        if self._listener is not None:
            # Shutting the listening socket down wakes a thread blocked in accept (Linux).
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            connections = list(self._connections.items())
        for connection, _ in connections:
            connection.abort()
        for _, thread in connections:
            thread.join(timeout)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SpmStompServer:
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connection_count(self) -> int:
        """How many client connections are open now."""
        with self._lock:
            return len(self._connections)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                time.sleep(0.05)
                continue
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = _Connection(self, sock, f"{address[0]}:{address[1]}")
            thread = threading.Thread(
                target=connection.run, name=f"spm-stomp-conn-{address[1]}", daemon=True
            )
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                self._connections[connection] = thread
            thread.start()

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.pop(connection, None)
            for sub in connection.subscriptions.values():
                self._unsubscribe_locked(sub)
            connection.subscriptions.clear()

    def _subscribe(self, sub: _Subscription) -> None:
        with self._lock:
            self._subs.setdefault(sub.destination, []).append(sub)

    def _unsubscribe(self, sub: _Subscription) -> None:
        with self._lock:
            self._unsubscribe_locked(sub)

    def _unsubscribe_locked(self, sub: _Subscription) -> None:
        subs = self._subs.get(sub.destination)
        if subs is None:
            return
        with contextlib.suppress(ValueError):
            subs.remove(sub)
        if not subs:
            del self._subs[sub.destination]

    def _subscribers(self, destination: str) -> list[_Subscription]:
        with self._lock:
            return list(self._subs.get(destination, ()))

    def _forward(self, frame: Frame, destination: str) -> bool:
        """Deliver a SEND to the subscribers of its destination; False when there are none."""
        subs = self._subscribers(destination)
        for sub in subs:
            headers = {k: v for k, v in frame.headers.items() if k not in ("receipt",)}
            headers.update(subscription=sub.sub_id, **{"message-id": uuid.uuid4().hex})
            self._deliver_to(sub, Frame("MESSAGE", headers, frame.body))
        return bool(subs)

    def _deliver_to(self, sub: _Subscription, frame: Frame) -> None:
        stream = sub.connection.stream
        if stream is None:
            return
        with contextlib.suppress(ConnectionClosedError):
            stream.send_frame(frame)

    def _submit_request(self, body: bytes, destination: str, reply_to: str) -> None:
        executor = self._executor
        if executor is None or self._stopping.is_set():
            return
        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            executor.submit(self._serve_request, body, destination, reply_to)

    def _serve_request(self, body: bytes, destination: str, reply_to: str) -> None:
        try:
            answer = self.dispatcher.handle(body, destination)
        except Exception:  # the dispatcher's bug; the executor would drop it without a word
            log.exception("Request to %s left unanswered", destination)
            return
        if answer is None:
            return
        subs = self._subscribers(reply_to)
        if not subs:
            log.warning("Attempt to reply to unknown destination %s", reply_to)
            return
        for sub in subs:
            self._deliver_to(
                sub,
                Frame(
                    "MESSAGE",
                    {
                        "destination": reply_to,
                        "content-type": "application/json",
                        "subscription": sub.sub_id,
                        "message-id": uuid.uuid4().hex,
                    },
                    answer,
                ),
            )
