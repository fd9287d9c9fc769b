"""VDSM's wire protocol: STOMP 1.2 frames, and the JSON-RPC names VDSM carries in them.

An engine talks to VDSM by sending JSON-RPC 2.0 requests in STOMP ``SEND`` frames to
``jms.topic.vdsm_requests`` with a ``reply-to`` header; VDSM answers in ``MESSAGE`` frames on the
reply-to destination, to every subscriber of it. This module holds the parts both ends share:

* :class:`Frame`, :func:`encode_frame` and :class:`FrameParser` — the frame codec (STOMP 1.2:
  header escaping, ``content-length`` bodies that may contain NUL, NUL-terminated bodies without
  it, heart-beat EOLs between frames). Anything that is not a well-formed frame raises
  :class:`StompProtocolError`; the parser never guesses.
* :class:`FrameStream` — one connection's socket, plain or TLS, driven by one thread: frames go
  out through a thread-safe buffer, frames come in through the parser.
* The JSON-RPC binding: which VDSM method carries which SPM verb, and how the verb's parameter
  names (VDSM's ``hsm.py`` names: ``sdUUID``, ``imgUUID`` ...) map to the method's (the API
  schema's names: ``storagedomainID``, ``imageID`` ...).
"""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

# --------------------------------------------------------------------------------------------
# Destinations, commands, headers
# --------------------------------------------------------------------------------------------

REQUEST_QUEUE: Final = "jms.topic.vdsm_requests"
"""Where JSON-RPC requests are sent. VDSM also serves any sub-destination ``REQUEST_QUEUE.x``."""

DEFAULT_REPLY_DESTINATION: Final = "jms.topic.vdsm_responses"
"""Where VDSM answers a request that carries no ``reply-to`` header."""

CLIENT_COMMANDS: Final = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)
"""Commands a client may send (STOMP 1.2); a server's parser accepts only these."""

SERVER_COMMANDS: Final = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
"""Commands a server may send (STOMP 1.2); a client's parser accepts only these."""

_UNESCAPED_COMMANDS: Final = frozenset({"CONNECT", "CONNECTED"})
"""STOMP 1.2 applies no header escaping to these two frames."""

HEARTBEAT: Final = b"\n"
"""A heart-beat: one EOL between frames."""

MAX_HEADER_BYTES: Final = 64 * 1024
"""A frame whose command and headers exceed this is refused as malformed."""

MAX_BODY_BYTES: Final = 64 * 1024 * 1024
"""A frame whose body exceeds this is refused as malformed."""


class StompProtocolError(Exception):
    """The peer sent something that is not a well-formed STOMP 1.2 frame, or broke the protocol.

    The connection it came from cannot be trusted to be in sync any more: close it.
    """


class ConnectionClosedError(ConnectionError):
    """The peer closed the connection (end of stream), or this side closed it already."""


