"""hy/gw envelope: the seed's messages, each JSON quirk, stat codes, exact encoding, fuzzing.

Expected texts are the seed document's (003_be5b75d5fb940761.txt) and reference §1-§3.
"""

from __future__ import annotations

import contextlib
import json

import pytest
from gatewayd.protocols import hygw
from gatewayd.protocols.errors import ProtocolError
from gatewayd.protocols.hygw import (
    HygwError,
    RawJson,
    build_last_will,
    build_meter_report,
    build_periods_report,
    build_periods_request,
    build_read_now,
    build_reboot,
    build_set_periods,
    build_stat_reply,
    build_status_report,
    build_status_request,
    build_transparent,
    build_transparent_reply,
    decode_for_cli,
    decode_message,
    encode_message,
    parse_meter_id,
    stat_result,
    topic_gw_id,
)
from hypothesis import given, settings
from hypothesis import strategies as st

GW_ID = "02345678903"


def envelope(msg_id: int, data: str) -> str:
    """The seed's envelope around ``data`` (JSON text) for gateway 02345678903."""
    return f'{{"gw":{{"msg_id":{msg_id},"msg_gw_pr":0,"gw_id":"{GW_ID}"}},"data":{data}}}'


def report(meter_id: str, frame: str, tail: str = "") -> str:
    """A msg 20 data object with one frame."""
    return f'{{"meter_id":"{meter_id}","meter_data":["{frame}"{tail}]{tail}}}'


FRAME_55 = (
    "685527100583001111813B901F0012235304050000000032785634002A8728009328000000000005000000002C"
    "00000000FA00FA000000E803E8030000EA008185CB0123F7407316"
)
FRAME_53 = (
    "685323227310001111812D901F011073221201DC00DC0055640A28006F3300006401230125620102353005502000"
    "B42300081926052420409416"
)
STATUS_REPLY = envelope(
    1,
    '{"stat":2,"CSQ":99,99,"RSSI":-98,"SINR":13,"CCID":"89860025102250386087","GW_Ver":"V1.0",'
    '"has_rst":0,"MBUS_mV":29392,"MBUS_mA":3,"GW_model":136,"main_meter_total":5,'
    '"copy_meter_total":96}',
)
PERIODS_REPLY = envelope(
    2,
    '{"stat":2,"not_intimer_interval":1440,"heating_start":"20XX-09-01",'
    '"heating_end":"20XX-05-01","main_interval":10,"copy_interval":60,"copy_statistics":1}',
)


# --- decoding the seed ------------------------------------------------------------------------


def test_status_reply_with_unquoted_csq() -> None:
    message = decode_message(STATUS_REPLY.encode(), topic="hy/gw/set/02345678903")
    assert (message.msg_id, message.gw_id, message.kind) == (1, GW_ID, "status")
    assert message.direction == "set"
    assert message.fields["CSQ"] == "99,99"
    assert message.fields["RSSI"] == -98 and message.fields["MBUS_mV"] == 29392
    assert message.fields["copy_meter_total"] == 96
    assert message.values["CSQ"] == {"rssi": None, "ber": None}
    assert message.stat == hygw.StatResult(2, True, "ok")
    assert message.quirks == ("csq_unquoted",)
    assert list(message.fields) == [
        "stat",
        "CSQ",
        "RSSI",
        "SINR",
        "CCID",
        "GW_Ver",
        "has_rst",
        "MBUS_mV",
        "MBUS_mA",
        "GW_model",
        "main_meter_total",
        "copy_meter_total",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"CSQ":"99,99"', {"rssi": None, "ber": None}),
        ('"CSQ":"23,0"', {"rssi": 23, "ber": 0}),
        ('"CSQ":23,0', {"rssi": 23, "ber": 0}),
        ('"CSQ":23', {"rssi": 23, "ber": None}),
        ('"CSQ":"garbage"', None),
    ],
)
def test_csq_forms(text: str, expected: dict | None) -> None:
    message = decode_message(envelope(1, "{" + text + ',"RSSI":-98}'))
    assert message.values["CSQ"] == expected
    assert message.fields["RSSI"] == -98


def test_periods_reply_year_placeholder_and_leading_space() -> None:
    message = decode_message("{ " + PERIODS_REPLY[1:])
    assert message.kind == "periods"
    assert message.fields["heating_start"] == "20XX-09-01"
    assert message.values["heating_start"] == "09-01"
    assert message.values["heating_end"] == "05-01"
    assert message.values["not_intimer_interval"] == 1440
    assert message.quirks == ("year_placeholder",)


