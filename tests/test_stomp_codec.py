"""The STOMP 1.2 frame codec: encoding, parsing across read boundaries, malformed input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spm._stomp import (
    CLIENT_COMMANDS,
    SERVER_COMMANDS,
    VERB_BINDINGS,
    Frame,
    FrameParser,
    StompProtocolError,
    encode_frame,
    heartbeat_intervals,
    parse_heartbeat,
)

ALL = CLIENT_COMMANDS | SERVER_COMMANDS


def parse_all(data: bytes, chunk: int | None = None) -> list[Frame]:
    parser = FrameParser(ALL)
    if chunk is None:
        return parser.feed(data)
    frames: list[Frame] = []
    for i in range(0, len(data), chunk):
        frames += parser.feed(data[i : i + chunk])
    return frames


def test_send_frame_round_trips_with_content_length() -> None:
    frame = Frame("SEND", {"destination": "jms.topic.vdsm_requests", "reply-to": "r"}, b'{"a": 1}')
    data = encode_frame(frame)
    assert data.startswith(b"SEND\n")
    assert b"content-length:8\n" in data
    assert data.endswith(b"\n\n" + b'{"a": 1}' + b"\x00")
    assert parse_all(data) == [Frame("SEND", {**frame.headers, "content-length": "8"}, b'{"a": 1}')]


def test_frame_split_into_single_bytes_parses_the_same() -> None:
    data = encode_frame(Frame("MESSAGE", {"destination": "d", "subscription": "s"}, b"hello"))
    assert parse_all(data, chunk=1) == parse_all(data)
    assert parse_all(data, chunk=1)[0].body == b"hello"


def test_several_frames_in_one_read_all_come_out_in_order() -> None:
    data = b"".join(
        encode_frame(Frame("MESSAGE", {"destination": "d", "n": str(i)}, str(i).encode()))
        for i in range(5)
    )
    frames = parse_all(data)
    assert [f.headers["n"] for f in frames] == ["0", "1", "2", "3", "4"]
    assert [f.body for f in frames] == [b"0", b"1", b"2", b"3", b"4"]


def test_body_containing_nul_is_kept_whole_with_content_length() -> None:
    body = b"before\x00after\x00"
    frames = parse_all(encode_frame(Frame("SEND", {"destination": "d"}, body)), chunk=3)
    assert frames[0].body == body


def test_body_without_content_length_ends_at_first_nul() -> None:
    frames = parse_all(b"SEND\ndestination:d\n\nabc\x00SEND\ndestination:e\n\n\x00")
    assert [(f.headers["destination"], f.body) for f in frames] == [("d", b"abc"), ("e", b"")]


def test_heartbeat_eols_between_frames_are_counted_and_skipped() -> None:
    parser = FrameParser(ALL)
    frames = parser.feed(b"\n\r\n" + encode_frame(Frame("RECEIPT", {"receipt-id": "1"})) + b"\n\n")
    assert [f.command for f in frames] == ["RECEIPT"]
    assert parser.heartbeats == 4


def test_crlf_line_endings_are_accepted() -> None:
    frames = parse_all(b"SEND\r\ndestination:d\r\ncontent-length:2\r\n\r\nok\x00")
    assert frames == [Frame("SEND", {"destination": "d", "content-length": "2"}, b"ok")]


def test_header_values_are_escaped_and_unescaped() -> None:
    value = "a:b\\c\nd\re"
    data = encode_frame(Frame("MESSAGE", {"x:y": value}, b""))
    assert b"x\\cy:a\\cb\\\\c\\nd\\re\n" in data
    assert parse_all(data)[0].headers["x:y"] == value


def test_connect_headers_are_not_escaped() -> None:
    data = encode_frame(Frame("CONNECT", {"accept-version": "1.2", "host": "h:1"}))
    assert b"host:h:1\n" in data
    assert parse_all(data)[0].headers["host"] == "h:1"


def test_repeated_header_keeps_the_first_value() -> None:
    frames = parse_all(b"MESSAGE\nfoo:first\nfoo:second\n\n\x00")
    assert frames[0].headers["foo"] == "first"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"BOGUS\n\n\x00", "unexpected command"),
        (b"SEND\nno colon here\n\n\x00", "malformed header"),
        (b"SEND\n:value\n\n\x00", "malformed header"),
        (b"SEND\nbad:esc\\t\n\n\x00", "undefined escape"),
        (b"SEND\ncontent-length:abc\n\n\x00", "bad content-length"),
        (b"SEND\ncontent-length:-1\n\n\x00", "bad content-length"),
        (b"SEND\ncontent-length:2\n\nabc\x00", "not followed by NUL"),
        (b"SEND\nx:\xff\xfe\n\n\x00", "not UTF-8"),
    ],
)
def test_malformed_frames_raise_protocol_error(data: bytes, needle: str) -> None:
    parser = FrameParser(ALL)
    with pytest.raises(StompProtocolError, match=needle):
        parser.feed(data)
    # The parser stays failed: a stream out of sync is never read again.
    with pytest.raises(StompProtocolError):
        parser.feed(encode_frame(Frame("SEND", {"destination": "d"}, b"")))


def test_server_parser_refuses_server_commands() -> None:
    with pytest.raises(StompProtocolError, match="unexpected command"):
        FrameParser(CLIENT_COMMANDS).feed(encode_frame(Frame("MESSAGE", {}, b"x")))


def test_oversized_headers_and_bodies_are_refused() -> None:
    parser = FrameParser(ALL, max_header_bytes=64)
    with pytest.raises(StompProtocolError, match="headers longer"):
        parser.feed(b"SEND\n" + b"x" * 100)
    parser = FrameParser(ALL, max_body_bytes=10)
    with pytest.raises(StompProtocolError, match="body longer"):
        parser.feed(b"SEND\ncontent-length:11\n\n")
    parser = FrameParser(ALL, max_body_bytes=10)
    with pytest.raises(StompProtocolError, match="body longer"):
        parser.feed(b"SEND\n\n" + b"y" * 11)


def test_encode_refuses_bad_commands() -> None:
    with pytest.raises(ValueError):
        encode_frame(Frame("send", {}))
    with pytest.raises(ValueError):
        encode_frame(Frame("CONNECT", {"host": "a\nb"}))


def test_heartbeat_header_parsing_is_lenient_like_vdsm() -> None:
    assert parse_heartbeat("1000,2000") == (1000, 2000)
    assert parse_heartbeat(None) == (0, 0)
    assert parse_heartbeat("x,5") == (0, 5)
    assert parse_heartbeat("7") == (7, 0)
    assert parse_heartbeat("-3,-4") == (0, 0)


def test_heartbeat_negotiation_takes_the_slower_side_and_zero_disables() -> None:
    # I can send every 100 ms and want one every 200; the peer can send every 300 and wants 50.
    assert heartbeat_intervals((100, 200), (300, 50)) == (0.1, 0.3)
    assert heartbeat_intervals((0, 200), (300, 50)) == (0.0, 0.3)
    assert heartbeat_intervals((100, 0), (300, 0)) == (0.0, 0.0)


def test_verb_bindings_use_vdsm_api_names_and_invert() -> None:
    create = VERB_BINDINGS["createVolume"]
    assert create.method == "Volume.create"
    params = {"spUUID": "p", "sdUUID": "d", "imgUUID": "i", "volUUID": "v", "size": "1"}
    wire = create.to_wire(params)
    assert wire == {
        "storagepoolID": "p",
        "storagedomainID": "d",
        "imageID": "i",
        "volumeID": "v",
        "size": "1",
    }
    assert create.from_wire(wire) == params
    copy = VERB_BINDINGS["copyImage"]
    assert copy.method == "Volume.copy"
    assert copy.to_wire({"srcImgUUID": "i", "srcVolUUID": "v", "dstImgUUID": "j"}) == {
        "imageID": "i",
        "volumeID": "v",
        "dstImgUUID": "j",
    }
    assert {b.method for b in VERB_BINDINGS.values()} >= {
        "Volume.create",
        "Volume.delete",
        "Volume.copy",
        "Image.delete",
        "Image.cloneStructure",
        "Image.syncData",
    }


header_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
    max_size=12,
)
frames_strategy = st.lists(
    st.builds(
        Frame,
        st.sampled_from(sorted(ALL - {"CONNECT", "CONNECTED"})),
        st.dictionaries(header_text.filter(bool), header_text, max_size=4).map(
            lambda h: {k: v for k, v in h.items() if k != "content-length"}
        ),
        st.binary(max_size=64),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    frames=frames_strategy,
    cuts=st.lists(st.integers(min_value=0), max_size=8),
    eols=st.integers(0, 3),
)
def test_any_frames_cut_anywhere_parse_back_to_the_same_frames(
    frames: list[Frame], cuts: list[int], eols: int
) -> None:
    data = b"".join(b"\n" * eols + encode_frame(f) for f in frames)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    parser = FrameParser(ALL)
    out: list[Frame] = []
    for start, end in itertools.pairwise(points):
        out += parser.feed(data[start:end])
    assert [(f.command, f.body) for f in out] == [(f.command, f.body) for f in frames]
    for got, sent in zip(out, frames, strict=True):
        expected = dict(sent.headers)
        if sent.body or sent.command in ("SEND", "MESSAGE", "ERROR"):
            expected["content-length"] = str(len(sent.body))
        assert got.headers == expected
