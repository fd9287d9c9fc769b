"""The STOMP/JSON-RPC server, checked by a client that speaks raw STOMP 1.2 over a socket.

The client side of these tests uses no project code: frames are written and read by hand, so
the server is held to the protocol, not to our own codec.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from _spm_server import FakeSpm, RawStomp

from spm._stomp_server import SpmRpcDispatcher, SpmStompServer, server_ssl_context


@pytest.fixture
def fakes() -> dict[str, FakeSpm]:
    return {"pool-a": FakeSpm("pool-a"), "pool-b": FakeSpm("pool-b")}


@pytest.fixture
def server(fakes: dict[str, FakeSpm]) -> Iterator[SpmStompServer]:
    with SpmStompServer(fakes, min_heartbeat_ms=50) as srv:
        yield srv


@pytest.fixture
def raw(server: SpmStompServer) -> Iterator[RawStomp]:
    client = RawStomp(server.port)
    yield client
    client.close()


def subscribe(raw: RawStomp) -> str:
    dest = f"jms.topic.vdsm_responses.{uuid.uuid4()}"
    raw.send("SUBSCRIBE", {"destination": dest, "id": str(uuid.uuid4()), "ack": "auto"})
    return dest


def test_connect_12_gets_connected_with_version_and_heartbeats(raw: RawStomp) -> None:
    command, headers = raw.connect("0,0")
    assert command == "CONNECTED"
    assert headers["version"] == "1.2"
    assert headers["heart-beat"] == "0,0"


def test_heartbeat_intervals_are_raised_to_the_server_floor(server: SpmStompServer) -> None:
    raw = RawStomp(server.port)
    try:
        _, headers = raw.connect("10,5000")
        # As VDSM: the server sends every cy (5000) and expects every max(cx, floor) (50).
        assert headers["heart-beat"] == "5000,50"
    finally:
        raw.close()


def test_accept_version_10_only_gets_error_frame_then_close(raw: RawStomp) -> None:
    command, headers = raw.connect(version="1.0")
    assert command == "ERROR"
    assert "version" in headers["message"].lower()
    assert raw.closed_by_peer()


def test_get_all_tasks_statuses_answers_in_vdsm_shape(
    raw: RawStomp, fakes: dict[str, FakeSpm]
) -> None:
    raw.connect()
    reply_to = subscribe(raw)
    fired = raw.rpc(
        "Volume.create",
        {
            "storagepoolID": "pool-a",
            "storagedomainID": "sd",
            "imageID": "img",
            "volumeID": "vol",
            "size": "1024",
            "volFormat": 5,
            "preallocate": 2,
            "diskType": "DATA",
            "desc": "",
            "srcImgUUID": "00000000-0000-0000-0000-000000000000",
            "srcVolUUID": "00000000-0000-0000-0000-000000000000",
        },
        reply_to,
    )
    task_id = fired["result"]
    assert isinstance(task_id, str)
    verb, params = fakes["pool-a"].fired[0]
    assert verb == "createVolume"
    assert (params["spUUID"], params["sdUUID"], params["imgUUID"], params["volUUID"]) == (
        "pool-a",
        "sd",
        "img",
        "vol",
    )
    answer = raw.rpc("Host.getAllTasksStatuses", {"storagepoolID": "pool-a"}, reply_to)
    status = answer["result"][task_id]
    assert set(status) == {"taskID", "taskState", "taskResult", "code", "message"}
    assert status["taskID"] == task_id
    assert (status["taskState"], status["taskResult"], status["code"]) == ("finished", "success", 0)


def test_task_verbs_and_vdsm_error_codes(raw: RawStomp, fakes: dict[str, FakeSpm]) -> None:
    raw.connect()
    reply_to = subscribe(raw)
    unknown = raw.rpc("Task.getStatus", {"taskID": "nope", "storagepoolID": "pool-b"}, reply_to)
    assert unknown["error"]["code"] == 401
    task_id = fakes["pool-b"].fire("deleteImage", {})
    assert (
        raw.rpc("Task.clear", {"taskID": task_id, "storagepoolID": "pool-b"}, reply_to)["result"]
        is True
    )
    missing = raw.rpc("Task.clear", {"storagepoolID": "pool-b"}, reply_to)
    assert missing["error"]["code"] == -32602
    nomethod = raw.rpc("Host.noSuchVerb", {}, reply_to)
    assert nomethod["error"]["code"] == -32601


def test_pool_is_routed_by_param_or_subdestination_and_unknown_pool_is_309(
    raw: RawStomp, fakes: dict[str, FakeSpm]
) -> None:
    raw.connect()
    reply_to = subscribe(raw)
    task_b = fakes["pool-b"].fire("deleteImage", {})
    by_dest = raw.rpc("Host.getAllTasksInfo", {}, reply_to, dest="jms.topic.vdsm_requests.pool-b")
    assert by_dest["result"] == {task_b: {"id": task_b, "verb": "deleteImage"}}
    assert raw.rpc("Host.getAllTasksInfo", {"storagepoolID": "pool-a"}, reply_to)["result"] == {}
    ambiguous = raw.rpc("Host.getAllTasksInfo", {}, reply_to)
    assert ambiguous["error"]["code"] == 309
    unknown = raw.rpc("Host.getAllTasksInfo", {"storagepoolID": "pool-z"}, reply_to)
    assert unknown["error"]["code"] == 309
    pools = raw.rpc("Host.getConnectedStoragePools", {}, reply_to)
    assert pools["result"] == ["pool-a", "pool-b"]


def test_spm_stop_answers_654_until_spm_start(raw: RawStomp) -> None:
    raw.connect()
    reply_to = subscribe(raw)
    assert raw.rpc("StoragePool.spmStop", {"storagepoolID": "pool-a"}, reply_to)["result"] is True
    status = raw.rpc("StoragePool.getSpmStatus", {"storagepoolID": "pool-a"}, reply_to)
    assert status["result"]["spmStatus"] == "Free"
    refused = raw.rpc("Host.getAllTasksStatuses", {"storagepoolID": "pool-a"}, reply_to)
    assert refused["error"]["code"] == 654
    assert raw.rpc("StoragePool.spmStart", {"storagepoolID": "pool-a"}, reply_to)["result"] is True
    assert (
        raw.rpc("Host.getAllTasksStatuses", {"storagepoolID": "pool-a"}, reply_to)["result"] == {}
    )


def test_ledger_is_readable_over_the_wire(raw: RawStomp, fakes: dict[str, FakeSpm]) -> None:
    raw.connect()
    reply_to = subscribe(raw)
    task_id = fakes["pool-a"].fire("createVolume", {})
    ledger = raw.rpc("Simulator.getLedger", {"storagepoolID": "pool-a"}, reply_to)["result"]
    assert ledger == {
        "objects": [{"task": task_id, "verb": "createVolume"}],
        "duplicated_effects": 0,
        "duplicates": [],
        "stats": {"fired": 1},
    }


def test_replies_go_only_to_the_reply_to_subscriber(server: SpmStompServer) -> None:
    first, second = RawStomp(server.port), RawStomp(server.port)
    try:
        first.connect()
        second.connect()
        subscribe(first)
        second_dest = subscribe(second)
        first_dest = subscribe(first)
        assert first.rpc("Host.ping2", {}, first_dest)["result"] is True
        assert second.rpc("Host.ping2", {}, second_dest)["result"] is True
        # Nothing more is waiting on either connection.
        first.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            first.sock.recv(1)
    finally:
        first.close()
        second.close()


def test_receipts_for_subscribe_and_disconnect(raw: RawStomp) -> None:
    raw.connect()
    raw.send("SUBSCRIBE", {"destination": "x", "id": "1", "receipt": "sub-1"})
    frame = raw.read()
    assert frame is not None and frame[0] == "RECEIPT" and frame[1]["receipt-id"] == "sub-1"
    raw.send("DISCONNECT", {"receipt": "bye"})
    frame = raw.read()
    assert frame is not None and frame[0] == "RECEIPT" and frame[1]["receipt-id"] == "bye"
    assert raw.closed_by_peer()


def test_send_to_unknown_destination_gets_error_then_close(raw: RawStomp) -> None:
    raw.connect()
    raw.send("SEND", {"destination": "jms.topic.nobody"}, b"{}")
    frame = raw.read()
    assert frame is not None and frame[0] == "ERROR"
    assert "Subscription not available" in frame[1]["message"]
    assert raw.closed_by_peer()


def test_send_to_subscribed_destination_is_forwarded(server: SpmStompServer) -> None:
    sender, listener = RawStomp(server.port), RawStomp(server.port)
    try:
        sender.connect()
        listener.connect()
        listener.send("SUBSCRIBE", {"destination": "jms.topic.events", "id": "ev", "receipt": "r"})
        assert listener.read() is not None  # the receipt: subscribed
        sender.send("SEND", {"destination": "jms.topic.events"}, b"hello")
        frame = listener.read()
        assert frame is not None
        assert (frame[0], frame[1]["subscription"], frame[2]) == ("MESSAGE", "ev", b"hello")
    finally:
        sender.close()
        listener.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"BOGUS\n\n\x00",
        b"SEND\nno-colon\n\n\x00",
        b"SEND\ndestination:jms.topic.vdsm_requests\ncontent-length:1\n\nxx\x00",
    ],
)
def test_malformed_frame_gets_error_then_close(raw: RawStomp, garbage: bytes) -> None:
    raw.connect()
    raw.send_raw(garbage)
    frame = raw.read()
    assert frame is not None and frame[0] == "ERROR"
    assert raw.closed_by_peer()


def test_frame_before_connect_gets_error_then_close(raw: RawStomp) -> None:
    raw.send("SUBSCRIBE", {"destination": "x", "id": "1"})
    frame = raw.read()
    assert frame is not None and frame[0] == "ERROR"
    assert raw.closed_by_peer()


def test_frames_split_across_writes_and_batched_in_one_write(raw: RawStomp) -> None:
    raw.connect()
    dest = f"jms.topic.vdsm_responses.{uuid.uuid4()}"
    body = json.dumps({"jsonrpc": "2.0", "method": "Host.ping2", "params": {}, "id": "1"}).encode()
    sub = f"SUBSCRIBE\ndestination:{dest}\nid:s\n\n\x00".encode()
    send = (
        f"SEND\ndestination:jms.topic.vdsm_requests\nreply-to:{dest}\ncontent-length:{len(body)}\n\n".encode()
        + body
        + b"\x00"
    )
    raw.send_raw(sub + send[:10])
    raw.sock.sendall(send[10:25])
    raw.sock.sendall(send[25:] + send.replace(b'"id": "1"', b'"id": "2"'))
    ids = set()
    for _ in range(2):
        frame = raw.read()
        assert frame is not None
        ids.add(json.loads(frame[2])["id"])
    assert ids == {"1", "2"}


def test_server_sends_heartbeats_when_asked(raw: RawStomp) -> None:
    raw.connect("0,50")  # wants a heart-beat from the server every 50 ms
    while raw.buf.count(b"\n") < 3:  # each recv is bounded by the socket's 5 s timeout
        assert raw._fill(), "connection closed"
    assert raw.buf.strip(b"\n") == b"", "only heart-beats were sent"


def test_server_closes_a_client_that_stops_sending_heartbeats(raw: RawStomp) -> None:
    started = time.monotonic()
    raw.connect("50,0")  # promises a heart-beat every 50 ms, then sends none
    assert raw.closed_by_peer()
    assert time.monotonic() - started < 3


def test_dispatcher_answers_batches_and_parse_errors() -> None:
    dispatcher = SpmRpcDispatcher({"p": FakeSpm("p")})
    batch = [
        {"jsonrpc": "2.0", "method": "Host.ping2", "id": 1},
        {"jsonrpc": "2.0", "method": "Host.getAllTasksInfo", "params": {}, "id": 2},
        {"jsonrpc": "2.0", "method": "Host.ping2"},  # a notification: no answer
    ]
    answer = json.loads(dispatcher.handle(json.dumps(batch).encode()) or b"null")
    assert [a["id"] for a in answer] == [1, 2]
    assert answer[1]["result"] == {}
    parse = json.loads(dispatcher.handle(b"{not json") or b"null")
    assert parse["error"]["code"] == -32700 and parse["id"] is None
    wrong = json.loads(dispatcher.handle(b'{"jsonrpc": "1.0", "method": "x", "id": 3}') or b"null")
    assert wrong["error"]["code"] == -32600
    empty = json.loads(dispatcher.handle(b"[]") or b"null")
    assert empty["error"]["code"] == -32600


def test_request_nested_too_deep_to_decode_gets_parse_error(raw: RawStomp) -> None:
    assert SpmRpcDispatcher({"p": FakeSpm("p")}).handle(b"[" * 100_000) is not None
    raw.connect()
    reply_to = subscribe(raw)
    headers = {"destination": "jms.topic.vdsm_requests", "reply-to": reply_to}
    raw.send("SEND", headers, b"[" * 100_000)
    frame = raw.read()
    assert frame is not None and frame[0] == "MESSAGE"
    answer = json.loads(frame[2])
    assert answer["error"]["code"] == -32700 and answer["id"] is None
    assert raw.rpc("Host.ping2", {}, reply_to)["result"] is True


def test_failed_tls_handshakes_leave_no_connection_behind(
    fakes: dict[str, FakeSpm], tmp_path: Path
) -> None:
    pem = str(tmp_path / "server.pem")
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
    with SpmStompServer(fakes, ssl_context=server_ssl_context(pem, pem)) as srv:
        for _ in range(3):
            plain = RawStomp(srv.port)  # STOMP without TLS: the handshake fails
            try:
                plain.send("CONNECT", {"accept-version": "1.2", "host": "127.0.0.1"})
                assert plain.read() is None  # closed by the server
            except ConnectionResetError:
                pass
            finally:
                plain.close()
            assert srv.connection_count() == 0


def test_stop_ends_a_connection_stuck_in_its_tls_handshake(
    fakes: dict[str, FakeSpm], tmp_path: Path
) -> None:
    pem = str(tmp_path / "server.pem")
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(pem)
    srv = SpmStompServer(fakes, ssl_context=server_ssl_context(pem, pem)).start()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        outgoing = ssl.MemoryBIO()
        tls = context.wrap_bio(ssl.MemoryBIO(), outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(outgoing.read())  # the ClientHello, and never the rest
        assert sock.recv(65536)  # the server answered: it waits in the handshake
        started = time.monotonic()
        srv.stop()
        assert time.monotonic() - started < 2
        assert srv.connection_count() == 0
    finally:
        sock.close()
        srv.stop()


def test_stop_closes_client_connections(fakes: dict[str, FakeSpm]) -> None:
    srv = SpmStompServer(fakes).start()
    raw = RawStomp(srv.port)
    try:
        raw.connect()
        srv.stop()
        assert raw.closed_by_peer()
        assert srv.connection_count() == 0
    finally:
        raw.close()
        srv.stop()
