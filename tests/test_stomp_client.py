"""StompSpmClient: VDSM's calls over STOMP, answers matched by id, failures typed and prompt."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme
from _spm_server import FakeSpm

from spm._errors import (
    BadAnswerError,
    GenericError,
    NotSpmError,
    SpmConnectionError,
    SpmTimeoutError,
    TaskStateError,
    UnknownTaskError,
)
from spm._stomp import Frame, FrameStream
from spm._stomp_client import (
    NotConnectedError,
    RpcProtocolError,
    StompRpcConnection,
    StompSpmClient,
    client_for_url,
    connected_pools,
    parse_stomp_url,
)
from spm._stomp_server import SpmStompServer, server_ssl_context

FAST: dict[str, Any] = {
    "heartbeat_ms": (0, 0),
    "reconnect_delay": (0.02, 0.2),
    "connect_timeout": 2.0,
}


@pytest.fixture
def fakes() -> dict[str, FakeSpm]:
    return {"pool-a": FakeSpm("pool-a"), "pool-b": FakeSpm("pool-b")}


@pytest.fixture
def server(fakes: dict[str, FakeSpm]) -> Iterator[SpmStompServer]:
    with SpmStompServer(fakes, min_heartbeat_ms=50) as srv:
        yield srv


@pytest.fixture
def client(server: SpmStompServer) -> Iterator[StompSpmClient]:
    c = StompSpmClient(server.url, "pool-a", timeout=5.0, **FAST)
    yield c
    c.close()


# --------------------------------------------------------------------------------------------
# A scripted raw server, for misbehaviour the real server never shows
# --------------------------------------------------------------------------------------------


class RawServer:
    """Accepts connections on 127.0.0.1 and runs ``script(conn, reader)`` for each, in a thread."""

    def __init__(self, script: Callable[[socket.socket, RawServer], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"stomp://127.0.0.1:{self.port}"
        self.script = script
        self.conns: list[socket.socket] = []
        self.buffers: dict[int, bytearray] = {}
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.script(conn, self)
        except OSError:
            pass

    def read_frame(self, conn: socket.socket) -> bytes:
        """The next client frame up to and including its NUL, heart-beats skipped (the frames
        these tests read carry no NUL in their bodies)."""
        buf = self.buffers.setdefault(conn.fileno(), bytearray())
        while True:
            del buf[: len(buf) - len(buf.lstrip(b"\r\n"))]
            end = buf.find(b"\x00")
            if end >= 0:
                frame = bytes(buf[: end + 1])
                del buf[: end + 1]
                return frame
            chunk = conn.recv(65536)
            if not chunk:
                raise ConnectionError("client closed")
            buf += chunk

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def connected(heart_beat: str = "0,0") -> bytes:
    return f"CONNECTED\nversion:1.2\nheart-beat:{heart_beat}\n\n\x00".encode()


@pytest.fixture
def raw_servers() -> Iterator[list[RawServer]]:
    servers: list[RawServer] = []
    yield servers
    for srv in servers:
        srv.close()


# --------------------------------------------------------------------------------------------
# Calls and answers
# --------------------------------------------------------------------------------------------


def test_fire_sends_vdsm_method_and_names_and_returns_the_task_id(
    client: StompSpmClient, fakes: dict[str, FakeSpm]
) -> None:
    params = {"sdUUID": "sd", "imgUUID": "img", "volUUID": "vol", "size": "1024", "desc": ""}
    task_id = client.fire("createVolume", params)
    verb, got = fakes["pool-a"].fired[0]
    assert verb == "createVolume"
    assert got == {**params, "spUUID": "pool-a"}
    assert client.getTaskStatus(task_id)["taskID"] == task_id
    assert fakes["pool-b"].fired == []


def test_task_verbs_round_trip(client: StompSpmClient, fakes: dict[str, FakeSpm]) -> None:
    task_id = client.fire("deleteImage", {"sdUUID": "sd", "imgUUID": "img"})
    statuses = client.getAllTasksStatuses()
    assert statuses[task_id] == {
        "taskID": task_id,
        "taskState": "finished",
        "taskResult": "success",
        "code": 0,
        "message": "1 jobs completed successfully",
    }
    info = client.getAllTasksInfo()
    assert list(info) == [task_id]
    assert (info[task_id]["id"], info[task_id]["verb"]) == (task_id, "deleteImage")
    client.stopTask(task_id)
    client.revertTask(task_id)
    client.clearTask(task_id)
    assert client.getAllTasksStatuses() == {}


def test_vdsm_error_codes_become_the_same_typed_errors(
    client: StompSpmClient, fakes: dict[str, FakeSpm]
) -> None:
    with pytest.raises(UnknownTaskError) as unknown:
        client.getTaskStatus("no-such-task")
    assert unknown.value.code == 401
    assert "Task id unknown" in unknown.value.message
    fakes["pool-a"].tasks["t"] = {
        "taskID": "t",
        "taskState": "running",
        "taskResult": "",
        "code": 0,
        "message": "",
    }
    fakes["pool-a"].verbs["t"] = "copyImage"
    with pytest.raises(TaskStateError):
        client.clearTask("t")
    with pytest.raises(GenericError, match="Unknown verb"):
        client.fire("noSuchVerb", {})
    with pytest.raises(RpcProtocolError) as rpc:
        client.fire("Host.noSuchVerb", {})
    assert rpc.value.rpc_code == -32601


def test_spm_stop_gives_654_until_spm_start(client: StompSpmClient) -> None:
    client.spmStop()
    with pytest.raises(NotSpmError) as refused:
        client.getAllTasksStatuses()
    assert refused.value.code == 654
    client.spmStart()
    assert client.getAllTasksStatuses() == {}


def test_answer_of_the_wrong_shape_fails_the_call(
    client: StompSpmClient, fakes: dict[str, FakeSpm]
) -> None:
    fakes["pool-a"].answer_override = {"t": {"taskID": "t", "taskState": "bogus"}}
    with pytest.raises(BadAnswerError):
        client.getAllTasksStatuses()
    fakes["pool-a"].answer_override = ["not", "a", "map"]
    with pytest.raises(BadAnswerError):
        client.getAllTasksStatuses()
    fakes["pool-a"].answer_override = None
    assert client.getAllTasksStatuses() == {}


def test_ledger_over_the_wire(client: StompSpmClient) -> None:
    task_id = client.fire("createVolume", {"sdUUID": "s", "imgUUID": "i", "volUUID": "v"})
    ledger = client.getLedger()
    assert ledger["objects"] == [{"task": task_id, "verb": "createVolume"}]
    assert ledger["duplicated_effects"] == 0


def test_concurrent_callers_each_get_their_own_answer(
    client: StompSpmClient, fakes: dict[str, FakeSpm]
) -> None:
    task_ids = [fakes["pool-a"].fire("deleteImage", {}) for _ in range(40)]

    def check(task_id: str) -> bool:
        return all(client.getTaskStatus(task_id)["taskID"] == task_id for _ in range(10))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, task_ids, timeout=60))


def test_clients_of_two_pools_share_a_server(
    server: SpmStompServer, fakes: dict[str, FakeSpm]
) -> None:
    a = StompSpmClient(server.url, "pool-a", **FAST)
    b = StompSpmClient(server.url, "pool-b", connection=a.connection)
    try:
        task_b = b.fire("deleteImage", {"sdUUID": "s", "imgUUID": "i"})
        assert list(b.getAllTasksStatuses()) == [task_b]
        assert a.getAllTasksStatuses() == {}
        assert connected_pools(server.url, **FAST) == ["pool-a", "pool-b"]
    finally:
        b.close()
        a.close()


def test_url_parsing_and_factory() -> None:
    assert parse_stomp_url("stomp://127.0.0.1:1234") == ("127.0.0.1", 1234, False, {})
    assert parse_stomp_url("stomp+tls://h?ca=/x") == ("h", 54321, True, {"ca": "/x"})
    with pytest.raises(ValueError):
        parse_stomp_url("http://h:1")
    with pytest.raises(ValueError):
        client_for_url("sim://", "p")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0, -1.0])
def test_timeouts_that_are_not_positive_and_finite_are_refused_by_name(
    server: SpmStompServer, value: float
) -> None:
    with pytest.raises(ValueError, match=r"^timeout must be"):
        StompSpmClient(server.url, "pool-a", timeout=value, **FAST)
    with pytest.raises(ValueError, match=r"^connect_timeout must be"):
        StompSpmClient(server.url, "pool-a", **{**FAST, "connect_timeout": value})
    with pytest.raises(ValueError, match="timeout"):
        StompSpmClient(f"{server.url}?timeout={value}", "pool-a", **FAST)
    shared = StompRpcConnection("127.0.0.1", server.port, heartbeat_ms=(0, 0))
    try:
        with pytest.raises(ValueError, match=r"^timeout must be"):
            StompSpmClient(server.url, "pool-a", timeout=value, connection=shared)
    finally:
        shared.close()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("stomp://h:99999", "port '99999' is out of range 1-65535"),
        ("stomp://[::1]:70000", "port '70000' is out of range 1-65535"),
        ("stomp://h:abc", "port 'abc' is not a number"),
        ("stomp://h:-1", "port '-1' is not a number"),
        ("stomp://h:0", "port 0 cannot be connected to"),
        ("stomp://[::1", "bad host: Invalid IPv6 URL"),
        ("stomp://h:1?timeout=x", "timeout 'x' is not a positive, finite number of seconds"),
        ("stomp://h:1?timeout=nan", "timeout 'nan' is not a positive"),
        ("stomp+tls://h:1?ca=/nonexistent", "ca '/nonexistent' cannot be loaded: No such file"),
        ("stomp+tls://h:1?cert=/nonexistent", "cert '/nonexistent' cannot be loaded: No such"),
        ("stomp://h:1?tiemout=5", "unknown option 'tiemout' (known: ca, cert, check_hostname"),
        ("stomp://h:1?timeout", "the query is not name=value pairs"),
        ("stomp://u:pw@h:1", "a user or password is not used"),
        ("stomp+tls://h:1?check_hostname=no", "check_hostname must be 0 or 1"),
    ],
)
def test_a_url_that_cannot_be_used_is_refused_naming_it_and_the_problem(
    url: str, problem: str
) -> None:
    with pytest.raises(ValueError) as refused:
        client_for_url(url, "p")
    assert str(refused.value).startswith(f"stomp URL {url!r}: {problem}")
    if "tls" not in url:
        with pytest.raises(ValueError, match=r"^stomp URL"):
            parse_stomp_url(url)


# --------------------------------------------------------------------------------------------
# Failures: every call ends, with the right error, promptly
# --------------------------------------------------------------------------------------------


def test_nothing_listening_fails_fast_with_not_connected(raw_servers: list[RawServer]) -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # a port where nothing listens
    client = StompSpmClient(f"stomp://127.0.0.1:{port}", "p", timeout=5.0, **FAST)
    try:
        started = time.monotonic()
        with pytest.raises(NotConnectedError):
            client.getAllTasksStatuses()
        with pytest.raises(NotConnectedError):
            client.getAllTasksStatuses()
        assert time.monotonic() - started < 3
    finally:
        client.close()


def test_call_times_out_when_the_server_never_answers(raw_servers: list[RawServer]) -> None:
    def silent(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        conn.sendall(connected())
        while True:
            srv.read_frame(conn)  # read requests, answer none

    srv = RawServer(silent)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", timeout=0.3, **FAST)
    try:
        assert client.wait_connected(5)
        for call in (
            client.getAllTasksStatuses,
            client.getAllTasksInfo,
            lambda: client.getTaskStatus("t"),
            lambda: client.clearTask("t"),
            lambda: client.stopTask("t"),
            lambda: client.revertTask("t"),
            lambda: client.fire("createVolume", {}),
        ):
            started = time.monotonic()
            with pytest.raises(SpmTimeoutError):
                call()
            assert 0.25 < time.monotonic() - started < 3
    finally:
        client.close()


def test_malformed_frame_from_server_fails_the_call_with_connection_error(
    raw_servers: list[RawServer],
) -> None:
    def garbage(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        conn.sendall(connected())
        srv.read_frame(conn)  # SUBSCRIBE
        srv.read_frame(conn)  # SEND
        conn.sendall(b"MESSAGE\ncontent-length:3\n\nabcdef\x00")  # body overruns its length
        srv.read_frame(conn)

    srv = RawServer(garbage)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", timeout=10.0, **FAST)
    try:
        started = time.monotonic()
        with pytest.raises(SpmConnectionError, match="not followed by NUL"):
            client.getAllTasksStatuses()
        assert time.monotonic() - started < 3
    finally:
        client.close()


def test_error_frame_from_server_fails_the_call_with_its_message(
    raw_servers: list[RawServer],
) -> None:
    def refuse(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        conn.sendall(connected())
        srv.read_frame(conn)
        srv.read_frame(conn)
        conn.sendall(b"ERROR\nmessage:go away\ncontent-length:0\n\n\x00")
        conn.close()

    srv = RawServer(refuse)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", timeout=10.0, **FAST)
    try:
        with pytest.raises(SpmConnectionError, match="go away"):
            client.getAllTasksStatuses()
    finally:
        client.close()


def test_version_refused_at_connect_is_a_connection_error(raw_servers: list[RawServer]) -> None:
    def old(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        conn.sendall(b"ERROR\nmessage:Version unsupported\n\n\x00")
        conn.close()

    srv = RawServer(old)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", timeout=5.0, **FAST)
    try:
        with pytest.raises(NotConnectedError, match="Version unsupported"):
            client.getAllTasksInfo()
    finally:
        client.close()


def test_client_connects_with_vdsm_headers_and_sends_heartbeats(
    raw_servers: list[RawServer],
) -> None:
    seen: dict[str, bytes] = {}
    done = threading.Event()

    def watch(conn: socket.socket, srv: RawServer) -> None:
        seen["connect"] = srv.read_frame(conn)
        conn.sendall(connected("0,40"))  # the server wants a heart-beat every 40 ms
        seen["subscribe"] = srv.read_frame(conn)
        newlines = 0
        while newlines < 3:  # the client sends nothing but heart-beats now
            chunk = conn.recv(100)
            if not chunk or chunk.strip(b"\n"):
                return
            newlines += chunk.count(b"\n")
        done.set()

    srv = RawServer(watch)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", heartbeat_ms=(40, 0), reconnect_delay=(0.02, 0.2))
    try:
        assert done.wait(5), "no heart-beats arrived"
        connect = seen["connect"].decode()
        assert connect.startswith("CONNECT\n")
        assert "accept-version:1.2\n" in connect
        assert "host:127.0.0.1\n" in connect
        assert "heart-beat:40,0\n" in connect
        subscribe = seen["subscribe"].decode()
        assert subscribe.startswith("SUBSCRIBE\n")
        assert f"destination:{client.connection.reply_destination}\n" in subscribe
        assert client.connection.reply_destination.startswith("jms.topic.vdsm_responses.")
    finally:
        client.close()


def test_silent_server_is_declared_gone_after_missed_heartbeats(
    raw_servers: list[RawServer],
) -> None:
    def mute(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        conn.sendall(connected("50,0"))  # promises a heart-beat every 50 ms, never sends one
        while True:
            srv.read_frame(conn)

    srv = RawServer(mute)
    raw_servers.append(srv)
    client = StompSpmClient(
        srv.url, "p", timeout=20.0, heartbeat_ms=(0, 50), reconnect_delay=(5.0, 5.0)
    )
    try:
        started = time.monotonic()
        with pytest.raises(SpmConnectionError, match="heart-beat"):
            client.getAllTasksStatuses()
        assert time.monotonic() - started < 3
    finally:
        client.close()


def test_in_flight_calls_fail_at_once_when_the_connection_drops(
    raw_servers: list[RawServer],
) -> None:
    got_requests = threading.Event()
    drop = threading.Event()

    def drops(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        conn.sendall(connected())
        srv.read_frame(conn)
        for _ in range(4):
            srv.read_frame(conn)
        got_requests.set()
        drop.wait(10)
        conn.close()

    srv = RawServer(drops)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", timeout=30.0, **FAST)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client.getAllTasksStatuses) for _ in range(4)]
            assert got_requests.wait(5)
            dropped_at = time.monotonic()
            drop.set()
            for future in futures:
                with pytest.raises(SpmConnectionError):
                    future.result(timeout=5)
            assert time.monotonic() - dropped_at < 2
    finally:
        client.close()


def answer_frame(reply_to: str, body: bytes) -> bytes:
    head = f"MESSAGE\ndestination:{reply_to}\nsubscription:s\ncontent-length:{len(body)}\n\n"
    return head.encode() + body + b"\x00"


def test_answer_nested_too_deep_to_decode_is_dropped_and_the_connection_serves_on(
    raw_servers: list[RawServer],
) -> None:
    def deep_then_good(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        conn.sendall(connected())
        subscribe = srv.read_frame(conn).decode()
        reply_to = subscribe.split("destination:")[1].split("\n")[0]
        srv.read_frame(conn)
        conn.sendall(answer_frame(reply_to, b"[" * 100_000))  # json.loads: RecursionError
        frame = srv.read_frame(conn)
        body = json.loads(frame[frame.index(b"\n\n") + 2 : frame.rindex(b"\x00")])
        answer = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": {}}).encode()
        conn.sendall(answer_frame(reply_to, answer))
        srv.read_frame(conn)

    srv = RawServer(deep_then_good)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", timeout=0.5, **FAST)
    try:
        with pytest.raises(SpmTimeoutError):
            client.getAllTasksStatuses()
        assert client.getAllTasksStatuses() == {}
        assert client.connection.connects == 1
    finally:
        client.close()


def test_unexpected_error_in_the_io_thread_fails_calls_in_flight_and_reconnects(
    client: StompSpmClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = StompRpcConnection._on_message
    failures = [RuntimeError("a bug in answer handling")]

    def fails_once(self: StompRpcConnection, frame: Frame) -> None:
        if failures:
            raise failures.pop()
        handle(self, frame)

    monkeypatch.setattr(StompRpcConnection, "_on_message", fails_once)
    assert client.wait_connected(5)
    started = time.monotonic()
    with pytest.raises(SpmConnectionError, match="a bug in answer handling"):
        client.getAllTasksStatuses()
    assert time.monotonic() - started < 2
    assert client.wait_connected(5)
    assert client.getAllTasksStatuses() == {}
    assert client.connection.connects == 2


def test_client_reconnects_after_the_server_restarts(fakes: dict[str, FakeSpm]) -> None:
    first = SpmStompServer(fakes).start()
    port = first.port
    client = StompSpmClient(first.url, "pool-a", timeout=5.0, **FAST)
    try:
        assert client.getAllTasksStatuses() == {}
        first.stop()
        with pytest.raises(SpmConnectionError):
            client.getAllTasksStatuses()
        second = SpmStompServer(fakes, port=port).start()
        try:
            assert client.wait_connected(5)
            assert client.getAllTasksStatuses() == {}
            assert client.connection.connects == 2
        finally:
            second.stop()
    finally:
        client.close()
        first.stop()


def test_client_is_down_before_it_closes_a_lost_connection(
    server: SpmStompServer, client: StompSpmClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The I/O thread is held just after it closed the stream of the connection the server
    # dropped: the client must not still say it is connected on that closed stream.
    close = FrameStream.close
    io_thread = f"spm-stomp-client-{client.connection.address}"
    closed, resume = threading.Event(), threading.Event()

    def close_and_hold(self: FrameStream) -> None:
        close(self)
        if threading.current_thread().name == io_thread and not closed.is_set():
            closed.set()
            resume.wait(5)

    monkeypatch.setattr(FrameStream, "close", close_and_hold)
    assert client.wait_connected(5)
    server.stop()
    try:
        assert closed.wait(5)
        assert not client.connection.connected
        assert not client.wait_connected(0)
        with pytest.raises(NotConnectedError, match="not connected to"):
            client.getAllTasksStatuses()
    finally:
        resume.set()


def test_close_fails_calls_in_flight_and_refuses_later_ones(
    server: SpmStompServer, fakes: dict[str, FakeSpm]
) -> None:
    gate = threading.Event()
    fakes["pool-a"].gate = gate
    client = StompSpmClient(server.url, "pool-a", timeout=30.0, **FAST)
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(client.getAllTasksStatuses)
            assert fakes["pool-a"].entered.wait(5)
            client.close()
            with pytest.raises(SpmConnectionError):
                future.result(timeout=5)
        with pytest.raises(NotConnectedError):
            client.getAllTasksStatuses()
    finally:
        gate.set()
        client.close()


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("engine.example")
    base: Path = tmp_path_factory.mktemp("tls")
    files = {
        "ca": base / "ca.pem",
        "server": base / "server.pem",
        "client": base / "client.pem",
        "other_ca": base / "other-ca.pem",
        "stranger": base / "stranger.pem",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(files["server"]))
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(files["client"]))
    other = trustme.CA()
    other.cert_pem.write_to_path(str(files["other_ca"]))
    other.issue_cert("engine.example").private_key_and_cert_chain_pem.write_to_path(
        str(files["stranger"])
    )
    return {k: str(v) for k, v in files.items()}


@pytest.fixture
def tls_server(fakes: dict[str, FakeSpm], tls_files: dict[str, str]) -> Iterator[SpmStompServer]:
    ctx = server_ssl_context(tls_files["server"], tls_files["server"], tls_files["ca"])
    with SpmStompServer(fakes, ssl_context=ctx) as srv:
        yield srv


def test_tls_with_client_certificate_is_served(
    tls_server: SpmStompServer, tls_files: dict[str, str]
) -> None:
    assert tls_server.url.startswith("stomp+tls://")
    client = StompSpmClient(
        tls_server.url,
        "pool-a",
        ca=tls_files["ca"],
        cert=tls_files["client"],
        key=tls_files["client"],
        **FAST,
    )
    try:
        task_id = client.fire("deleteImage", {"sdUUID": "s", "imgUUID": "i"})
        assert list(client.getAllTasksStatuses()) == [task_id]
    finally:
        client.close()


def test_tls_options_from_the_url(tls_server: SpmStompServer, tls_files: dict[str, str]) -> None:
    client_pem = tls_files["client"]
    url = f"{tls_server.url}?ca={tls_files['ca']}&cert={client_pem}&key={client_pem}"
    client = client_for_url(url, "pool-b", **FAST)
    try:
        assert client.getAllTasksInfo() == {}
    finally:
        client.close()


@pytest.mark.parametrize("who", ["no certificate", "certificate of another CA"])
def test_tls_client_without_an_accepted_certificate_is_refused(
    tls_server: SpmStompServer, tls_files: dict[str, str], who: str
) -> None:
    options: dict[str, Any] = {"ca": tls_files["ca"]}
    if who != "no certificate":
        options.update(cert=tls_files["stranger"], key=tls_files["stranger"])
    client = StompSpmClient(tls_server.url, "pool-a", timeout=5.0, **options, **FAST)
    try:
        with pytest.raises(SpmConnectionError):
            client.getAllTasksStatuses()
        assert not client.connection.connected
    finally:
        client.close()


def test_tls_client_refuses_a_server_it_cannot_verify(
    tls_server: SpmStompServer, tls_files: dict[str, str]
) -> None:
    client = StompSpmClient(
        tls_server.url,
        "pool-a",
        ca=tls_files["other_ca"],
        cert=tls_files["client"],
        key=tls_files["client"],
        timeout=5.0,
        **FAST,
    )
    try:
        with pytest.raises(NotConnectedError, match="CERTIFICATE_VERIFY_FAILED"):
            client.getAllTasksStatuses()
    finally:
        client.close()


def test_request_ids_are_unique_uuids(raw_servers: list[RawServer]) -> None:
    bodies: list[dict[str, Any]] = []
    answered = threading.Event()

    def echo(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        conn.sendall(connected())
        subscribe = srv.read_frame(conn).decode()
        reply_to = subscribe.split("destination:")[1].split("\n")[0]
        for _ in range(2):
            frame = srv.read_frame(conn)
            body = json.loads(frame[frame.index(b"\n\n") + 2 : frame.rindex(b"\x00")])
            bodies.append(body)
            answer = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": {}}).encode()
            conn.sendall(
                f"MESSAGE\ndestination:{reply_to}\nsubscription:x\ncontent-length:{len(answer)}\n\n".encode()
                + answer
                + b"\x00"
            )
        answered.set()
        srv.read_frame(conn)

    srv = RawServer(echo)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", **FAST)
    try:
        assert client.getAllTasksInfo() == {}
        assert client.getAllTasksStatuses() == {}
        assert answered.wait(5)
        assert [b["method"] for b in bodies] == ["Host.getAllTasksInfo", "Host.getAllTasksStatuses"]
        assert all(b["jsonrpc"] == "2.0" and b["params"] == {"storagepoolID": "p"} for b in bodies)
        assert len({b["id"] for b in bodies}) == 2
        assert all(uuid.UUID(b["id"]) for b in bodies)
    finally:
        client.close()


def test_client_reads_frames_split_across_writes_and_batched_in_one(
    raw_servers: list[RawServer],
) -> None:
    def choppy(conn: socket.socket, srv: RawServer) -> None:
        srv.read_frame(conn)
        for piece in (b"CONN", b"ECTED\nversion:1", b".2\n\n", b"\x00"):
            conn.sendall(piece)
        subscribe = srv.read_frame(conn).decode()
        reply_to = subscribe.split("destination:")[1].split("\n")[0]
        answers = b""
        for _ in range(2):
            frame = srv.read_frame(conn)
            body = json.loads(frame[frame.index(b"\n\n") + 2 : frame.rindex(b"\x00")])
            result = {"taskID": body["params"]["taskID"], "taskState": "finished"}
            result.update(taskResult="success", code=0, message="done")
            answer = json.dumps({"jsonrpc": "2.0", "id": body["id"], "result": result}).encode()
            head = f"MESSAGE\ndestination:{reply_to}\nsubscription:s\ncontent-length:{len(answer)}"
            answers += b"\n" + head.encode() + b"\n\n" + answer + b"\x00"
        conn.sendall(answers[:7])  # the first answer split, then the rest of both in one write
        conn.sendall(answers[7:])
        srv.read_frame(conn)

    srv = RawServer(choppy)
    raw_servers.append(srv)
    client = StompSpmClient(srv.url, "p", timeout=10.0, **FAST)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.getTaskStatus, "task-1")
            second = pool.submit(client.getTaskStatus, "task-2")
            assert first.result(timeout=10)["taskID"] == "task-1"
            assert second.result(timeout=10)["taskID"] == "task-2"
    finally:
        client.close()


def test_parameters_json_cannot_carry_fail_before_sending(client: StompSpmClient) -> None:
    with pytest.raises(GenericError, match="JSON"):
        client.fire("createVolume", {"sdUUID": object()})
    assert client.getAllTasksStatuses() == {}