def test_full_year_dates_read_as_month_day() -> None:
    message = decode_message(envelope(2, '{"heating_start":"2024-10-15"}'))
    assert message.values["heating_start"] == "10-15" and message.quirks == ()


@pytest.mark.parametrize(
    ("meter_id", "frame", "number", "protocol", "meter_type"),
    [
        ("27100583203400", FRAME_55, "27100583", "2034", "55"),
        ("23227310200800", FRAME_53, "23227310", "2008", "53"),
    ],
)
def test_meter_report(
    meter_id: str, frame: str, number: str, protocol: str, meter_type: str
) -> None:
    text = envelope(20, report(meter_id, frame))
    message = decode_message(text, topic=f"hy/gw/set/{GW_ID}")
    assert message.kind == "meter_report"
    assert message.frames == [frame]
    assert message.values["meter_id"] == {
        "meter_id": meter_id,
        "number": number,
        "protocol": protocol,
        "port": 0,
        "meter_type": meter_type,
    }


def test_meter_data_in_braces_and_unclosed_envelope() -> None:
    # seed §8.2.3 verbatim: braces around the frame and the envelope's last "}" missing
    text = (
        '{"gw":{"msg_id":40,"msg_gw_pr":0,"gw_id":"02345678903"},"data":{"transparent_port":0,'
        '"meter_data":{"6853232273100011118404A01900321816"}}'
    )
    message = decode_message(text)
    assert message.fields == {
        "transparent_port": 0,
        "meter_data": ["6853232273100011118404A01900321816"],
    }
    assert message.quirks == ("meter_data_braces", "unclosed_braces")


def test_meter_data_braces_alone() -> None:
    braced = '{"transparent_port":0,"meter_data":{"6853232273100011118404A01900644A16"}}'
    text = envelope(40, braced)
    message = decode_message(text)
    assert message.frames == ["6853232273100011118404A01900644A16"]
    assert message.quirks == ("meter_data_braces",)


def test_meter_data_bare_string_and_lower_case() -> None:
    message = decode_message(envelope(40, '{"meter_data":"6855271005830011119603902f01f716"}'))
    assert message.frames == ["6855271005830011119603902F01F716"]


def test_meter_data_entries_that_are_no_hex_stay_for_the_frame_codec_to_reject() -> None:
    text = envelope(20, '{"meter_id":"27100583203400","meter_data":["68ZZ",null,7,"6853"]}')
    assert decode_message(text).frames == ["68ZZ", "null", "7", "6853"]


def test_meter_data_entries_with_spaces_are_compacted_and_upper_cased() -> None:
    text = envelope(40, '{"meter_data":["68 55 27 10 ab","6853ab01\\n"]}')
    assert decode_message(text).frames == ["68552710AB", "6853AB01"]


def test_meter_data_nested_oddities_give_their_hex_strings_only() -> None:
    text = envelope(40, '{"meter_data":[{"frame":"68 55 27 10"},["6853ab01"]]}')
    assert decode_message(text).frames == ["68552710", "6853AB01"]


def test_trailing_commas() -> None:
    text = envelope(20, report("27100583203400", FRAME_55, ","))
    message = decode_message(text)
    assert message.frames == [FRAME_55]
    assert message.quirks == ("trailing_comma",)


def test_repairs_leave_strings_alone() -> None:
    text = envelope(1, '{"GW_Ver":"a,]b,}","CCID":"\\"CSQ\\":1,2"}')
    message = decode_message(text)
    assert message.fields == {"GW_Ver": "a,]b,}", "CCID": '"CSQ":1,2'}
    assert message.quirks == ()


@pytest.mark.parametrize(
    "payload",
    [
        (envelope(18, '{"stat":2}')).encode() + b"\x00",
        (envelope(18, '{"stat":2}')).encode() + b"\x00\x00\r\n",
        b"\x00" + (envelope(18, '{"stat":2}')).encode(),
    ],
)
def test_nul_bytes(payload: bytes) -> None:
    message = decode_message(payload)
    assert message.fields == {"stat": 2} and message.quirks == ("nul_bytes",)


def test_last_will_on_trailing_slash_topic() -> None:
    message = decode_message(build_last_will(GW_ID), topic=f"hy/gw/set/{GW_ID}/")
    assert message.kind == "last_will" and message.direction == "set"
    assert message.stat == hygw.StatResult(0, False, "offline")
    assert message.quirks == ("topic_trailing_slash",)


