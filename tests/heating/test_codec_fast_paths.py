"""The speed-ups the heating benchmark brought to the codecs keep their behaviour.

- hygw.decode_message tries orjson first, then ``json.loads``, and runs the quirk repairs only
  when both fail: sound because no repair changes text that is valid JSON, and because orjson's
  result is used only when it cannot differ from the standard library's (no float in it).
- cjt188.parse_frame reads the checked header with a ``struct`` layout derived from the construct
  declaration: it must agree with the interpreted ``FRAME.parse`` on every valid frame.
- The payload decoders scale BCD with integer arithmetic instead of Decimal and format the meter
  clock from its digits: the same values as the Decimal and datetime computations.
"""

from __future__ import annotations

import datetime
import json
from decimal import Decimal

import pytest
from construct import Bytes, Int8ul, Int16ub, Int16ul, Struct
from gatewayd.protocols import cjt188, hygw
from gatewayd.protocols.layout import fixed_layout
from hypothesis import given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["CSQ", "meter_data", "stat", "a", "b"]), children, max_size=4
        )
    ),
    max_leaves=12,
)


@settings(max_examples=400, deadline=None)
@given(json_values, st.booleans())
def test_repairs_never_change_valid_json(value, compact):
    text = json.dumps(value, separators=(",", ":") if compact else (", ", ": "))
    repaired, quirks = hygw._repair(text)
    assert quirks == []
    assert json.loads(repaired) == value


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 255),
    st.binary(min_size=7, max_size=7),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.binary(max_size=60),
    st.integers(0, 4),
)
def test_fixed_layout_parse_agrees_with_the_declaration(kind, address, control, di, ser, data, fe):
    frame = cjt188.build_frame(kind, address, control, di, ser, data, preambles=fe)
    parsed = cjt188.parse_frame(frame)
    reference = cjt188.FRAME.parse(frame[fe:])
    signed = reference.signed.value
    assert parsed.meter_type == signed.meter_type
    assert parsed.address == signed.address.hex().upper()
    assert parsed.control == signed.control
    assert parsed.data == signed.body.data
    assert parsed.ser == signed.body.ident.ser
    assert parsed.checksum == reference.checksum
    assert parsed.preambles == fe and parsed.raw == frame


def test_seed_message_with_quirks_still_repaired():
    message = hygw.decode_message(
        '{"gw":{"msg_id":1,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{"CSQ":99,99,}}'
    )
    assert message.quirks == ("csq_unquoted", "trailing_comma")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 255), st.binary(min_size=7, max_size=7), st.binary(max_size=2))
def test_frames_shorter_than_an_ident_agree_with_the_declaration(kind, address, body):
    signed = bytes([0x68, kind]) + address + bytes([0x81, len(body)]) + body
    frame = signed + bytes([sum(signed) & 0xFF, 0x16])
    parsed = cjt188.parse_frame(frame)
    reference = cjt188.FRAME.parse(frame).signed.value
    assert reference.body.ident is None and parsed.di is None and parsed.ser is None
    assert parsed.data == reference.body.data == body


def test_fixed_layout_reads_the_declared_fields():
    layout = fixed_layout(Struct("a" / Int8ul, "b" / Bytes(3), "c" / Int16ul))
    assert layout.names == ("a", "b", "c") and layout.size == 6
    assert layout.unpack_from(b"\x01abc\x02\x01") == (1, b"abc", 0x0102)
    with pytest.raises(TypeError):  # big-endian multi-byte fields are not translated
        fixed_layout(Struct("a" / Int16ub))


json_numbers = st.recursive(
    st.integers(-(2**80), 2**80) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(json_numbers, st.sampled_from([20, 2**64, 1]))
def test_orjson_path_gives_what_the_standard_library_gives(data, msg_id):
    """Integers beyond 64 bits (orjson reads them as floats) and floats go the exact way."""
    text = json.dumps({"gw": {"msg_id": msg_id, "gw_id": "02345678903"}, "data": {"x": data}})
    reference = json.loads(text)
    try:
        message = hygw.decode_message(text.encode())
    except hygw.HygwError as exc:
        assert exc.reason == "msg_id" and msg_id == 2**64
        assert str(2**64) in exc.message  # the integer as sent, not orjson's float
        return
    assert message.fields == reference["data"]
    assert repr(message.fields) == repr(reference["data"])  # 1 stays 1, 1.0 stays 1.0


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 10**8 - 1), st.sampled_from([1, 10, 100]), st.integers(0, 4), st.booleans())
def test_bcd_scaling_matches_decimal(number, multiplier, decimals, negative):
    raw = bytes.fromhex(f"{number:08d}")[::-1]
    if negative:
        raw = raw[:3] + bytes([raw[3] | 0xF0])
        number = -(number % 10**7)
    digits = cjt188._bcd_value(raw[::-1].hex().upper(), signed=negative)
    assert digits == number
    exact = float(Decimal(number).scaleb(-decimals) * multiplier)
    assert cjt188._scaled(digits, multiplier, decimals) == exact


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 12, 31))
)
def test_meter_clock_matches_datetime(moment):
    moment = moment.replace(microsecond=0)
    digits = moment.strftime("%S%M%H%d%m") + f"{moment.year % 100:02d}{moment.year // 100:02d}"
    field = cjt188._bcd_clock(bytes.fromhex(digits))
    assert field["value"] == moment.isoformat()


def test_meter_clock_rejects_impossible_dates():
    assert cjt188._bcd_clock(bytes.fromhex("00000031022420"))["error"] == "date"  # 31 February
    assert cjt188._bcd_clock(bytes.fromhex("0000000101000A"))["error"] == "bcd"
