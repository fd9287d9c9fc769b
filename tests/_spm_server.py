"""Test helpers for the wire-protocol tests: a small in-memory SpmClient, and the served
simulator (``python -m spm._serve``) as a subprocess that is always stopped by pid."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spm._client import SpmClient, TaskInfo, TaskStatus
from spm._errors import NotSpmError, TaskStateError, UnknownTaskError

REPO = Path(__file__).resolve().parent.parent


class FakeLedger:
    """What the served simulator's ledger offers: objects and duplicated effects."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def objects(self) -> list[dict[str, Any]]:
        return list(self.items)

    def duplicated_effects(self) -> int:
        return 0


class FakeSpm(SpmClient):
    """An SPM whose tasks finish the moment they are fired; records every call.

    ``gate``, when set, makes every call wait for it first (a stuck SPM); ``answer_override``
    replaces getAllTasksStatuses' answer (an answer of the wrong shape).
    """

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.lock = threading.Lock()
        self.tasks: dict[str, TaskStatus] = {}
        self.verbs: dict[str, str] = {}
        self.fired: list[tuple[str, dict[str, Any]]] = []
        self.is_spm = True
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.answer_override: Any = None
        self.ledger = FakeLedger()

    def _enter(self) -> None:
        self.entered.set()
        gate = self.gate
        if gate is not None:
            gate.wait(30)
        if not self.is_spm:
            raise NotSpmError(f"Not SPM: {self.pool}")

    def fire(self, verb: str, params: Mapping[str, Any]) -> str:
        self._enter()
        task_id = str(uuid.uuid4())
        with self.lock:
            self.fired.append((verb, dict(params)))
            self.verbs[task_id] = verb
            self.tasks[task_id] = TaskStatus(
                taskID=task_id,
                taskState="finished",
                taskResult="success",
                code=0,
                message="1 jobs completed successfully",
            )
            self.ledger.items.append({"task": task_id, "verb": verb})
        return task_id

    def getAllTasksStatuses(self) -> dict[str, TaskStatus]:  # noqa: N802
        self._enter()
        if self.answer_override is not None:
            return self.answer_override  # type: ignore[no-any-return]
        with self.lock:
            return dict(self.tasks)

    def getAllTasksInfo(self) -> dict[str, TaskInfo]:  # noqa: N802
        self._enter()
        with self.lock:
            return {t: TaskInfo(id=t, verb=v) for t, v in self.verbs.items()}

    def getTaskStatus(self, task_id: str) -> TaskStatus:  # noqa: N802
        self._enter()
        with self.lock:
            if task_id not in self.tasks:
                raise UnknownTaskError(f"Task id unknown: ('{task_id}',)")
            return self.tasks[task_id]

    def clearTask(self, task_id: str) -> None:  # noqa: N802
        self._enter()
        with self.lock:
            status = self.tasks.get(task_id)
            if status is None:
                raise UnknownTaskError(f"Task id unknown: ('{task_id}',)")
            if status["taskState"] != "finished":
                raise TaskStateError()
            del self.tasks[task_id]
            del self.verbs[task_id]

    def stopTask(self, task_id: str) -> None:  # noqa: N802
        self.getTaskStatus(task_id)

    def revertTask(self, task_id: str) -> None:  # noqa: N802
        self.getTaskStatus(task_id)

    def spm_stop(self) -> None:
        self.is_spm = False

    def spm_start(self) -> None:
        self.is_spm = True

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"fired": len(self.fired)}


