"""The served simulator (``spmchain spm serve``) in a process of its own, driven over the wire:
raw STOMP, the StompSpmClient, kill and restart, the SPM role taken away, TLS, and the runtime's
chains running across a server restart."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import trustme
from _spm_server import RawStomp, ServedSpm, served_spm, start_served_spm

from spm._errors import NotSpmError, SpmConnectionError, SpmTimeoutError, UnknownTaskError
from spm._serve import serve_main
from spm._stomp_client import NotConnectedError, StompSpmClient, connected_pools

pytest.importorskip("spm._simulator")

FAST: dict[str, Any] = {
    "heartbeat_ms": (1000, 1000),
    "reconnect_delay": (0.02, 0.2),
    "connect_timeout": 5.0,
}


def volume_params() -> dict[str, Any]:
    """hsm.createVolume's parameters for a new volume in a new image."""
    return {
        "sdUUID": str(uuid.uuid4()),
        "imgUUID": str(uuid.uuid4()),
        "volUUID": str(uuid.uuid4()),
        "size": "1073741824",
        "volFormat": 4,
        "preallocate": 2,
        "diskType": "DATA",
        "desc": "",
    }


@pytest.fixture
def served() -> Iterator[ServedSpm]:
    with served_spm("--pools", "2") as s:
        yield s


def test_independent_raw_stomp_check_gets_vdsm_shaped_answers(served: ServedSpm) -> None:
    raw = RawStomp(served.port)
    try:
        command, headers = raw.connect("0,0")
        assert (command, headers["version"]) == ("CONNECTED", "1.2")
        reply_to = f"jms.topic.vdsm_responses.{uuid.uuid4()}"
        raw.send("SUBSCRIBE", {"destination": reply_to, "id": "sub-1", "ack": "auto"})
        fired = raw.rpc(
            "Volume.create",
            {
                "storagepoolID": "pool-0",
                "storagedomainID": str(uuid.uuid4()),
                "imageID": str(uuid.uuid4()),
                "volumeID": str(uuid.uuid4()),
                "size": "1073741824",
                "volFormat": 4,
                "preallocate": 2,
                "diskType": "DATA",
                "desc": "",
                "srcImgUUID": "00000000-0000-0000-0000-000000000000",
                "srcVolUUID": "00000000-0000-0000-0000-000000000000",
            },
            reply_to,
        )
        task_id = fired["result"]
        assert isinstance(task_id, str) and uuid.UUID(task_id)
        statuses = raw.rpc("Host.getAllTasksStatuses", {"storagepoolID": "pool-0"}, reply_to)
        status = statuses["result"][task_id]
        assert set(status) == {"taskID", "taskState", "taskResult", "code", "message"}
        assert status["taskID"] == task_id
        assert status["taskState"] in ("running", "finished")
        assert isinstance(status["code"], int) and isinstance(status["message"], str)
        info = raw.rpc("Host.getAllTasksInfo", {"storagepoolID": "pool-0"}, reply_to)
        # VDSM's id and verb, plus the simulator's extension: the parameters fired with.
        assert {k: v for k, v in info["result"][task_id].items() if k != "params"} == {
            "id": task_id, "verb": "createVolume"}
        assert info["result"][task_id]["params"]["volUUID"]
        unknown = raw.rpc("Task.clear", {"taskID": "nope", "storagepoolID": "pool-0"}, reply_to)
        assert unknown["error"]["code"] == 401
    finally:
        raw.close()
    old = RawStomp(served.port)
    try:
        command, headers = old.connect(version="1.0")
        assert command == "ERROR"
        assert old.closed_by_peer()
    finally:
        old.close()


