"""The snapshot codec: round trips, and every damaged or hostile blob refused with a reason."""

from __future__ import annotations

import struct
from typing import Any

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import _snapshot
from actors._snapshot import (
    HEADER_SIZE,
    MAGIC,
    SCHEMA_VERSION,
    SnapshotError,
    SnapshotErrorReason,
    SnapshotLimits,
    _frame,
    decode_snapshot,
    encode_snapshot,
)

Reason = SnapshotErrorReason

CHAIN_STATE: dict[str, Any] = {
    "chain_id": "9b2f6c1e-5d3a-4f7e-8c21-0a4b6d8e2f13",
    "pool": "5849b030-626e-47cb-ad90-3ce782d831b3",
    "command": "LiveMigrateDisk",
    "state": "running",
    "step": 2,
    "steps": [
        {"verb": "createVolume", "task_id": "a1", "outcome": "success", "resources": ["img-1"]},
        {"verb": "syncImage", "task_id": None, "outcome": None, "resources": []},
    ],
    "deadline": 1_767_225_600.5,
    "ended": False,
    "token": b"\x00\xff\x10",
    "params": {"size": 2**40, "sparse": True, "ratio": -0.25, "nested": {"a": [1, [2, [3]]]}},
}


def _reason(blob: bytes, limits: SnapshotLimits = _snapshot.DEFAULT_LIMITS) -> Reason:
    with pytest.raises(SnapshotError) as caught:
        decode_snapshot(blob, limits=limits)
    assert isinstance(caught.value, ValueError)
    assert str(caught.value)
    return caught.value.reason


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)
payloads = st.dictionaries(st.text(max_size=12), values, max_size=6)


# --- round trips ------------------------------------------------------------------------------


def test_chain_state_round_trips_unchanged() -> None:
    blob = encode_snapshot(CHAIN_STATE)
    assert blob.startswith(MAGIC)
    assert decode_snapshot(blob) == CHAIN_STATE


@given(payload=payloads)
def test_any_allowed_payload_round_trips(payload: dict[str, Any]) -> None:
    assert decode_snapshot(encode_snapshot(payload)) == payload


def test_tuples_come_back_as_lists() -> None:
    assert decode_snapshot(encode_snapshot({"t": (1, (2, 3))})) == {"t": [1, [2, 3]]}


def test_blob_carries_current_schema_version_and_payload_length() -> None:
    blob = encode_snapshot(CHAIN_STATE)
    magic, version, length = struct.unpack_from(">4sHI", blob)
    assert (magic, version, length) == (MAGIC, SCHEMA_VERSION, len(blob) - HEADER_SIZE)


# --- damage -----------------------------------------------------------------------------------


def test_every_single_bit_flip_in_a_chain_snapshot_is_refused() -> None:
    blob = encode_snapshot(CHAIN_STATE)
    for bit in range(len(blob) * 8):
        damaged = bytearray(blob)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SnapshotError):
            decode_snapshot(bytes(damaged))