@dataclass(slots=True)
class Frame:
    """One STOMP frame. Header names and values are text; the body is bytes."""

    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of header ``name`` (the first one if it was repeated), or ``default``."""
        return self.headers.get(name, default)


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

_ENCODE_ESCAPES: Final = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", ":": "\\c"}
_ENCODE_RE: Final = re.compile(r"[\\\r\n:]")
_DECODE_ESCAPES: Final = {b"\\\\": "\\", b"\\r": "\r", b"\\n": "\n", b"\\c": ":"}
_BODY_COMMANDS: Final = frozenset({"SEND", "MESSAGE", "ERROR"})


def _escape(value: str) -> str:
    return _ENCODE_RE.sub(lambda m: _ENCODE_ESCAPES[m.group(0)], value)


def encode_frame(frame: Frame) -> bytes:
    """The bytes of ``frame`` on the wire.

    Header names and values are escaped as STOMP 1.2 requires (except in CONNECT and CONNECTED,
    where the spec forbids it); a ``content-length`` header is always written for frames that
    carry a body, replacing any given one, so a body may contain NUL bytes. Raises ValueError
    for a command that is not a plain upper-case word, or for a CONNECT/CONNECTED header that
    contains a character it could not carry unescaped.
    """
    if not frame.command.isalpha() or not frame.command.isupper():
        raise ValueError(f"not a STOMP command: {frame.command!r}")
    escape = frame.command not in _UNESCAPED_COMMANDS
    parts = [frame.command, "\n"]
    for name, value in frame.headers.items():
        if name == "content-length":
            continue
        if escape:
            parts += [_escape(name), ":", _escape(value), "\n"]
        else:
            if _ENCODE_RE.search(name) or any(c in value for c in "\r\n"):
                raise ValueError(f"header {name!r} cannot be sent unescaped in {frame.command}")
            parts += [name, ":", value, "\n"]
    if frame.body or frame.command in _BODY_COMMANDS:
        parts += ["content-length:", str(len(frame.body)), "\n"]
    parts.append("\n")
    return "".join(parts).encode("utf-8") + frame.body + b"\x00"


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class FrameParser:
    """Turns a byte stream into frames, whatever the read boundaries.

    Feed it what the socket gave; it returns every frame completed so far and keeps the rest.
    EOLs between frames are heart-beats and are skipped (:attr:`heartbeats` counts them). Raises
    :class:`StompProtocolError` — and stays unusable afterwards — for a command not in
    ``accept``, a header line without a colon, an undefined escape sequence, text that is not
    UTF-8, a bad ``content-length``, a body not followed by NUL, or a frame over the size limits.
    """

    _COMMAND, _HEADERS, _BODY = range(3)

    def __init__(
        self,
        accept: frozenset[str],
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self._accept = accept
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        self._buf = bytearray()
        self._state = self._COMMAND
        self._command = ""
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._length = -1
        self._error: StompProtocolError | None = None
        self.heartbeats = 0
        """How many heart-beat EOLs were seen between frames."""

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data``; return the frames it completed, in order."""
        if self._error is not None:
            raise self._error
        self._buf += data
        frames: list[Frame] = []
        try:
            while True:
                frame = self._step()
                if frame is None:
                    break
                frames.append(frame)
        except StompProtocolError as exc:
            self._error = exc
            raise
        return frames

    def _fail(self, message: str) -> StompProtocolError:
        return StompProtocolError(message)

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\n")
        if end < 0:
            if self._header_bytes + len(self._buf) > self._max_header:
                raise self._fail(f"frame headers longer than {self._max_header} bytes")
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._header_bytes += end + 1
        if self._header_bytes > self._max_header:
            raise self._fail(f"frame headers longer than {self._max_header} bytes")
        if line.endswith(b"\r"):
            line = line[:-1]
        return line

    def _text(self, raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._fail(f"{what} is not UTF-8: {raw[:60]!r}") from None

    def _unescape(self, raw: bytes, what: str) -> str:
        if self._command in _UNESCAPED_COMMANDS or b"\\" not in raw:
            return self._text(raw, what)
        out: list[str] = []
        i = 0
        while True:
            j = raw.find(b"\\", i)
            if j < 0:
                out.append(self._text(raw[i:], what))
                break
            out.append(self._text(raw[i:j], what))
            seq = bytes(raw[j : j + 2])
            if seq not in _DECODE_ESCAPES:
                raise self._fail(f"undefined escape sequence {seq!r} in {what}")
            out.append(_DECODE_ESCAPES[seq])
            i = j + 2
        return "".join(out)

    def _step(self) -> Frame | None:
        if self._state == self._COMMAND:
            while True:
                self._header_bytes = 0
                line = self._line()
                if line is None:
                    return None
                if line:
                    break
                self.heartbeats += 1
            command = self._text(line, "command")
            if command not in self._accept:
                raise self._fail(f"unexpected command {command[:40]!r}")
            self._command = command
            self._headers = {}
            self._state = self._HEADERS
        if self._state == self._HEADERS:
            while True:
                line = self._line()
                if line is None:
                    return None
                if not line:
                    break
                colon = line.find(b":")
                if colon <= 0:
                    raise self._fail(f"malformed header line {line[:60]!r} in {self._command}")
                name = self._unescape(line[:colon], "header name")
                value = self._unescape(line[colon + 1 :], f"header {name!r}")
                # STOMP 1.2: when a header is repeated, the first value is the one that counts.
                self._headers.setdefault(name, value)
            self._length = -1
            raw_length = self._headers.get("content-length")
            if raw_length is not None:
                if not raw_length.isdigit() or not raw_length.isascii():
                    raise self._fail(f"bad content-length {raw_length[:20]!r}")
                self._length = int(raw_length)
                if self._length > self._max_body:
                    raise self._fail(f"frame body longer than {self._max_body} bytes")
            self._state = self._BODY
        # Body.
        if self._length >= 0:
            if len(self._buf) < self._length + 1:
                return None
            if self._buf[self._length] != 0:
                raise self._fail(f"{self._command} body not followed by NUL at content-length")
            body = bytes(self._buf[: self._length])
            del self._buf[: self._length + 1]
        else:
            end = self._buf.find(b"\x00")
            if end < 0:
                if len(self._buf) > self._max_body:
                    raise self._fail(f"frame body longer than {self._max_body} bytes")
                return None
            body = bytes(self._buf[:end])
            del self._buf[: end + 1]
        frame = Frame(self._command, self._headers, body)
        self._state = self._COMMAND
        self._headers = {}
        return frame


# --------------------------------------------------------------------------------------------
# Heart-beats
# --------------------------------------------------------------------------------------------


def parse_heartbeat(value: str | None) -> tuple[int, int]:
    """A ``heart-beat`` header as (x, y) milliseconds; missing or unreadable parts count as 0.

    This is as lenient as VDSM: a bad header means "no heart-beats", not an error.
    """
    if not value:
        return (0, 0)
    x, _, y = value.partition(",")
    try:
        cx = max(int(x.strip()), 0)
    except ValueError:
        cx = 0
    try:
        cy = max(int(y.strip()), 0)
    except ValueError:
        cy = 0
    return (cx, cy)


def heartbeat_intervals(mine: tuple[int, int], theirs: tuple[int, int]) -> tuple[float, float]:
    """The negotiated (send, expect) intervals in seconds, 0.0 meaning none.

    ``mine`` is the heart-beat header this side sent (can send every x ms, wants one every y ms),
    ``theirs`` the header the peer sent. STOMP 1.2: this side sends every max(my x, their y) if
    neither is 0, and expects the peer's every max(their x, my y) if neither is 0.
    """
    send = max(mine[0], theirs[1]) if mine[0] and theirs[1] else 0
    expect = max(theirs[0], mine[1]) if theirs[0] and mine[1] else 0
    return (send / 1000.0, expect / 1000.0)


# --------------------------------------------------------------------------------------------
# One connection's socket
# --------------------------------------------------------------------------------------------

_WOULD_BLOCK: Final = (
    BlockingIOError,
    InterruptedError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


class FrameStream:
    """A connected socket (plain or TLS, handshake done) carrying STOMP frames.

    One thread owns the stream and calls :meth:`poll`, which does all socket I/O; any thread may
    call :meth:`send` / :meth:`send_frame`, which only append to an output buffer and wake the
    owner. :meth:`poll` raises :class:`ConnectionClosedError` when the peer closed the
    connection, :class:`StompProtocolError` for a malformed frame, and ``OSError`` (including
    ``ssl.SSLError``) when the socket fails; after any of these, close the stream.
    """

    def __init__(
        self,
        sock: socket.socket,
        accept: frozenset[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._clock = clock
        self._parser = FrameParser(accept, max_body_bytes=max_body_bytes)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._want_write = False
        self._lock = threading.Lock()
        self._out = bytearray()
        self._closed = False
        now = clock()
        self.last_received = now
        """Clock time of the last bytes received (frames or heart-beats)."""
        self.last_sent = now
        """Clock time of the last bytes written to the socket."""

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    @property
    def heartbeats_received(self) -> int:
        """How many heart-beat EOLs arrived between frames."""
        return self._parser.heartbeats

    def peer_certificate(self) -> dict[str, Any] | None:
        """The verified peer certificate of a TLS connection, or None."""
        if isinstance(self._sock, ssl.SSLSocket):
            cert = self._sock.getpeercert()
            return dict(cert) if cert else None
        return None

    def send(self, data: bytes) -> None:
        """Queue raw bytes for the owner thread to write. Raises ConnectionClosedError if closed."""
        with self._lock:
            if self._closed:
                raise ConnectionClosedError("connection closed")
            self._out += data
        self._wake()

    def send_frame(self, frame: Frame) -> None:
        """Queue one frame. Raises ConnectionClosedError if the stream is closed."""
        self.send(encode_frame(frame))

    def send_heartbeat(self) -> None:
        """Queue one heart-beat EOL."""
        self.send(HEARTBEAT)

    def has_output(self) -> bool:
        """True while queued bytes have not all been written."""
        with self._lock:
            return bool(self._out)

    def _wake(self) -> None:
        # A full wake-up pipe already wakes the owner; a closed one means it is gone.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\x00")

    def _flush(self) -> None:
        with self._lock:
            while self._out:
                try:
                    sent = self._sock.send(self._out)
                except _WOULD_BLOCK:
                    return
                if sent <= 0:
                    return
                del self._out[:sent]
                self.last_sent = self._clock()

    def _read(self) -> list[Frame]:
        frames: list[Frame] = []
        while True:
            try:
                data = self._sock.recv(65536)
            except _WOULD_BLOCK:
                return frames
            if not data:
                if frames:
                    return frames
                raise ConnectionClosedError("connection closed by peer")
            self.last_received = self._clock()
            frames += self._parser.feed(data)

    def poll(self, timeout: float) -> list[Frame]:
        """Write what can be written, wait up to ``timeout`` seconds for input, return frames.

        Returns early when bytes arrive or another thread queues output. Raises as the class
        says when the connection ends or the peer sends a malformed frame.
        """
        if self._closed:
            raise ConnectionClosedError("connection closed")
        self._flush()
        want_write = self.has_output()
        if want_write != self._want_write:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self._selector.modify(self._sock, events)
            self._want_write = want_write
        frames: list[Frame] = []
        for key, mask in self._selector.select(max(timeout, 0.0)):
            if key.fileobj is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
                continue
            if mask & selectors.EVENT_READ:
                frames += self._read()
            if mask & selectors.EVENT_WRITE:
                self._flush()
        self._flush()
        return frames

    def flush(self, timeout: float) -> bool:
        """Write queued output for up to ``timeout`` seconds, ignoring input; True if all went.

        Used before closing after an ERROR or RECEIPT frame, so the peer gets to read it.
        """
        deadline = self._clock() + timeout
        while not self._closed:
            self._flush()
            if not self.has_output():
                return True
            remaining = deadline - self._clock()
            if remaining <= 0:
                return False
            try:
                self._selector.modify(self._sock, selectors.EVENT_WRITE)
                self._want_write = True
                self._selector.select(min(remaining, 0.05))
            except (OSError, ValueError):
                return False
        return False

    def abort(self) -> None:
        """Cut the connection from any thread: the owner's next :meth:`poll` raises.

        Shuts the socket down (the peer sees end of stream) and wakes the owner, which then
        calls :meth:`close`. Idempotent.
        """
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._wake()

    def close(self) -> None:
        """Close the socket and release its descriptors; call it from the owning thread.

        Idempotent; queued output that was not written is dropped, and later :meth:`send` calls
        raise ConnectionClosedError.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        for closer in (
            self._selector.close,
            self._sock.close,
            self._wake_r.close,
            self._wake_w.close,
        ):
            with contextlib.suppress(OSError):
                closer()


# --------------------------------------------------------------------------------------------
# The JSON-RPC binding of the SPM verbs (vdsm-api.yml, API.py, Bridge.py)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerbBinding:
    """How one SPM verb travels: the JSON-RPC method and its parameter names.

    ``renames`` maps the verb's parameter names (VDSM's ``hsm.py`` names, as :meth:`fire`
    receives them) to the method's (the API schema's). Names not listed travel unchanged.
    """

    verb: str
    method: str
    renames: Mapping[str, str]

    def to_wire(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The method's parameters for the verb's ``params``."""
        return {self.renames.get(name, name): value for name, value in params.items()}

    def from_wire(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The verb's parameters for the method's ``params`` (the inverse of :meth:`to_wire`)."""
        back = {wire: name for name, wire in self.renames.items()}
        return {back.get(name, name): value for name, value in params.items()}


POOL_PARAM: Final = "storagepoolID"
"""The API schema's name of the storage pool id parameter (``spUUID`` in hsm.py)."""

_IMAGE_RENAMES: Final = {
    "spUUID": POOL_PARAM,
    "sdUUID": "storagedomainID",
    "imgUUID": "imageID",
}
_VOLUME_RENAMES: Final = {**_IMAGE_RENAMES, "volUUID": "volumeID"}

VERB_BINDINGS: Final[Mapping[str, VerbBinding]] = {
    b.verb: b
    for b in (
        # API.Volume(volumeID, storagepoolID, storagedomainID, imageID).create(...) ->
        # hsm.createVolume(sdUUID, spUUID, imgUUID, size, volFormat, preallocate, diskType,
        # volUUID, desc, srcImgUUID, srcVolUUID, initialSize)
        VerbBinding("createVolume", "Volume.create", _VOLUME_RENAMES),
        # API.Volume.delete(postZero, force, discard) -> hsm.deleteVolume(..., [volUUID], ...)
        VerbBinding("deleteVolume", "Volume.delete", _VOLUME_RENAMES),
        # API.Volume.copy: the Volume's own image and volume are copyImage's source.
        VerbBinding(
            "copyImage",
            "Volume.copy",
            {
                "spUUID": POOL_PARAM,
                "sdUUID": "storagedomainID",
                "srcImgUUID": "imageID",
                "srcVolUUID": "volumeID",
                "description": "desc",
            },
        ),
        VerbBinding("deleteImage", "Image.delete", _IMAGE_RENAMES),
        VerbBinding("cloneImageStructure", "Image.cloneStructure", _IMAGE_RENAMES),
        VerbBinding("syncImageData", "Image.syncData", _IMAGE_RENAMES),
        VerbBinding("moveImage", "Image.move", _IMAGE_RENAMES),
        VerbBinding("extendVolumeSize", "Volume.extendSize", _VOLUME_RENAMES),
    )
}
"""The asynchronous SPM verbs, each answered by VDSM with a bare task id string."""

METHOD_VERBS: Final[Mapping[str, VerbBinding]] = {b.method: b for b in VERB_BINDINGS.values()}
"""The same bindings, by JSON-RPC method."""


# JSON-RPC 2.0 error codes, as VDSM's yajsonrpc uses them.
RPC_PARSE_ERROR: Final = -32700
RPC_INVALID_REQUEST: Final = -32600
RPC_METHOD_NOT_FOUND: Final = -32601
RPC_INVALID_PARAMS: Final = -32602
RPC_INTERNAL_ERROR: Final = -32603

POOL_UNKNOWN_CODE: Final = 309
"""VDSM's StoragePoolUnknown: "Unknown pool id, pool not connected"."""
