"""The two speed-ups the heating plugin made in the codecs keep their behaviour.

- hygw.decode_message tries ``json.loads`` first and runs the quirk repairs only when that
  fails: sound because no repair changes text that is valid JSON.
- cjt188.parse_frame parses the signed part with construct's compiled parser after its own
  checks: it must agree with the interpreted ``FRAME.parse`` on every valid frame.
"""

from __future__ import annotations

import json

from gatewayd.protocols import cjt188, hygw
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
def test_compiled_parse_agrees_with_the_declaration(kind, address, control, di, ser, data, fe):
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
