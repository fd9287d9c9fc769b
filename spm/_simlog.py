"""The simulated SPM's durable state: an append-only log of framed msgpack records.

VDSM persists SPM tasks on the pool's master domain; the simulator persists its tasks and its
storage (the ledger) in one file, ``spm-state.log``, in the directory it is given. Each record is
a frame: a 4-byte little-endian length, the CRC-32 of the payload, and the msgpack payload.

* A call's records are written with one ``write`` while the simulator holds its lock, so the order
  in the file is the order of the changes. A record that reached the kernel survives ``kill -9``
  of the process.
* When the simulator is asked to (``fsync=True``), :meth:`SimLog.sync_to` then makes them durable
  against a power loss with ``fsync`` outside the simulator's lock; one ``fsync`` covers every
  record written before it (group commit), so concurrent callers share it.
* On open, :meth:`SimLog.read` returns every complete record. A torn or corrupt tail (the process
  died mid-write) is cut off at the last good frame, reported, and the file truncated there.
* :meth:`SimLog.rewrite` replaces the file with a compact snapshot atomically (temporary file,
  ``fsync``, ``rename``, ``fsync`` of the directory): a crash leaves either the old or the new file.
* One simulator at a time uses a directory: opening it takes an exclusive ``flock`` on
  ``spm-state.lock`` there, held until :meth:`SimLog.close` (or until the log is dropped, or its
  process dies: the kernel releases the lock with the descriptor). A second opener, in this
  process or another, gets :class:`StateDirInUseError` naming the directory (its rewrite would
  replace the file under the first, which would go on writing to the unlinked old one).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import threading
import weakref
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]

LOG_NAME: Final = "spm-state.log"
LOCK_NAME: Final = "spm-state.lock"
_HEADER: Final = struct.Struct("<II")
_MAX_RECORD: Final = 64 * 1024 * 1024

log = logging.getLogger(__name__)


def encode(record: Any) -> bytes:
    """One framed record."""
    payload: bytes = msgpack.packb(record, use_bin_type=True)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_all(data: bytes) -> tuple[list[Any], int]:
    """Every complete, intact record in ``data`` and the offset just after the last one.

    Stops at the first frame that is cut short, fails its CRC or does not decode: everything
    after it is the torn tail of a write that never completed.
    """
    records: list[Any] = []
    offset = 0
    size = len(data)
    while offset + _HEADER.size <= size:
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + length
        if length > _MAX_RECORD or end > size:
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc:
            break
        try:
            records.append(msgpack.unpackb(payload, raw=False, use_list=True))
        except (ValueError, msgpack.UnpackException):
            break
        offset = end
    return records, offset


class StateDirInUseError(OSError):
    """The state directory is open in another simulator (of this process or another one).

    ``filename`` is the directory as it was given; ``strerror`` says who holds it.
    """

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def _lock_directory(directory: str, path: Path) -> int:
    """Take the exclusive lock of a state directory; return the lock file's descriptor.

    Raises StateDirInUseError when another open file description holds it, OSError when the
    lock file cannot be opened.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            holder = ""
        os.close(fd)
        who = f" (process {holder})" if holder.isdigit() else ""
        raise StateDirInUseError(errno.EWOULDBLOCK, f"in use by another simulator{who}",
                                 directory) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        # Who holds it, for the error a second opener gets; stale once the lock is gone.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError:
        pass
    return fd


class SimLog:
    """The log file of one simulated SPM. Not thread-safe for writers: the simulator serialises
    :meth:`append` under its lock; :meth:`sync_to` may be called from any thread.

    Opening it takes the directory's lock (see the module docs): raises StateDirInUseError when
    another simulator holds it, OSError when the directory cannot be made or used.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / LOG_NAME
        self._lock_fd = _lock_directory(os.fspath(directory), self.directory / LOCK_NAME)
        # A log dropped without close() (a simulated crash) still releases the lock.
        self._unlock: Any = weakref.finalize(self, os.close, self._lock_fd)
        self._fd: int | None = None
        self._closer: Any = None
        self._written = 0
        self._synced = 0
        self._sync_lock = threading.Lock()
        self.truncated_bytes = 0
        """How many bytes of torn tail :meth:`read` cut off."""

    def read(self) -> list[Any]:
        """Every complete record in the file (none when there is no file yet).

        A torn tail is cut off: logged as a warning, counted in :attr:`truncated_bytes`, and the
        file truncated to the last good frame.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        records, good = decode_all(data)
        if good < len(data):
            self.truncated_bytes = len(data) - good
            log.warning("%s: cutting off a torn tail of %d bytes after %d records",
                        self.path, self.truncated_bytes, len(records))
            with open(self.path, "r+b") as f:
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
        return records

    def rewrite(self, records: Iterable[Any]) -> None:
        """Replace the file with ``records``, atomically, and open it for appending."""
        self._close_file()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            chunk: list[bytes] = []
            for record in records:
                chunk.append(encode(record))
                if len(chunk) >= 4096:
                    f.write(b"".join(chunk))
                    chunk.clear()
            f.write(b"".join(chunk))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._fsync_directory()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        # A log dropped without close() (a simulated crash) still releases its descriptor.
        self._closer = weakref.finalize(self, os.close, self._fd)

    def append(self, records: list[bytes]) -> int:
        """Write already-encoded frames with one ``write``; return the write's sequence number
        (to pass to :meth:`sync_to`). Raises OSError when the disk refuses."""
        if self._fd is None:
            raise OSError(f"{self.path} is not open")
        data = b"".join(records)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self._written += 1
        return self._written

    @property
    def written(self) -> int:
        """The sequence number of the latest :meth:`append`."""
        return self._written

    def sync_to(self, seq: int) -> None:
        """Return once every write up to ``seq`` is on disk (one ``fsync`` covers all earlier
        writes; a caller that finds its writes already synced returns at once)."""
        if self._synced >= seq:
            return
        with self._sync_lock:
            if self._synced >= seq or self._fd is None:
                return
            target = self._written
            os.fsync(self._fd)
            if target > self._synced:
                self._synced = target

    def close(self) -> None:
        """Close the file (records already appended stay in it) and release the directory's
        lock, after the file is synced and closed."""
        try:
            self._close_file()
        finally:
            self._unlock()

    def _close_file(self) -> None:
        with self._sync_lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                finally:
                    if self._closer is not None:
                        self._closer()
                    self._fd = None
                    self._closer = None
                    self._synced = self._written

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