def test_client_runs_every_verb_against_the_served_simulator(served: ServedSpm) -> None:
    assert connected_pools(served.url) == ["pool-0", "pool-1"]
    client = StompSpmClient(served.url, "pool-1", timeout=10.0, **FAST)
    try:
        params = volume_params()
        task_id = client.fire("createVolume", params)
        assert client.getAllTasksInfo()[task_id]["verb"] == "createVolume"
        assert client.getTaskStatus(task_id)["taskState"] == "finished"
        ledger = client.getLedger()
        assert {o["vol_uuid"] for o in ledger["objects"] if o["kind"] == "volume"} == {
            params["volUUID"]
        }
        assert ledger["duplicated_effects"] == 0
        client.revertTask(task_id)
        assert client.getLedger()["objects"] == []
        client.clearTask(task_id)
        assert client.getAllTasksStatuses() == {}
    finally:
        client.close()


def test_spm_role_taken_away_gives_654_and_calls_succeed_after_spm_start(
    served: ServedSpm,
) -> None:
    client = StompSpmClient(served.url, "pool-0", timeout=10.0, **FAST)
    other = StompSpmClient(served.url, "pool-1", timeout=10.0, connection=client.connection)
    try:
        task_id = client.fire("createVolume", volume_params())
        client.spmStop()
        for call in (
            client.getAllTasksStatuses,
            client.getAllTasksInfo,
            lambda: client.fire("createVolume", volume_params()),
        ):
            with pytest.raises(NotSpmError) as refused:
                call()
            assert refused.value.code == 654
        for call in (  # the SPM's tasks are unloaded: a call on one answers 401, as in VDSM
            lambda: client.getTaskStatus(task_id),
            lambda: client.clearTask(task_id),
        ):
            with pytest.raises(UnknownTaskError) as unknown:
                call()
            assert unknown.value.code == 401
        assert other.getAllTasksStatuses() == {}  # the other pool keeps its SPM
        client.spmStart()
        assert client.getTaskStatus(task_id)["taskState"] == "finished"
        assert client.fire("createVolume", volume_params())
    finally:
        other.close()
        client.close()


def test_killed_server_restarted_client_reconnects_and_tasks_are_recovered(
    tmp_path: Path,
) -> None:
    state = str(tmp_path / "state")
    first = start_served_spm("--pool", "p", "--state-dir", state, "--fsync")
    port = first.port
    client = StompSpmClient(first.url, "p", timeout=10.0, **FAST)
    servers = [first]
    try:
        done_params = volume_params()
        done = client.fire("createVolume", done_params)
        assert client.getTaskStatus(done)["taskState"] == "finished"
        first.kill()

        # Restarted with tasks that run for a minute: the client reconnects by itself.
        second = start_served_spm(
            "--pool", "p", "--state-dir", state, "--task-ms", "60000", port=port
        )
        servers.append(second)
        assert client.wait_connected(10)
        assert client.getTaskStatus(done)["taskResult"] == "success"
        running = client.fire("createVolume", volume_params())
        assert client.getTaskStatus(running)["taskState"] == "running"

        # A call in flight when the server dies fails at once, not at its timeout.
        second.signal(signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.getAllTasksStatuses)
            second.kill()
            killed_at = time.monotonic()
            with pytest.raises(SpmConnectionError):
                in_flight.result(timeout=10)
            assert time.monotonic() - killed_at < 3

        third = start_served_spm("--pool", "p", "--state-dir", state, port=port)
        servers.append(third)
        assert client.wait_connected(10)
        statuses = client.getAllTasksStatuses()
        assert statuses[done]["taskResult"] == "success"
        # As VDSM on SPM start: the unfinished task was rolled back, not resumed.
        assert (statuses[running]["taskState"], statuses[running]["taskResult"]) == (
            "finished",
            "cleanSuccess",
        )
        volumes = {o["vol_uuid"] for o in client.getLedger()["objects"] if o["kind"] == "volume"}
        assert volumes == {done_params["volUUID"]}
        assert client.connection.connects == 3
    finally:
        client.close()
        for server in servers:
            server.stop()
            Path(server.stderr_path).unlink(missing_ok=True)


