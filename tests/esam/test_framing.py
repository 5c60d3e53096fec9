"""gatewayd reader framing v1, the framer registry, our card APDU codec, and fuzzing of both
the framer and the library's argument validators."""

from __future__ import annotations

import pytest
from gatewayd.plugins.esam.plugin import decode_reader_frame
from gatewayd.protocols import esam_apdu as apdu
from gatewayd.protocols.errors import ReaderFramingError
from gatewayd.protocols.esam import FUNCTIONS, EsamError, validate_arguments
from gatewayd.protocols.reader_framing import (
    FRAMERS,
    Framer,
    GatewayV1Framer,
    ReaderCommand,
    ReaderFrame,
    ReaderStatus,
    Rejected,
    available_framings,
    decode_frame,
    framer_for,
    register_framer,
    request,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# POWER_ON, seq 1, slot 0; CRC-16/CCITT-FALSE of 00 03 01 10 00 is BE93 (checked below).
POWER_ON_1 = bytes.fromhex("020003011000BE9303")


def frames(items):
    return [item for item in items if isinstance(item, ReaderFrame)]


def rejected(items):
    return [(item.reason, item.raw) for item in items if isinstance(item, Rejected)]


# --- the frame ------------------------------------------------------------------------------------


def test_golden_frame_bytes_and_crc():
    framer = GatewayV1Framer()
    assert framer.encode(request(1, ReaderCommand.POWER_ON, 0)) == POWER_ON_1
    from crccheck.crc import Crc16CcittFalse

    assert Crc16CcittFalse.calc(POWER_ON_1[1:6]) == 0xBE93  # an independent CRC implementation


def test_reply_frame_round_trip_and_fields():
    framer = GatewayV1Framer()
    req = request(0x7F, ReaderCommand.APDU, 0, bytes.fromhex("0084000008"))
    reply = req.reply(ReaderStatus.OK, bytes.fromhex("11223344556677889000"))
    wire = framer.encode(reply)
    assert wire[:4] == bytes([0x02, 0x00, 0x0D, 0x7F]) and wire[4] == 0x92 and wire[-1] == 0x03
    (decoded,) = framer.feed(wire)
    assert decoded == reply
    assert decoded.is_reply and decoded.status == ReaderStatus.OK
    assert decoded.data == bytes.fromhex("11223344556677889000")
    assert req.slot == 0 and req.data == bytes.fromhex("0084000008")


def test_split_feeding_byte_by_byte():
    framer = GatewayV1Framer()
    found = []
    for byte in POWER_ON_1 * 2:
        found.extend(framer.feed(bytes([byte])))
    assert frames(found) == [ReaderFrame(1, 0x10, b"\x00")] * 2
    assert framer.buffered == 0


def test_resynchronises_after_garbage_bad_crc_bad_length_and_bad_etx():
    framer = GatewayV1Framer(max_payload=16)
    bad_crc = bytearray(POWER_ON_1)
    bad_crc[5] ^= 0x01
    bad_etx = POWER_ON_1[:-1] + b"\x04"
    stream = b"noise" + bytes(bad_crc) + b"\x02\x7f\xff" + bad_etx + POWER_ON_1
    found = framer.feed(stream)
    assert frames(found) == [ReaderFrame(1, 0x10, b"\x00")]
    assert rejected(found) == [
        ("garbage", b"noise"),
        ("crc", bytes(bad_crc)),
        ("length", b"\x02\x7f\xff"),
        ("format", bad_etx),
    ]


def test_max_payload_is_enforced_both_ways():
    framer = GatewayV1Framer(max_payload=4)
    with pytest.raises(ReaderFramingError) as error:
        framer.encode(ReaderFrame(1, 0x12, b"12345"))
    assert error.value.reason == "length"
    big = GatewayV1Framer().encode(ReaderFrame(1, 0x12, b"12345"))
    assert rejected(framer.feed(big))[0][0] == "length"
    assert framer.max_frame == 12


def test_a_false_start_does_not_swallow_the_next_frame():
    framer = GatewayV1Framer()
    # 02 00 10: looks like the start of an 16-byte frame; the real frame follows at once.
    found = framer.feed(b"\x02\x00\x10" + POWER_ON_1 + bytes(20))
    assert frames(found) == [ReaderFrame(1, 0x10, b"\x00")]


def test_reset_forgets_a_partial_frame():
    framer = GatewayV1Framer()
    framer.feed(POWER_ON_1[:5])
    assert framer.buffered == 5
    framer.reset()
    assert framer.buffered == 0
    assert frames(framer.feed(POWER_ON_1)) == [ReaderFrame(1, 0x10, b"\x00")]


def test_decode_frame_and_the_cli_decoder():
    assert decode_frame(POWER_ON_1) == ReaderFrame(1, 0x10, b"\x00")
    with pytest.raises(ReaderFramingError):
        decode_frame(POWER_ON_1 + b"\x02")
    with pytest.raises(ReaderFramingError) as error:
        decode_frame(POWER_ON_1[:-2] + b"\x00\x03")
    assert error.value.reason == "crc"
    assert decode_reader_frame(POWER_ON_1.hex()) == {
        "seq": 1,
        "direction": "request",
        "command": "POWER_ON",
        "slot": 0,
        "data": "",
    }


def test_registry_names_framers_and_accepts_new_ones():
    assert available_framings() == ("gatewayd-v1",)
    with pytest.raises(ReaderFramingError, match="available: gatewayd-v1"):
        framer_for("dkq05")

    class Dkq05Stub(GatewayV1Framer):
        name = "dkq05-test"

    try:
        register_framer(Dkq05Stub)
        assert isinstance(framer_for("dkq05-test"), Dkq05Stub)
    finally:
        FRAMERS.pop("dkq05-test", None)
    assert issubclass(GatewayV1Framer, Framer)


# --- fuzzing the framer ---------------------------------------------------------------------------

frame_strategy = st.builds(
    ReaderFrame,
    seq=st.integers(0, 255),
    command=st.integers(0, 255),
    payload=st.binary(max_size=64),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_fuzz_any_bytes_any_chunking_never_raises_and_stays_bounded(data, cuts):
    framer = GatewayV1Framer(max_payload=64)
    position = 0
    for cut in sorted(cuts) + [len(data)]:
        for item in framer.feed(data[position:cut]):
            assert isinstance(item, ReaderFrame | Rejected)
        position = max(position, cut)
        assert framer.buffered <= framer.max_frame


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=80), frame=frame_strategy, chunk=st.integers(1, 50))
def test_fuzz_a_frame_after_any_garbage_is_recovered(garbage, frame, chunk):
    framer = GatewayV1Framer(max_payload=64)
    stream = garbage + framer.encode(frame) + bytes(framer.max_frame)  # zeros flush false starts
    found = []
    for start in range(0, len(stream), chunk):
        found.extend(framer.feed(stream[start : start + chunk]))
    assert frame in frames(found)


