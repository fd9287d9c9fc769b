"""The snapshot codec: a chain's state as framed, checksummed, bounded msgpack.

A snapshot blob is a fixed 18-byte header followed by the msgpack payload::

    offset  size  field
    0       4     magic, b"SPCH"
    4       2     schema version, unsigned big-endian
    6       4     payload length in bytes, unsigned big-endian
    10      8     CRC-32 and Adler-32 of bytes 0..9 and of the payload
    18      n     payload: one msgpack map with str keys

msgpack on its own happily decodes a flipped bit into a different but valid value, so the
digest covers the payload and the header fields before it: any change to the version, the length
or the payload is reported as corruption instead of being decoded. Decoding is bounded (total
size, container lengths, nesting depth), accepts only str map keys and refuses every msgpack
extension type (including the timestamp extension), so a hostile or damaged blob can neither
build objects nor exhaust memory.

Schema versions: ``SCHEMA_VERSION`` is what `encode_snapshot` writes. A blob of an older version
is decoded and then passed through `UPGRADES` one version at a time (``UPGRADES[v]`` turns a
version-``v`` payload into a version-``v + 1`` one); an older version with a missing step, and
any version newer than ``SCHEMA_VERSION``, is refused with reason
`SnapshotErrorReason.UNSUPPORTED_VERSION`.
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]

__all__ = [
    "DEFAULT_LIMITS",
    "HEADER_SIZE",
    "MAGIC",
    "SCHEMA_VERSION",
    "UPGRADES",
    "SnapshotError",
    "SnapshotErrorReason",
    "SnapshotLimits",
    "decode_snapshot",
    "encode_snapshot",
]

MAGIC: Final = b"SPCH"
"""The first four bytes of every snapshot blob."""

SCHEMA_VERSION: Final = 1
"""The schema version `encode_snapshot` writes and `decode_snapshot` returns."""

_PREFIX = struct.Struct(">4sHI")
_DIGEST: Final = struct.Struct(">II")
_DIGEST_SIZE: Final = _DIGEST.size
HEADER_SIZE: Final = _PREFIX.size + _DIGEST_SIZE
"""Bytes in front of the msgpack payload: magic, version, length, digest."""

Upgrade = Callable[[dict[str, Any]], dict[str, Any]]

UPGRADES: dict[int, Upgrade] = {}
"""``UPGRADES[v]`` turns a decoded version-``v`` payload into a version-``v + 1`` payload.