def test_calls_time_out_when_the_server_process_stops_answering(served: ServedSpm) -> None:
    client = StompSpmClient(served.url, "pool-0", timeout=0.5, **FAST)
    try:
        assert client.getAllTasksStatuses() == {}
        served.signal(signal.SIGSTOP)
        try:
            for call in (
                client.getAllTasksStatuses,
                lambda: client.fire("createVolume", volume_params()),
                lambda: client.clearTask("t"),
            ):
                started = time.monotonic()
                with pytest.raises((SpmTimeoutError, SpmConnectionError)):
                    call()
                assert time.monotonic() - started < 3
        finally:
            served.signal(signal.SIGCONT)
        client.timeout = 10.0
        deadline = time.monotonic() + 15
        while True:  # reconnecting if the silence cost the connection: retry until it is back
            try:
                client.getAllTasksInfo()
                break
            except NotConnectedError:
                assert time.monotonic() < deadline
                client.wait_connected(1.0)
    finally:
        client.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_server_stops_cleanly_on_sigterm_and_sigint(signum: int) -> None:
    served = start_served_spm("--pools", "1")
    try:
        client = StompSpmClient(served.url, "pool-0", timeout=5.0, **FAST)
        try:
            assert client.getAllTasksStatuses() == {}
        finally:
            client.close()
        served.signal(signum)
        assert served.proc.wait(10) == 0
    finally:
        served.stop()
        Path(served.stderr_path).unlink(missing_ok=True)