@settings(max_examples=200, deadline=None)
@given(frame=frame_strategy)
def test_fuzz_round_trip(frame):
    framer = GatewayV1Framer()
    assert framer.feed(framer.encode(frame)) == [frame]


# --- our card APDU set ----------------------------------------------------------------------------

DIV = "0000000000000001"
ESAM = "0001111100000032"


def test_function_apdu_layout_and_ins():
    args = validate_arguments(
        "user_control",
        {"flag": 0, "rand": "A1B2C3D4", "div": DIV, "esam_no": ESAM, "data": "1A00140730104001"},
    )
    (command,) = apdu.command_apdus("user_control", args)
    assert command.hex().upper() == (
        "80340000" + "1D" + "00" + "A1B2C3D4" + DIV + ESAM + "1A00140730104001" + "00"
    )
    assert apdu.INS_FOR_FUNCTION["identity_authentication"] == 0x33
    assert apdu.INS_FOR_FUNCTION["switch_charge_mode"] == 0x44
    assert set(apdu.CARD_FUNCTIONS) == set(FUNCTIONS) - {"open_device", "close_device"}


def test_case2_and_case3_apdus():
    assert apdu.command_apdus("infrared_rand", {}) == [bytes.fromhex("803D000000")]
    args = validate_arguments(
        "mac_check",
        {
            "flag": 0,
            "rand": "447034E1",
            "div": DIV,
            "apdu": "04D686000E",
            "data": "0400",
            "mac": "01020304",
        },
    )
    (command,) = apdu.command_apdus("mac_check", args)
    assert command[-1] != 0x00 and command[4] == len(command) - 5  # no Le