def test_topic_gw_id_mismatch_is_noted() -> None:
    message = decode_message(build_stat_reply(18, GW_ID), topic="hy/gw/set/99999999999")
    assert message.gw_id == GW_ID and "topic_gw_id_mismatch" in message.quirks


def test_tolerated_envelope_oddities() -> None:
    message = decode_message('{"gw":{"msg_id":"18","gw_id":"0234567890"}}')
    assert message.msg_id == 18 and message.fields == {}
    assert message.quirks == ("msg_id_string", "gw_id_length", "data_missing")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", "encoding"),
        ("", "json"),
        ("not json", "json"),
        ("[" * 100_000, "json"),
        ('{"gw":{"msg_id":' + "9" * 5000 + "}}", "json"),
        ("[]", "envelope"),
        ('{"data":{}}', "envelope"),
        ('{"gw":[],"data":{}}', "envelope"),
        ('{"gw":{"gw_id":"02345678903"},"data":{}}', "msg_id"),
        ('{"gw":{"msg_id":true,"gw_id":"02345678903"},"data":{}}', "msg_id"),
        ('{"gw":{"msg_id":1.5,"gw_id":"02345678903"},"data":{}}', "msg_id"),
        ('{"gw":{"msg_id":70000,"gw_id":"02345678903"},"data":{}}', "msg_id"),
        ('{"gw":{"msg_id":1},"data":{}}', "gw_id"),
        ('{"gw":{"msg_id":1,"gw_id":2345678903},"data":{}}', "gw_id"),
        ('{"gw":{"msg_id":1,"gw_id":"0234/678903"},"data":{}}', "gw_id"),
        ('{"gw":{"msg_id":1,"gw_id":"02345678903"},"data":[]}', "data"),
        (12, "argument"),
    ],
)
def test_errors_have_reasons(payload: object, reason: str) -> None:
    with pytest.raises(HygwError) as caught:
        decode_message(payload)  # type: ignore[arg-type]
    assert caught.value.reason == reason
    assert isinstance(caught.value, ProtocolError)


# --- topics, meter ids, stat codes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("hy/gw/set/02345678903", ("set", GW_ID)),
        ("hy/gw/set/02345678903/", ("set", GW_ID)),
        ("hy/gw/get/02345678903", ("get", GW_ID)),
    ],
)
def test_topic_gw_id(topic: str, expected: tuple[str, str]) -> None:
    assert topic_gw_id(topic) == expected


@pytest.mark.parametrize(
    "topic", ["hy/gw/put/1", "hy/gw/set", "other/set/1", "hy/gw/set/1/extra", "hy/gw/set/+"]
)
def test_topic_gw_id_rejects(topic: str) -> None:
    with pytest.raises(HygwError) as caught:
        topic_gw_id(topic)
    assert caught.value.reason == "topic"


def test_topic_helpers() -> None:
    assert topic_gw_id("site/a/set/X1", prefix="site/a") == ("set", "X1")
    assert hygw.topic("get", GW_ID) == "hy/gw/get/02345678903"
    assert hygw.will_topic(GW_ID) == "hy/gw/set/02345678903/"
    assert hygw.subscribe_topic() == "hy/gw/set/#"


def test_parse_meter_id() -> None:
    meter = parse_meter_id("27100583203400")
    assert (meter.number, meter.protocol, meter.port, meter.meter_type) == (
        "27100583",
        "2034",
        0,
        0x55,
    )
    assert str(meter) == "27100583203400"
    with pytest.raises(HygwError):
        parse_meter_id("2710058320340")


def test_malformed_meter_id_is_noted() -> None:
    message = decode_message(envelope(20, '{"meter_id":"271005","meter_data":[]}'))
    assert message.values["meter_id"] is None and "meter_id_format" in message.quirks


@pytest.mark.parametrize(
    ("msg_id", "stat", "ok", "name"),
    [
        (1, 2, True, "ok"),
        (18, 1, False, "failed"),
        (3, 32, True, "ok"),
        (3, 31, True, "empty"),
        (4, 41, True, "empty"),
        (13, 131, False, "failed"),
        (14, 142, True, "ok"),
        (40, 401, False, "bad_request"),
        (60, 603, True, "done_rebooting"),
        (60, 601, False, "resend"),
        (70, 0, False, "offline"),
        (18, 7, False, "unknown"),
    ],
)
def test_stat_table(msg_id: int, stat: int, ok: bool, name: str) -> None:
    assert stat_result(msg_id, stat) == hygw.StatResult(stat, ok, name)