Empty while only version 1 exists. When the schema changes, bump `SCHEMA_VERSION` and register
the step from the previous version here; blobs already in a store then keep decoding.
"""


class SnapshotErrorReason(enum.StrEnum):
    """Why a snapshot blob was refused."""

    BAD_MAGIC = "bad_magic"
    """The blob does not start with `MAGIC`: it is not a snapshot at all."""
    TRUNCATED = "truncated"
    """The blob is shorter than its header or than the payload length the header declares."""
    CORRUPT = "corrupt"
    """The digest does not match, or bytes follow the declared payload."""
    UNSUPPORTED_VERSION = "unsupported_version"
    """The schema version is newer than this code, or older without an upgrade path."""
    TOO_LARGE = "too_large"
    """The blob, or one of its strings or containers, exceeds `SnapshotLimits`."""
    TOO_DEEP = "too_deep"
    """Containers are nested deeper than `SnapshotLimits.max_depth`."""
    INVALID = "invalid"
    """The payload is not a map of allowed values: a non-str key, an extension type, a value of
    an unsupported type, or bytes that are not msgpack."""


class SnapshotError(ValueError):
    """A snapshot that cannot be encoded or decoded; `reason` says which way it is wrong.

    The message names the problem in words (for logs and the quarantine table); `reason` is the
    machine-readable category (for metrics labels and tests).
    """

    def __init__(self, reason: SnapshotErrorReason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason: SnapshotErrorReason = reason


@dataclass(frozen=True, slots=True)
class SnapshotLimits:
    """Bounds applied when encoding and decoding a snapshot.

    `max_size` bounds the msgpack payload in bytes (and with it every string and bytes value);
    `max_container_len` bounds the entries of any single list or map; `max_depth` bounds how
    deeply lists and maps nest, the top-level map being depth 1.
    """

    max_size: int = 4 * 1024 * 1024
    max_container_len: int = 100_000
    max_depth: int = 32


DEFAULT_LIMITS: Final = SnapshotLimits()


class _ExtRefused(ValueError):
    pass


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _ExtRefused(f"msgpack extension type {code} ({len(data)} bytes) is not allowed")


_CHUNK: Final = 4096


def _digest(prefix: bytes, payload: bytes) -> bytes:
    # CRC-32 (every burst of up to 32 flipped bits, every odd count) next to Adler-32, over
    # chunks small enough that zlib keeps the GIL: hashlib and zlib release it for larger
    # buffers, and a CommandActor worker that lets go of the GIL to checksum a few kilobytes
    # then waits up to the interpreter's switch interval (5 ms) to get it back.
    crc = zlib.crc32(prefix)
    adler = zlib.adler32(prefix)
    if len(payload) <= _CHUNK:  # the usual case: a snapshot of a few hundred bytes
        return _DIGEST.pack(zlib.crc32(payload, crc), zlib.adler32(payload, adler))
    view = memoryview(payload)
    for i in range(0, len(view), _CHUNK):
        chunk = view[i : i + _CHUNK]
        crc = zlib.crc32(chunk, crc)
        adler = zlib.adler32(chunk, adler)
    return _DIGEST.pack(crc, adler)


_SCALARS: Final = (str, int, float, bytes, bool, type(None))
_SCALAR_TYPES: Final = frozenset(_SCALARS)
_CONTAINERS: Final = (dict, list)


def _check_tree(payload: Any, limits: SnapshotLimits, *, encoding: bool) -> None:
    """Raise `SnapshotError` unless `payload` is a str-keyed map of allowed values within limits.

    While encoding, plain tuples are accepted as lists (msgpack writes them as arrays); tuple
    subclasses such as msgpack's ExtType are refused. Recursion is
    bounded by `limits.max_depth`, which is checked before descending.
    """
    if not isinstance(payload, dict):
        raise SnapshotError(
            SnapshotErrorReason.INVALID,
            f"the top-level value must be a map, not {type(payload).__name__}",
        )
    _check_node(payload, 1, limits, encoding)


def _check_node(
    node: Any,
    depth: int,
    limits: SnapshotLimits,
    tuples: bool,
) -> None:
    if depth > limits.max_depth:
        raise SnapshotError(
            SnapshotErrorReason.TOO_DEEP,
            f"containers nest deeper than the limit of {limits.max_depth}",
        )
    if len(node) > limits.max_container_len:
        raise SnapshotError(
            SnapshotErrorReason.TOO_LARGE,
            f"a container holds {len(node)} entries, more than the limit of "
            f"{limits.max_container_len}",
        )
    values: Iterable[Any]
    if isinstance(node, dict):
        for key in node:
            if type(key) is not str and not isinstance(key, str):
                raise SnapshotError(
                    SnapshotErrorReason.INVALID,
                    f"map key {key!r} is a {type(key).__name__}; only str keys are allowed",
                )
        values = node.values()
    else:
        values = node
    for value in values:
        if type(value) in _SCALAR_TYPES:
            continue
        if isinstance(value, _CONTAINERS) or (tuples and type(value) is tuple):
            _check_node(value, depth + 1, limits, tuples)
        elif not isinstance(value, _SCALARS):
            raise SnapshotError(
                SnapshotErrorReason.INVALID,
                f"a value of type {type(value).__name__} cannot be stored in a snapshot",
            )


def encode_snapshot(
    payload: dict[str, Any], *, limits: SnapshotLimits = DEFAULT_LIMITS, checked: bool = True
) -> bytes:
    """Encode a chain's state as a framed snapshot blob of the current `SCHEMA_VERSION`.

    `payload` must be a map with str keys whose values are str, int, float, bool, None, bytes,
    lists (tuples are written as lists) and such maps, within `limits`. Anything else raises
    `SnapshotError` here, so that no blob is ever written that `decode_snapshot` would refuse:
    reason INVALID for a wrong type, a non-str key or an int outside msgpack's 64-bit range,
    TOO_DEEP or TOO_LARGE for a payload beyond the limits.

    ``checked=False`` skips the walk over the payload (the size limit still holds) for a
    payload built from values already validated against the same limits, such as a chain state
    whose spec passed :func:`actors._spec.validate_spec`: the runtime encodes one per
    transition, and the walk costs more than the encoding.
    """
    if checked:
        _check_tree(payload, limits, encoding=True)
    try:
        body: bytes = msgpack.packb(payload, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise SnapshotError(SnapshotErrorReason.INVALID, f"cannot encode payload: {exc}") from exc
    if len(body) > limits.max_size:
        raise SnapshotError(
            SnapshotErrorReason.TOO_LARGE,
            f"payload is {len(body)} bytes, more than the limit of {limits.max_size}",
        )
    prefix = _PREFIX.pack(MAGIC, SCHEMA_VERSION, len(body))
    return prefix + _digest(prefix, body) + body


def _frame(body: bytes, version: int) -> bytes:
    """Frame already-encoded msgpack `body` as a blob of schema `version` (tests, upgrades)."""
    prefix = _PREFIX.pack(MAGIC, version, len(body))
    return prefix + _digest(prefix, body) + body


def decode_snapshot(blob: bytes, *, limits: SnapshotLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode a blob written by `encode_snapshot` and return the payload at `SCHEMA_VERSION`.

    Every check happens before a value is returned, so a blob either decodes to exactly what was
    encoded or raises `SnapshotError`, never a plausible wrong value. In order: BAD_MAGIC if it
    does not start with `MAGIC`; TRUNCATED if it is shorter than its header or its declared
    payload; TOO_LARGE if the declared payload exceeds `limits.max_size`; CORRUPT if bytes follow
    the payload or the digest does not match; UNSUPPORTED_VERSION for a newer version or an
    older one `UPGRADES` cannot bring forward; then the payload itself: INVALID if it is not
    msgpack, uses an extension type, has a non-str key or is not a map; TOO_LARGE or TOO_DEEP
    beyond `limits`. An upgrade function that raises is reported as INVALID.
    """
    data = bytes(blob)
    if len(data) >= len(MAGIC) and data[: len(MAGIC)] != MAGIC:
        raise SnapshotError(
            SnapshotErrorReason.BAD_MAGIC,
            f"blob starts with {data[: len(MAGIC)]!r}, not the snapshot magic {MAGIC!r}",
        )
    if len(data) < HEADER_SIZE:
        if len(data) < len(MAGIC) and data != MAGIC[: len(data)]:
            raise SnapshotError(
                SnapshotErrorReason.BAD_MAGIC,
                f"blob {data!r} does not start with the snapshot magic {MAGIC!r}",
            )
        raise SnapshotError(
            SnapshotErrorReason.TRUNCATED,
            f"blob is {len(data)} bytes, shorter than the {HEADER_SIZE}-byte header",
        )
    _, version, length = _PREFIX.unpack_from(data)
    if length > limits.max_size:
        raise SnapshotError(
            SnapshotErrorReason.TOO_LARGE,
            f"header declares a {length}-byte payload, more than the limit of {limits.max_size}",
        )
    actual = len(data) - HEADER_SIZE
    if actual < length:
        raise SnapshotError(
            SnapshotErrorReason.TRUNCATED,
            f"header declares a {length}-byte payload but only {actual} bytes follow",
        )
    if actual > length:
        raise SnapshotError(
            SnapshotErrorReason.CORRUPT,
            f"{actual - length} unexpected bytes follow the {length}-byte payload",
        )
    body = data[HEADER_SIZE:]
    if _digest(data[: _PREFIX.size], body) != data[_PREFIX.size : HEADER_SIZE]:
        raise SnapshotError(
            SnapshotErrorReason.CORRUPT,
            "checksum mismatch: the header or payload was altered after it was written",
        )
    _check_version(version)
    payload = _unpack(body, limits)
    for step in range(version, SCHEMA_VERSION):
        try:
            payload = UPGRADES[step](payload)
        except Exception as exc:
            raise SnapshotError(
                SnapshotErrorReason.INVALID,
                f"upgrade from schema version {step} to {step + 1} failed: {exc!r}",
            ) from exc
    return payload