def test_long_data_is_chained_in_parts_of_255():
    args = validate_arguments(
        "parameter_update",
        {"flag": 0, "rand": "B4C8C420", "div": DIV, "apdu": "04D68104FF", "data": "11" * 251},
    )
    first, last = apdu.command_apdus("parameter_update", args)
    assert first[0] == 0x90 and first[4] == 255 and len(first) == 5 + 255
    assert last[0] == 0x80 and last[4] == 269 - 255 and last[-1] == 0x00
    assert apdu.decode_arguments("parameter_update", first[5:] + last[5:-1]) == {
        "flag": 0,
        "rand": "B4C8C420",
        "div": DIV,
        "apdu": "04D68104FF",
        "data": "11" * 251,
    }


def test_variable_argument_in_the_middle_decodes():
    data = bytes.fromhex("1101000102B6382720") + bytes.fromhex(DIV + ESAM)
    assert apdu.decode_arguments("key_update_v2", data) == {
        "key_sum": 17,
        "key_state": "01",
        "key_id": "000102",
        "rand": "B6382720",
        "div": DIV,
        "esam_no": ESAM,
    }
    with pytest.raises(ReaderFramingError):
        apdu.decode_arguments("key_update_v2", data[:20])
    with pytest.raises(ReaderFramingError):
        apdu.decode_arguments("infrared_auth", bytes(42))


def test_status_words_map_to_library_codes_both_ways():
    for code, sw in apdu.SW_FOR_CODE.items():
        assert apdu.error_for_sw(sw, "user_control").code == code
        assert apdu.sw_for_error(EsamError(code, "x", "y")) == sw
    assert apdu.error_for_sw(0x6F13, "user_control").argument == "div"
    unknown = apdu.error_for_sw(0x6A86, "user_control")
    assert unknown.code == 900 and "6A86" in unknown.message
    assert apdu.sw_for_error(EsamError(1601, "x", "y")) == 0x6F00


def test_outputs_split_by_the_library_sizes():
    args = validate_arguments("identity_authentication", {"flag": 1, "div": DIV})
    assert apdu.decode_outputs("identity_authentication", args, bytes(range(16))) == {
        "rand": "0001020304050607",
        "endata": "08090A0B0C0D0E0F",
    }
    with pytest.raises(EsamError) as error:
        apdu.decode_outputs("identity_authentication", args, bytes(15))
    assert error.value.code == 900
    assert apdu.decode_outputs("mac_check", {}, b"") == {"valid": True}


# --- fuzzing the argument validators --------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.text(max_size=20)
    | st.text(alphabet="0123456789ABCDEFabcdef", max_size=40),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=5,
)


@settings(max_examples=400, deadline=None)
@given(
    function=st.sampled_from(sorted(FUNCTIONS)) | st.text(max_size=12),
    arguments=st.dictionaries(
        st.sampled_from(
            [
                "flag",
                "rand",
                "div",
                "apdu",
                "data",
                "esam_no",
                "key_id",
                "key_sum",
                "key_state",
                "mac",
                "rand1",
                "file_id",
                "x",
            ]
        ),
        json_values,
        max_size=7,
    ),
)
def test_fuzz_validators_raise_only_library_errors(function, arguments):
    try:
        normalised = validate_arguments(function, arguments)
    except EsamError as error:
        assert error.code == -1 or 1500 <= error.code <= 1508
        return
    if function in apdu.LAYOUT:  # whatever validates also goes through our APDUs unchanged
        apdus = apdu.command_apdus(function, normalised)
        data = b"".join(a[5 : 5 + a[4]] if len(a) > 5 else b"" for a in apdus)
        assert validate_arguments(function, apdu.decode_arguments(function, data)) == normalised


@settings(max_examples=200, deadline=None)
@given(function=st.sampled_from(sorted(apdu.LAYOUT)), data=st.data())
def test_fuzz_apdu_argument_layout_round_trip(function, data):
    values = {}
    for field in apdu.LAYOUT[function]:
        if field.kind == "int":
            values[field.name] = data.draw(st.integers(0, 255))
        else:
            size = field.size or data.draw(st.integers(1, 300))
            values[field.name] = data.draw(st.binary(min_size=size, max_size=size))
    encoded = apdu.encode_arguments(function, values)
    decoded = apdu.decode_arguments(function, encoded)
    assert decoded == {
        name: value if isinstance(value, int) else value.hex().upper()
        for name, value in values.items()
    }