def test_bad_options_exit_2_and_name_the_problem(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve_main(["--listen", "no-port-here"]) == 2
    assert serve_main(["--pools", "0"]) == 2
    assert "--pools" in capsys.readouterr().err
    assert serve_main(["--pool", "a", "--pool", "a"]) == 2
    assert serve_main(["--tls-key", "k.pem"]) == 2
    assert "--tls-cert" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--workers", "0"),
        ("--queue-size", "-1"),
        ("--fail-rate", "2"),
        ("--fail-rate", "nan"),
        ("--task-ms", "-5"),
        ("--task-ms", "inf"),
        ("--min-heartbeat-ms", "-1"),
    ],
)
def test_option_values_out_of_range_exit_2_with_one_line_naming_the_option(
    capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    assert serve_main(["--listen", "127.0.0.1:0", option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spmchain spm serve: {option}: ") and err.count("\n") == 1, err
    assert signal.getsignal(signal.SIGTERM) is handler


def test_state_dir_that_cannot_be_used_exits_2_naming_the_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    simulator = pytest.importorskip("spm._simulator")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert serve_main(["--listen", "127.0.0.1:0", "--state-dir", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err == f"spmchain spm serve: --state-dir: {a_file / 'pool-0'}: Not a directory\n"
    simulator.SimulatedSpm("another", state_dir=tmp_path / "state" / "pool-0").close()
    assert serve_main(["--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spmchain spm serve: --state-dir: ") and err.count("\n") == 1, err
    assert "'another'" in err and "state_dir" not in err.replace(str(tmp_path), "")


def test_state_dir_in_use_by_another_simulator_exits_2_naming_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    simulator = pytest.importorskip("spm._simulator")
    state = tmp_path / "state"
    held = simulator.SimulatedSpm("pool-1", state_dir=state / "pool-1")
    try:
        argv = ["--listen", "127.0.0.1:0", "--pools", "2", "--state-dir", str(state)]
        assert serve_main(argv) == 2
        err = capsys.readouterr().err
        assert err == (f"spmchain spm serve: --state-dir: {state / 'pool-1'}: in use by "
                       f"another simulator (process {os.getpid()})\n")
    finally:
        held.close()
    # pool-0's simulator, made before pool-1 was refused, was closed and let go of its directory.
    simulator.SimulatedSpm("pool-0", state_dir=state / "pool-0").close()


def test_a_server_that_does_not_start_leaves_no_process_and_no_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    started = record_popen(monkeypatch)
    with pytest.raises(RuntimeError, match="--workers"):
        start_served_spm("--workers", "0")
    assert [proc.returncode for proc in started] == [2]
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_start_stops_and_reaps_the_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    class InterruptedThread(threading.Thread):
        """A thread whose first join is interrupted (Ctrl-C while waiting for the server)."""

        interrupted = False

        def join(self, timeout: float | None = None) -> None:
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            super().join(timeout)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(threading, "Thread", InterruptedThread)
    started = record_popen(monkeypatch)
    try:
        with pytest.raises(KeyboardInterrupt):
            start_served_spm("--pools", "1")
        assert len(started) == 1 and started[0].returncode is not None
        assert list(tmp_path.iterdir()) == []
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def record_popen(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[str]]:
    """Every process started from now on (start_served_spm keeps none it failed to start)."""
    started: list[subprocess.Popen[str]] = []

    class RecordedPopen(subprocess.Popen[str]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", RecordedPopen)
    return started


def test_served_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_pem, server_pem, client_pem = (str(tmp_path / n) for n in ("ca", "server", "client"))
    ca.cert_pem.write_to_path(ca_pem)
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(server_pem)
    ca.issue_cert("engine").private_key_and_cert_chain_pem.write_to_path(client_pem)
    tls = ("--tls-cert", server_pem, "--tls-key", server_pem, "--tls-ca", ca_pem)
    with served_spm("--pools", "1", *tls) as served:
        assert served.url.startswith("stomp+tls://127.0.0.1:")
        good = StompSpmClient(served.url, "pool-0", ca=ca_pem, cert=client_pem, key=client_pem)
        try:
            assert good.getAllTasksStatuses() == {}
        finally:
            good.close()
        anonymous = StompSpmClient(served.url, "pool-0", ca=ca_pem, timeout=5.0, **FAST)
        try:
            with pytest.raises(SpmConnectionError):
                anonymous.getAllTasksStatuses()
        finally:
            anonymous.close()


def test_chains_finish_over_the_wire_across_a_server_restart(tmp_path: Path) -> None:
    actors = pytest.importorskip("actors")
    loadtest = pytest.importorskip("actors._loadtest")
    seed = 7
    print(f"seed={seed}")
    rng = random.Random(seed)
    state = str(tmp_path / "state")
    pools = ["pool-0", "pool-1"]
    first = start_served_spm("--pools", "2", "--task-ms", "20", "--state-dir", state)
    servers = [first]
    clients = {p: StompSpmClient(first.url, p, timeout=10.0, **FAST) for p in pools}
    options = actors.RuntimeOptions(retry_max_s=0.2, poll_max_s=0.2)
    try:
        with actors.Runtime(clients, options) as rt:
            ended = threading.Event()
            handles = []
            for i in range(40):
                spec = loadtest.chain_spec(i, pools[i % 2], 3, rng)
                handle = rt.submit(spec)
                handle.add_done_callback(lambda result: ended.set())
                handles.append((spec, handle))
            assert ended.wait(60), "no chain ended before the restart"
            first.kill()
            second = start_served_spm(
                "--pools", "2", "--task-ms", "20", "--state-dir", state, port=first.port
            )
            servers.append(second)
            results = [(spec, handle.result(timeout=120)) for spec, handle in handles]
        outcomes = [r.outcome for _, r in results]
        print({o: outcomes.count(o) for o in set(outcomes)})
        assert all(client.connection.connects == 2 for client in clients.values())
        assert len(outcomes) == 40
        assert set(outcomes) <= {"ended_successfully", "ended_with_failure"}
        assert outcomes.count("ended_successfully") > 0
        failed_images = {
            (spec.params["sdUUID"], spec.params["imgUUID"])
            for spec, result in results
            if not result.succeeded
        }
        for client in clients.values():
            ledger = client.getLedger()
            assert ledger["duplicated_effects"] == 0, ledger["duplicates"]
            left = [o for o in ledger["objects"] if (o["sd_uuid"], o["img_uuid"]) in failed_images]
            assert left == []
    finally:
        for client in clients.values():
            client.close()
        for server in servers:
            server.stop()
            Path(server.stderr_path).unlink(missing_ok=True)