def _check_version(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise SnapshotError(
            SnapshotErrorReason.UNSUPPORTED_VERSION,
            f"schema version {version} is newer than the supported version {SCHEMA_VERSION}",
        )
    missing = [step for step in range(version, SCHEMA_VERSION) if step not in UPGRADES]
    if missing:
        raise SnapshotError(
            SnapshotErrorReason.UNSUPPORTED_VERSION,
            f"schema version {version} is older than {SCHEMA_VERSION} and has no upgrade path "
            f"(no upgrade from version {missing[-1]})",
        )


def pack_nested(payload: dict[str, Any]) -> bytes:
    """msgpack ``payload`` to be stored as a bytes value inside a snapshot (a part that never
    changes, packed once and copied into every later snapshot of its chain)."""
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return body


def unpack_nested(body: bytes, *, limits: SnapshotLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode what :func:`pack_nested` made, with the same bounds and checks as a snapshot's
    payload. Raises SnapshotError."""
    payload = _unpack(body, limits)
    _check_tree(payload, limits, encoding=False)
    return payload


def _unpack(body: bytes, limits: SnapshotLimits) -> dict[str, Any]:
    """Unpack the payload; every extension type is refused by `_refuse_ext`, except the
    timestamp extension (-1), which msgpack decodes itself into a `msgpack.Timestamp` that
    `_check_tree` then refuses."""
    try:
        payload = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_refuse_ext,
            max_str_len=limits.max_size,
            max_bin_len=limits.max_size,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=limits.max_size,
        )
    except _ExtRefused as exc:
        raise SnapshotError(SnapshotErrorReason.INVALID, str(exc)) from exc
    except msgpack.StackError as exc:
        raise SnapshotError(
            SnapshotErrorReason.TOO_DEEP, "payload nests deeper than msgpack's stack allows"
        ) from exc
    except ValueError as exc:
        text = str(exc)
        if "exceeds max_" in text:
            raise SnapshotError(SnapshotErrorReason.TOO_LARGE, text) from exc
        raise SnapshotError(
            SnapshotErrorReason.INVALID,
            f"payload is not valid msgpack: {text or type(exc).__name__}",
        ) from exc
    _check_tree(payload, limits, encoding=False)
    return payload  # type: ignore[no-any-return]