# --- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (build_status_request(GW_ID), envelope(1, "{}")),
        (build_periods_request(GW_ID), envelope(2, "{}")),
        (build_reboot(GW_ID), envelope(30, "{}")),
        (
            build_read_now(GW_ID, main=True),
            envelope(18, '{"main_immediately":1,"copy_immediately":0,"up_immediately":0}'),
        ),
        (
            build_read_now(GW_ID, copy=True),
            envelope(18, '{"main_immediately":0,"copy_immediately":1,"up_immediately":0}'),
        ),
        (
            build_transparent(GW_ID, "FEFEFEFE6853232273100011110404A01900006616"),
            envelope(
                40,
                '{"transparent_port":0,"transparent":"FEFEFEFE6853232273100011110404A01900006616",'
                '"transparent_count":5}',
            ),
        ),
        (
            build_transparent(GW_ID, bytes.fromhex("FEFEFE6853232273100011110404A01900329816")),
            envelope(
                40,
                '{"transparent_port":0,"transparent":"FEFEFE6853232273100011110404A01900329816",'
                '"transparent_count":5}',
            ),
        ),
        # what the gateway sends (simulator side)
        (build_status_report(GW_ID, main_meter_total=5, copy_meter_total=96), STATUS_REPLY),
        (build_periods_report(GW_ID), PERIODS_REPLY),
        (build_stat_reply(18, GW_ID), envelope(18, '{"stat":2}')),
        (build_stat_reply(40, GW_ID), envelope(40, '{"stat":2}')),
        (build_stat_reply(12, GW_ID, 1), envelope(12, '{"stat":1}')),
        (
            build_meter_report(GW_ID, "27100583203400", bytes.fromhex(FRAME_55)),
            envelope(20, report("27100583203400", FRAME_55)),
        ),
        (
            build_meter_report(GW_ID, parse_meter_id("23227310200800"), [FRAME_53.lower()]),
            envelope(20, report("23227310200800", FRAME_53)),
        ),
        (
            build_transparent_reply(GW_ID, "6855271005830011119603902F01F716"),
            envelope(
                40, '{"transparent_port":0,"meter_data":["6855271005830011119603902F01F716"]}'
            ),  # noqa: E501
        ),
        (build_last_will(GW_ID), envelope(70, '{"stat":0}')),
    ],
)
def test_encoding_is_byte_exact(built: bytes, expected: str) -> None:
    assert built == expected.encode("ascii")


def test_status_report_quoted_csq() -> None:
    built = build_status_report(GW_ID, csq="20,3", csq_quoted=True)
    assert b'"CSQ":"20,3",' in built
    assert json.loads(built)["data"]["CSQ"] == "20,3"


def test_key_orders_are_enforced() -> None:
    built = encode_message(
        40, GW_ID, transparent_count=5, transparent="FEFE6816", transparent_port=0, extra=1
    )
    data = built.decode().split('"data":')[1]
    assert data == (
        '{"transparent_port":0,"transparent":"FEFE6816","transparent_count":5,"extra":1}}'
    )
    periods = build_set_periods(
        GW_ID, heating_end="05-01", heating_start="09-01", copy_interval=60, main_interval=10
    )
    assert periods.decode().endswith(
        '"data":{"main_interval":10,"copy_interval":60,'
        '"heating_start":"20XX-09-01","heating_end":"20XX-05-01"}}'
    )
    server = encode_message(15, GW_ID, port=1883, url="example.org", password="p", username="u")
    assert server.decode().endswith(
        '"data":{"username":"u","password":"p","url":"example.org","port":1883}}'
    )