@settings(max_examples=300)
@given(payload=payloads, data=st.data())
def test_flipped_bit_anywhere_is_refused_not_decoded_to_a_wrong_value(
    payload: dict[str, Any], data: st.DataObject
) -> None:
    blob = encode_snapshot(payload)
    bit = data.draw(st.integers(min_value=0, max_value=len(blob) * 8 - 1), label="bit")
    damaged = bytearray(blob)
    damaged[bit // 8] ^= 1 << (bit % 8)
    assert _reason(bytes(damaged)) in {
        Reason.CORRUPT,
        Reason.BAD_MAGIC,
        Reason.TRUNCATED,
        Reason.TOO_LARGE,
    }


def test_flipped_payload_bit_is_reported_as_checksum_mismatch() -> None:
    blob = bytearray(encode_snapshot(CHAIN_STATE))
    blob[HEADER_SIZE + 5] ^= 0x01
    with pytest.raises(SnapshotError, match="checksum"):
        decode_snapshot(bytes(blob))


def test_flipped_version_bit_is_corruption_not_an_unknown_version() -> None:
    blob = bytearray(encode_snapshot(CHAIN_STATE))
    blob[5] ^= 0x02
    assert _reason(bytes(blob)) is Reason.CORRUPT


def test_every_truncation_is_reported_as_truncated() -> None:
    blob = encode_snapshot(CHAIN_STATE)
    for length in range(len(blob)):
        assert _reason(blob[:length]) is Reason.TRUNCATED, length


def test_bytes_after_the_payload_are_corruption() -> None:
    assert _reason(encode_snapshot(CHAIN_STATE) + b"\x00") is Reason.CORRUPT


@pytest.mark.parametrize("blob", [b"XXXX" + bytes(30), b"\x93\x01\x02", b"{}", b"SPMC" + bytes(20)])
def test_blob_without_the_magic_is_refused_as_bad_magic(blob: bytes) -> None:
    assert _reason(blob) is Reason.BAD_MAGIC


# --- versions ---------------------------------------------------------------------------------


def test_newer_schema_version_is_refused() -> None:
    blob = _frame(msgpack.packb({"a": 1}), SCHEMA_VERSION + 1)
    with pytest.raises(SnapshotError, match="newer") as caught:
        decode_snapshot(blob)
    assert caught.value.reason is Reason.UNSUPPORTED_VERSION


def test_older_schema_version_without_upgrade_is_refused() -> None:
    blob = _frame(msgpack.packb({"a": 1}), 0)
    with pytest.raises(SnapshotError, match="no upgrade path") as caught:
        decode_snapshot(blob)
    assert caught.value.reason is Reason.UNSUPPORTED_VERSION


def test_older_schema_version_is_upgraded_through_the_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old_blob = encode_snapshot({"step": 3})
    monkeypatch.setattr(_snapshot, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(_snapshot.UPGRADES, 1, lambda p: {"cursor": p["step"]})
    assert decode_snapshot(old_blob) == {"cursor": 3}
    assert decode_snapshot(encode_snapshot({"cursor": 4})) == {"cursor": 4}
    assert _reason(_frame(msgpack.packb({}), 0)) is Reason.UNSUPPORTED_VERSION


def test_failing_upgrade_is_refused_as_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    old_blob = encode_snapshot({"step": 3})
    monkeypatch.setattr(_snapshot, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(_snapshot.UPGRADES, 1, lambda p: {"cursor": p["missing"]})
    with pytest.raises(SnapshotError, match="upgrade from schema version 1 to 2") as caught:
        decode_snapshot(old_blob)
    assert caught.value.reason is Reason.INVALID


# --- bounds -----------------------------------------------------------------------------------

SMALL = SnapshotLimits(max_size=1024, max_container_len=10, max_depth=4)


def test_oversize_payload_is_refused_when_encoding() -> None:
    with pytest.raises(SnapshotError) as caught:
        encode_snapshot({"blob": b"x" * 2000}, limits=SMALL)
    assert caught.value.reason is Reason.TOO_LARGE


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    blob = encode_snapshot({"blob": b"x" * 2000})
    assert _reason(blob, SMALL) is Reason.TOO_LARGE
    assert _reason(blob[:HEADER_SIZE], SMALL) is Reason.TOO_LARGE


def test_oversize_container_is_refused() -> None:
    blob = encode_snapshot({"steps": list(range(11))})
    assert _reason(blob, SMALL) is Reason.TOO_LARGE
    with pytest.raises(SnapshotError) as caught:
        encode_snapshot({"steps": list(range(11))}, limits=SMALL)
    assert caught.value.reason is Reason.TOO_LARGE


def _nested(depth: int) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for _ in range(depth - 1):
        payload = {"n": payload}
    return payload


def test_nesting_up_to_the_limit_is_accepted() -> None:
    assert decode_snapshot(encode_snapshot(_nested(4), limits=SMALL), limits=SMALL) == _nested(4)


def test_too_deep_payload_is_refused_when_encoding_and_decoding() -> None:
    with pytest.raises(SnapshotError) as caught:
        encode_snapshot(_nested(5), limits=SMALL)
    assert caught.value.reason is Reason.TOO_DEEP
    assert _reason(encode_snapshot(_nested(5)), SMALL) is Reason.TOO_DEEP


def test_nesting_beyond_msgpack_stack_is_refused_as_too_deep() -> None:
    body = b"\x81\xa1n" * 5000 + b"\x80"
    assert _reason(_frame(body, SCHEMA_VERSION)) is Reason.TOO_DEEP


def test_self_referencing_payload_is_refused_when_encoding() -> None:
    payload: dict[str, Any] = {}
    payload["self"] = payload
    with pytest.raises(SnapshotError) as caught:
        encode_snapshot(payload)
    assert caught.value.reason is Reason.TOO_DEEP


# --- content ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(msgpack.packb({"x": msgpack.ExtType(5, b"obj")}), id="ext-type"),
        pytest.param(b"\x81\xa1x\xd6\xff\x00\x00\x00\x01", id="timestamp-ext"),
        pytest.param(b"\x81\xa1x\xd4\xfb\x00", id="negative-ext-type"),
        pytest.param(msgpack.packb({"at": msgpack.Timestamp(1, 0)}), id="timestamp-object"),
        pytest.param(msgpack.packb({1: "int key"}), id="int-key"),
        pytest.param(msgpack.packb({b"k": "bytes key"}, use_bin_type=True), id="bytes-key"),
        pytest.param(msgpack.packb(["not", "a", "map"]), id="top-level-list"),
        pytest.param(msgpack.packb(7), id="top-level-int"),
        pytest.param(b"\x81\xa1k\xa2\xff\xfe", id="invalid-utf8"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x82\xa1k\x01", id="incomplete-map"),
        pytest.param(b"\x80\x80", id="two-objects"),
        pytest.param(b"", id="empty-payload"),
    ],
)
def test_payload_that_is_not_a_plain_map_is_refused_as_invalid(body: bytes) -> None:
    assert _reason(_frame(body, SCHEMA_VERSION)) is Reason.INVALID


def test_extension_type_is_named_in_the_error() -> None:
    blob = _frame(msgpack.packb({"x": msgpack.ExtType(42, b"obj")}), SCHEMA_VERSION)
    with pytest.raises(SnapshotError, match="extension type 42"):
        decode_snapshot(blob)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"x": object()}, id="object"),
        pytest.param({"x": {1, 2}}, id="set"),
        pytest.param({"x": msgpack.ExtType(1, b"")}, id="ext-type"),
        pytest.param({"x": bytearray(b"ab")}, id="bytearray"),
        pytest.param({"x": {2: "int key"}}, id="nested-int-key"),
        pytest.param({"x": 2**64}, id="int-too-big"),
        pytest.param({"x": -(2**63) - 1}, id="int-too-small"),
    ],
)
def test_payload_decode_would_refuse_is_refused_when_encoding(payload: dict[str, Any]) -> None:
    with pytest.raises(SnapshotError) as caught:
        encode_snapshot(payload)
    assert caught.value.reason is Reason.INVALID


def test_top_level_must_be_a_map_when_encoding() -> None:
    with pytest.raises(SnapshotError, match="must be a map"):
        encode_snapshot([1, 2])  # type: ignore[arg-type]