class RawStomp:
    """A hand-written STOMP 1.2 client: enough to check the server byte by byte."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eols = 0

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, command: str, headers: dict[str, str], body: bytes = b"") -> None:
        head = command + "\n" + "".join(f"{k}:{v}\n" for k, v in headers.items())
        if body:
            head += f"content-length:{len(body)}\n"
        self.sock.sendall(head.encode() + b"\n" + body + b"\x00")

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read(self) -> tuple[str, dict[str, str], bytes] | None:
        """The next frame, or None at end of stream. Heart-beat EOLs are counted."""
        while True:
            while self.buf[:1] in (b"\n", b"\r"):
                if self.buf[:1] == b"\n":
                    self.eols += 1
                self.buf = self.buf[1:]
            end = self.buf.find(b"\n\n")
            if end >= 0:
                head = self.buf[:end].decode()
                lines = head.split("\n")
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers.setdefault(k, v)
                start = end + 2
                if "content-length" in headers:
                    n = int(headers["content-length"])
                    if len(self.buf) >= start + n + 1:
                        assert self.buf[start + n] == 0
                        body = self.buf[start : start + n]
                        self.buf = self.buf[start + n + 1 :]
                        return lines[0], headers, body
                else:
                    nul = self.buf.find(b"\x00", start)
                    if nul >= 0:
                        body = self.buf[start:nul]
                        self.buf = self.buf[nul + 1 :]
                        return lines[0], headers, body
            if not self._fill():
                return None

    def connect(self, heart_beat: str = "0,0", version: str = "1.2") -> tuple[str, dict[str, str]]:
        self.send(
            "CONNECT", {"accept-version": version, "host": "127.0.0.1", "heart-beat": heart_beat}
        )
        frame = self.read()
        assert frame is not None
        return frame[0], frame[1]

    def rpc(
        self,
        method: str,
        params: dict[str, Any],
        reply_to: str,
        dest: str = "jms.topic.vdsm_requests",
    ) -> Any:
        req_id = str(uuid.uuid4())
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": req_id})
        self.send(
            "SEND",
            {"destination": dest, "reply-to": reply_to, "content-type": "application/json"},
            body.encode(),
        )
        frame = self.read()
        assert frame is not None, "connection closed instead of an answer"
        command, headers, payload = frame
        assert command == "MESSAGE"
        assert headers["destination"] == reply_to
        answer = json.loads(payload)
        assert answer["id"] == req_id
        assert answer["jsonrpc"] == "2.0"
        return answer

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class ServedSpm:
    """A running ``python -m spm._serve`` process."""

    def __init__(self, proc: subprocess.Popen[str], url: str, stderr_path: str) -> None:
        self.proc = proc
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.stderr_path = stderr_path

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the server process (by its pid)."""
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        """SIGKILL the server and reap it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the server, wait for it (SIGKILL past ``timeout``); its exit status."""
        if self.proc.poll() is None:
            with_suppressed(os.kill, self.proc.pid, signal.SIGCONT)
            with_suppressed(os.kill, self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(errors="replace")


def with_suppressed(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except ProcessLookupError:
        pass


def start_served_spm(*args: str, port: int = 0, timeout: float = 30.0) -> ServedSpm:
    """Start the served simulator on 127.0.0.1:``port`` with extra ``args``; wait for its
    address line. Raises RuntimeError (with its stderr) if it exits or says nothing in time.
    Whatever ends the start without a server (that, or an interrupt), the process is stopped
    by its pid and reaped and its stderr file removed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    fd, err_path = tempfile.mkstemp(prefix="spm-serve-", suffix=".log")
    proc: subprocess.Popen[str] | None = None
    reader: threading.Thread | None = None
    served: ServedSpm | None = None
    try:
        with open(fd, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "spm._serve", "--listen", f"127.0.0.1:{port}", *args],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                cwd=str(REPO),
                env=env,
            )
        stdout = proc.stdout
        line: list[str] = []
        reader = threading.Thread(
            target=lambda: line.append(stdout.readline() if stdout else ""), daemon=True
        )
        reader.start()
        reader.join(timeout)
        match = re.search(r"(stomp(?:\+tls)?://\S+)", line[0]) if line else None
        if match is None:
            raise RuntimeError(
                f"served SPM did not start: {line!r}\n{Path(err_path).read_text(errors='replace')}"
            )
        served = ServedSpm(proc, match.group(1), err_path)
        return served
    finally:
        if served is None:
            if proc is not None:
                if proc.poll() is None:
                    with_suppressed(os.kill, proc.pid, signal.SIGKILL)
                proc.wait(10)
                if reader is not None:
                    reader.join(10)  # the pipe is at its end once the process is gone
                if proc.stdout is not None:
                    proc.stdout.close()
            Path(err_path).unlink(missing_ok=True)


@contextmanager
def served_spm(*args: str, port: int = 0, timeout: float = 30.0) -> Iterator[ServedSpm]:
    """:func:`start_served_spm` as a context manager that always stops the process."""
    served = start_served_spm(*args, port=port, timeout=timeout)
    try:
        yield served
    finally:
        served.stop()
        Path(served.stderr_path).unlink(missing_ok=True)