def test_msg_id_before_gw_id_and_compact() -> None:
    built = encode_message(17, GW_ID, time="2024-05-28 11:01:51").decode()
    assert built.index('"msg_id"') < built.index('"gw_id"') < built.index('"data"')
    assert ": " not in built.replace("11:01:51", "") and ", " not in built


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: encode_message(1, "0234567890"), "gw_id"),
        (lambda: encode_message(1, "02345/78903"), "gw_id"),
        (lambda: encode_message(-1, GW_ID), "msg_id"),
        (lambda: encode_message(True, GW_ID), "msg_id"),
        (lambda: encode_message(1, GW_ID, url='a"b'), "value"),
        (lambda: encode_message(1, GW_ID, url="a\\b"), "value"),
        (lambda: encode_message(1, GW_ID, url="湖"), "value"),
        (lambda: encode_message(1, GW_ID, ratio=1.5), "value"),
        (lambda: encode_message(1, GW_ID, flag=None), "value"),
        (lambda: build_transparent(GW_ID, "FEF"), "argument"),
        (lambda: build_transparent(GW_ID, "FEFE", port=6), "argument"),
        (lambda: build_transparent(GW_ID, "FEFE", count=0), "argument"),
        (lambda: build_set_periods(GW_ID, main_interval=10, copy_interval=60,
                                   heating_start="Sept", heating_end="05-01"), "argument"),
        (lambda: build_status_report(GW_ID, csq="99"), "argument"),
        (lambda: build_meter_report(GW_ID, "2710", FRAME_55), "value"),
    ],
)  # fmt: skip
def test_encoding_rejects(call, reason: str) -> None:  # noqa: ANN001
    with pytest.raises(HygwError) as caught:
        call()
    assert caught.value.reason == reason


def test_broadcast_gw_id_is_accepted() -> None:
    assert b'"gw_id":"FFFFFFFFFFF"' in build_reboot(hygw.BROADCAST_GW_ID)


def test_raw_json_only_for_quirks() -> None:
    built = encode_message(1, GW_ID, CSQ=RawJson("99,99"))
    assert built.endswith(b'"data":{"CSQ":99,99}}')


# --- CLI ------------------------------------------------------------------------------------------


def test_decode_for_cli_with_vendor_log_prefix() -> None:
    result = decode_for_cli("len:274,Data: hy/gw/set/02345678903" + STATUS_REPLY)
    assert result["topic"] == "hy/gw/set/02345678903"
    assert result["direction"] == "set"
    assert result["msg_id"] == 1 and result["kind"] == "status"
    assert result["values"]["stat"] == {"code": 2, "ok": True, "name": "ok"}
    assert result["quirks"] == ["csq_unquoted"]
    json.dumps(result)  # JSON-able


def test_decode_for_cli_plain_json() -> None:
    result = decode_for_cli(envelope(18, '{"stat":2}'))
    assert result["topic"] is None and result["fields"] == {"stat": 2}


# --- properties and fuzzing ----------------------------------------------------------------------

safe_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters='"\\'),
    max_size=20,
)
values = st.one_of(st.integers(-(2**31), 2**31), safe_text, st.lists(safe_text, max_size=3))


@settings(max_examples=200, deadline=None)
@given(
    msg_id=st.integers(0, 0xFFFF),
    gw_id=st.text(alphabet="0123456789ABCDEF", min_size=11, max_size=11),
    fields=st.dictionaries(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), values, max_size=6),
)
def test_round_trip(msg_id: int, gw_id: str, fields: dict) -> None:
    message = decode_message(encode_message(msg_id, gw_id, **fields))
    assert (message.msg_id, message.gw_id) == (msg_id, gw_id)
    assert message.fields == fields
    assert json.loads(encode_message(msg_id, gw_id, **fields))["data"] == fields


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_random_text(text: str) -> None:
    with contextlib.suppress(HygwError):
        decode_message(text)
    with contextlib.suppress(HygwError):
        decode_for_cli(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(HygwError):
        decode_message(data)


SEED_MESSAGES = [
    STATUS_REPLY,
    PERIODS_REPLY,
    envelope(20, report("27100583203400", FRAME_55)),
    envelope(40, '{"transparent_port":0,"meter_data":{"6853232273100011118404A01900321816"}}'),
]


@settings(max_examples=600, deadline=None)
@given(
    base=st.sampled_from(SEED_MESSAGES),
    position=st.integers(0, 400),
    insert=st.text(max_size=3),
    delete=st.integers(0, 3),
)
def test_fuzz_mutated_messages(base: str, position: int, insert: str, delete: int) -> None:
    index = position % (len(base) + 1)
    text = base[:index] + insert + base[index + delete :]
    with contextlib.suppress(HygwError):
        message = decode_message(text, topic="hy/gw/set/02345678903/")
        message.to_dict()
        json.dumps(message.to_dict())


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_fuzz_topics(topic: str) -> None:
    with contextlib.suppress(HygwError):
        topic_gw_id(topic)
