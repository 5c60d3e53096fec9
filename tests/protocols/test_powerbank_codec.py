"""Tests of gatewayd.protocols.powerbank: golden vectors, tolerance, errors, CRC settings, fuzzing.

The CRC digits in the vectors are frozen literals. They were computed once with crccheck's
Crc16Modbus over the canonical span (``IMEI,...,`` through the comma before the CRC), and
``test_golden_crcs_are_modbus_over_the_default_span`` recomputes them that way, so a change in
the codec's CRC handling is caught.
"""

import json

import pytest
from crccheck.crc import Crc16Modbus, Crc16Xmodem
from gatewayd.protocols import powerbank as pb
from gatewayd.protocols.crc import ALGORITHMS
from gatewayd.protocols.errors import ProtocolError
from gatewayd.protocols.powerbank import (
    Codec,
    CrcSettings,
    Heartbeat,
    LendRequest,
    LendResult,
    LendResultAck,
    PowerbankError,
    ReturnQuery,
    ReturnQueryAnswer,
    ReturnResult,
    ReturnResultAck,
    SlotState,
    SlotStatus,
    StatusQuery,
    StatusReport,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

IMEI = "860000000000001"
BANK1 = "0000000012"
BANK2 = "0000000013"

AQ_SLOTS = (
    SlotStatus(1, SlotState.FULL, BANK1),
    SlotStatus(2, SlotState.NOT_FULL, BANK2),
    SlotStatus(3, SlotState.FAULT),
)

# (seed item, the seed's command format with IMEI/STROEID/DEVID/CRC16 filled in, spaces and
#  separators kept as the document writes them, the packet, the canonical frame we build)
SEED_FORMS = [
    (
        "1 CH heartbeat",
        '{"860000000000001, CH, 0C49"}\r\n',
        Heartbeat(IMEI),
        b'{"860000000000001,CH,0C49"}\r\n',
    ),
    (
        "2 CQ query status",
        '{"860000000000001, CQ, 9C42"}\r\n',
        StatusQuery(IMEI),
        b'{"860000000000001,CQ,9C42"}\r\n',
    ),
    (
        "3 AQ status answer",
        '{"860000000000001, AQ, 1.FU.0000000012; 2.NF.0000000013; 3.ER;, 42F6"}\r\n',
        StatusReport(IMEI, AQ_SLOTS),
        b'{"860000000000001,AQ,1.FU.0000000012;2.NF.0000000013;3.ER;,42F6"}\r\n',
    ),
    (
        "4 CC lend",
        '{"860000000000001, CC, BW, 1, 0000000012, 7746"}\r\n',
        LendRequest(IMEI, 1, BANK1),
        b'{"860000000000001,CC,BW,1,0000000012,7746"}\r\n',
    ),
    (
        "5 MQ return query",
        '{"860000000000001, MQ, 2, 0000000013, 95EF"}\r\n',
        ReturnQuery(IMEI, 2, BANK2),
        b'{"860000000000001,MQ,2,0000000013,95EF"}\r\n',
    ),
    (
        "6 RQ T belongs",
        '{"860000000000001, RQ, T.2, 0000000013, 6730"}\r\n',
        ReturnQueryAnswer(IMEI, 2, BANK2, accepted=True),
        b'{"860000000000001,RQ,T.2,0000000013,6730"}\r\n',
    ),
    (
        "7 RQ F does not belong",
        '{"860000000000001, RQ, F.2, 0000000013, 6AA2"}\r\n',
        ReturnQueryAnswer(IMEI, 2, BANK2, accepted=False),
        b'{"860000000000001,RQ,F.2,0000000013,6AA2"}\r\n',
    ),
    (
        "8 MC BO lend succeeded",
        '{"860000000000001, MC, BO.1, 0000000012, 5637"}\r\n',
        LendResult(IMEI, 1, BANK1, ok=True),
        b'{"860000000000001,MC,BO.1,0000000012,5637"}\r\n',
    ),
    (
        "9 AM BO ack",
        '{"860000000000001, AM, BO.1, 0000000012, EC46"}\r\n',
        LendResultAck(IMEI, 1, BANK1, ok=True),
        b'{"860000000000001,AM,BO.1,0000000012,EC46"}\r\n',
    ),
    (
        "10 MC RO return succeeded",
        '{"860000000000001, MC, RO.2, 0000000013, C93E"}\r\n',
        ReturnResult(IMEI, 2, BANK2, ok=True),
        b'{"860000000000001,MC,RO.2,0000000013,C93E"}\r\n',
    ),
    (
        "11 AM RO ack",
        '{"860000000000001, AM, RO.2, 0000000013, 734F"}\r\n',
        ReturnResultAck(IMEI, 2, BANK2, ok=True),
        b'{"860000000000001,AM,RO.2,0000000013,734F"}\r\n',
    ),
    (
        "12 MR BF lend failed",
        '{"860000000000001, MR, BF.1, 0000000012, 69AB"}\r\n',
        LendResult(IMEI, 1, BANK1, ok=False),
        b'{"860000000000001,MR,BF.1,0000000012,69AB"}\r\n',
    ),
    # items 13-15 write "STROEID .DEVID": the CRC covers the "." the device sent
    (
        "13 AR BF ack",
        '{"860000000000001, AR, BF.1 .0000000012, FF41"}\r\n',
        LendResultAck(IMEI, 1, BANK1, ok=False),
        b'{"860000000000001,AR,BF.1,0000000012,38B8"}\r\n',
    ),
    (
        "14 MR RF return failed",
        '{"860000000000001, MR, RF.2 .0000000013, 315B"}\r\n',
        ReturnResult(IMEI, 2, BANK2, ok=False),
        b'{"860000000000001,MR,RF.2,0000000013,F6A2"}\r\n',
    ),
    (
        "15 AR RF ack",
        '{"860000000000001, AR, RF.2 .0000000013, 6048"}\r\n',
        ReturnResultAck(IMEI, 2, BANK2, ok=False),
        b'{"860000000000001,AR,RF.2,0000000013,A7B1"}\r\n',
    ),
]
SEED_IDS = [form[0] for form in SEED_FORMS]


@pytest.fixture
def codec():
    return Codec()


def modbus(text: str) -> str:
    """The independent path: crccheck's MODBUS over ``text``, 4 uppercase digits, high first."""
    return f"{Crc16Modbus.calc(text.encode()):04X}"


def with_crc(body: str, crc_of=modbus) -> str:
    """A line for canonical ``body`` (``IMEI,...,``) with its CRC appended."""
    return '{"' + body + crc_of(body) + '"}\r\n'


# ---------------------------------------------------------------------------- golden vectors


@pytest.mark.parametrize(("name", "seed_line", "packet", "canonical"), SEED_FORMS, ids=SEED_IDS)
def test_seed_form_parses_to_its_packet(codec, name, seed_line, packet, canonical):
    assert codec.parse(seed_line) == packet
    assert codec.parse(seed_line.encode()) == packet


@pytest.mark.parametrize(("name", "seed_line", "packet", "canonical"), SEED_FORMS, ids=SEED_IDS)
def test_seed_packet_builds_its_canonical_frame(codec, name, seed_line, packet, canonical):
    assert codec.build(packet) == canonical
    assert codec.parse(canonical) == packet


@pytest.mark.parametrize(("name", "seed_line", "packet", "canonical"), SEED_FORMS, ids=SEED_IDS)
def test_golden_crcs_are_modbus_over_the_default_span(name, seed_line, packet, canonical):
    for line in (seed_line, canonical.decode()):
        squeezed = line.replace(" ", "").strip()
        body, _, crc = squeezed[2:-2].rpartition(",")
        assert crc == modbus(body + ",")


@pytest.mark.parametrize(("name", "seed_line", "packet", "canonical"), SEED_FORMS, ids=SEED_IDS)
def test_interpreted_and_compiled_declarations_agree(name, seed_line, packet, canonical):
    codec = Codec()
    params = {"crc_text": codec._crc_text_of_body}
    assert pb.FRAME.build({"body": packet, "crc": None}, **params) == canonical
    parsed = pb.FRAME.parse(canonical)
    assert (parsed.body, parsed.crc) == (packet, canonical[-8:-4].decode())


def test_every_command_word_of_the_seed_is_covered():
    commands = {packet.command for _name, _line, packet, _canonical in SEED_FORMS}
    assert commands == {"CH", "CQ", "AQ", "CC", "MQ", "RQ", "MC", "AM", "MR", "AR"}
    codes = {getattr(p, "code", None) for _n, _l, p, _c in SEED_FORMS} - {None}
    assert codes == {"BW", "T", "F", "BO", "RO", "BF", "RF"}


def test_direction_of_each_packet_follows_the_seed():
    from_device = {type(p).__name__ for _n, _l, p, _c in SEED_FORMS if p.FROM_DEVICE}
    assert from_device == {"Heartbeat", "StatusReport", "ReturnQuery", "LendResult", "ReturnResult"}


# ---------------------------------------------------------------------------- tolerant forms

MC_BODY = "860000000000001,MC,BO.1,0000000012,"
MC_PACKET = LendResult(IMEI, 1, BANK1, ok=True)


@pytest.mark.parametrize(
    "line",
    [
        '{"860000000000001,MC,BO.1,0000000012,5637"}\r\n',
        '{"860000000000001,MC,BO.1,0000000012,5637"}\n',
        '{"860000000000001,MC,BO.1,0000000012,5637"}\r',
        '{"860000000000001,MC,BO.1,0000000012,5637"}',
        '  {"860000000000001,MC,BO.1,0000000012,5637"}  \r\n',
        '{" 860000000000001 ,\tMC , BO . 1 , 0000000012 , 5637 "}',
        '{ "860000000000001,MC,BO.1,0000000012,5637" }',
        'AT+CSQ\r+CSQ: 23,99 {"860000000000001,MC,BO.1,0000000012,5637"}',
    ],
    ids=["crlf", "lf", "cr", "no-terminator", "outer-space", "spaces-tabs", "brace-space", "noise"],
)
def test_whitespace_terminators_and_modem_noise_are_tolerated(codec, line):
    assert codec.parse(line) == MC_PACKET
    assert codec.parse(line.encode()) == MC_PACKET


@pytest.mark.parametrize(
    "line",
    [
        "\uff5b\u201c860000000000001\uff0cMC\uff0cBO\uff0e1\uff0c0000000012\uff0c5637\u201d\uff5d",
        '{"860000000000001，MC，BO.1，0000000012，5637"}',
        "{“860000000000001, MC, BO.1, 0000000012, 5637”}",
        "{＂860000000000001\u3001MC\u3001BO\u30021\u30010000000012\u30015637＂}",
        '{"860000000000001\u3000,MC,BO.1,0000000012,5637"}',
    ],
    ids=["all-fullwidth", "fullwidth-commas", "curly-quotes", "ideographic", "ideographic-space"],
)
def test_fullwidth_punctuation_is_tolerated(codec, line):
    assert codec.parse(line) == MC_PACKET
    assert codec.parse(line.encode("utf-8")) == MC_PACKET


def test_gbk_encoded_fullwidth_bytes_are_tolerated(codec):
    line = '{"860000000000001，MC，BO.1，0000000012，5637"}\r\n'.encode("gbk")
    assert codec.parse(line) == MC_PACKET


@pytest.mark.parametrize(
    "body",
    [
        "860000000000001,MC,BO.1,0000000012,",
        "860000000000001,MC,BO.1.0000000012,",
        "860000000000001,MC,BO,1,0000000012,",
        "860000000000001,MC,BO,1.0000000012,",
    ],
)
def test_comma_or_dot_between_prefix_slot_and_bank(codec, body):
    assert codec.parse(with_crc(body)) == MC_PACKET


def test_space_dot_separator_of_items_13_to_15(codec):
    # the CRC covers what is left once whitespace around fields is removed: "BF.1.0000000012,"
    line = '{"860000000000001,AR,BF.1 .0000000012,' + modbus("860000000000001,AR,BF.1.0000000012,")
    assert codec.parse(line + '"}') == LendResultAck(IMEI, 1, BANK1, ok=False)


def test_lend_request_accepts_dots_too(codec):
    packet = codec.parse(with_crc("860000000000001,CC,BW.3.0000000012,"))
    assert packet == LendRequest(IMEI, 3, BANK1)


@pytest.mark.parametrize(
    ("aq_data", "expected"),
    [
        ("1.FU.0000000012;2.NF.0000000013;3.ER;", AQ_SLOTS),
        ("1.FU.0000000012;2.NF.0000000013;3.ER", AQ_SLOTS),  # no trailing ;
        ("3.ER;1.FU.0000000012;2.NF.0000000013;", AQ_SLOTS),  # any order
        ("1.FU.0000000012;2.NU.0000000013;3.ER;", AQ_SLOTS),  # the document's "NU" typo
        (
            "1.EM.0000000012;2.ER.0000000013;3.EM;",
            (
                SlotStatus(1, SlotState.NO_CHARGE, BANK1),
                SlotStatus(2, SlotState.FAULT, BANK2),
                SlotStatus(3, SlotState.NO_CHARGE),
            ),
        ),
        (
            "2.NF.0000000013;",  # slots 1 and 3 not listed: empty
            (
                SlotStatus(1, SlotState.EMPTY),
                SlotStatus(2, SlotState.NOT_FULL, BANK2),
                SlotStatus(3, SlotState.EMPTY),
            ),
        ),
        (
            "1;2.;3.ER;",  # bare slot numbers: empty
            (
                SlotStatus(1, SlotState.EMPTY),
                SlotStatus(2, SlotState.EMPTY),
                SlotStatus(3, SlotState.FAULT),
            ),
        ),
        ("", tuple(SlotStatus(n, SlotState.EMPTY) for n in (1, 2, 3))),
    ],
    ids=[
        "seed",
        "no-trailing",
        "order",
        "NU",
        "EM-ER",
        "unlisted-empty",
        "bare-empty",
        "all-empty",
    ],
)
def test_status_report_forms(codec, aq_data, expected):
    packet = codec.parse(with_crc(f"860000000000001,AQ,{aq_data},"))
    assert packet == StatusReport(IMEI, expected)
    assert packet.slots == expected


def test_status_report_with_spaces_after_semicolons(codec):
    line = '{"860000000000001, AQ, 1.FU.0000000012; 2.NF.0000000013; 3.ER; , 42F6"}'
    assert codec.parse(line) == StatusReport(IMEI, AQ_SLOTS)


def test_empty_slots_are_left_out_when_building(codec):
    packet = StatusReport(IMEI, (SlotStatus(2, SlotState.NO_CHARGE, BANK2),))
    line = codec.build(packet)
    assert line == with_crc("860000000000001,AQ,2.EM.0000000013;,").encode()
    assert codec.parse(line) == packet
    empty = StatusReport(IMEI)
    assert codec.build(empty) == with_crc("860000000000001,AQ,,").encode()
    assert codec.parse(codec.build(empty)) == empty


# ---------------------------------------------------------------------------- error reasons


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        # crc
        ('{"860000000000001,CH,0C4A"}', "crc"),
        ('{"860000000000001,CH,0c49"}', "crc"),  # upper case configured
        ('{"860000000000001,CH,C49"}', "crc"),
        ('{"860000000000001,CH,0C490"}', "crc"),
        ('{"860000000000001,CH,ZZZZ"}', "crc"),
        # format
        ("", "format"),
        ("hello", "format"),
        ('{"860000000000001,CH,0C49"', "format"),
        ('"860000000000001,CH,0C49"}', "format"),
        ('{"860000000000001,CH"}', "format"),
        ('{"860000000000001,CH,"}', "format"),
        ('{"860000000000001,CH,XX,0C49"}', "format"),
        ('{"860000000000001,CH,0C49"}x', "format"),
        ('{"860000000000001,CH,0C49"x"}', "format"),
        ('{"860000000000001,MC,BO.1,00000-0012,5637"}', "format"),
        ('{"860000000000001,MC,BO.1,5637"}', "format"),
        ('{"860000000000001,AQ,1.XX.0000000012;,0000"}', "format"),
        ('{"860000000000001,AQ,1.FU;,0000"}', "format"),
        ('{"860000000000001,AQ,1..0000000012;,0000"}', "format"),
        ('{"860000000000001,AQ,1.FU.1.2;,0000"}', "format"),
        ('{"86000000000000é,CH,0C49"}', "format"),
        # imei
        ('{"86000000000000,CH,0C49"}', "imei"),
        ('{"8600000000000012,CH,0C49"}', "imei"),
        ('{"86000000000000A,CH,0C49"}', "imei"),
        ('{"8600000 0000001,CH,0C49"}', "imei"),
        # slot
        ('{"860000000000001,MC,BO.0,0000000012,0000"}', "slot"),
        ('{"860000000000001,MC,BO.4,0000000012,0000"}', "slot"),
        ('{"860000000000001,CC,BW,X,0000000012,0000"}', "slot"),
        ('{"860000000000001,MQ,01,0000000012,0000"}', "slot"),
        ('{"860000000000001,AQ,4.ER;,0000"}', "slot"),
        ('{"860000000000001,AQ,1.ER;1.FU.0000000012;,0000"}', "slot"),
        # command
        ('{"860000000000001,XX,0C49"}', "command"),
        ('{"860000000000001,ch,0C49"}', "command"),
        ('{"860000000000001,MC,BF.1,0000000012,0000"}', "command"),
        ('{"860000000000001,AR,BO.1,0000000012,0000"}', "command"),
        ('{"860000000000001,RQ,X.1,0000000012,0000"}', "command"),
        ('{"860000000000001,CC,BX,1,0000000012,0000"}', "command"),
        # length
        ('{"860000000000001,CH,0C49"}' + " " * 600, "length"),
        ("x" * 513, "length"),
    ],
)
def test_each_error_reason(codec, line, reason):
    with pytest.raises(PowerbankError) as caught:
        codec.parse(line)
    assert caught.value.reason == reason
    assert str(caught.value)


def test_error_type_is_the_shared_protocol_error():
    assert issubclass(PowerbankError, ProtocolError)
    assert issubclass(PowerbankError, ValueError)
    assert set(pb.ERROR_REASONS) == {"crc", "format", "imei", "slot", "command", "length"}


def test_crc_error_names_the_expected_value(codec):
    with pytest.raises(PowerbankError, match="0C4A does not match 0C49"):
        codec.parse('{"860000000000001,CH,0C4A"}')


@pytest.mark.parametrize("value", [None, 42, ["{}"], object()])
def test_non_text_input_is_a_format_error(codec, value):
    with pytest.raises(PowerbankError) as caught:
        codec.parse(value)
    assert caught.value.reason == "format"


def test_invalid_bytes_are_a_format_error(codec):
    with pytest.raises(PowerbankError) as caught:
        codec.parse(b'{"860000000000001,CH,0C49"}\xff\xfe\xff')
    assert caught.value.reason == "format"


def test_max_length_is_configurable():
    line = '{"860000000000001,CH,0C49"}'
    assert Codec(max_length=len(line)).parse(line) == Heartbeat(IMEI)
    with pytest.raises(PowerbankError, match="exceeds 10"):
        Codec(max_length=10).parse(line)


# ---------------------------------------------------------------------------- packets


def test_packets_validate_their_fields():
    cases = [
        (lambda: Heartbeat("123"), "imei"),
        (lambda: LendRequest(IMEI, 4, BANK1), "slot"),
        (lambda: LendRequest(IMEI, True, BANK1), "slot"),
        (lambda: LendRequest(IMEI, 1, "bad id"), "format"),
        (lambda: SlotStatus(1, SlotState.FULL), "format"),
        (lambda: SlotStatus(1, SlotState.EMPTY, BANK1), "format"),
        (lambda: SlotStatus(1, "full", BANK1), "format"),
        (lambda: StatusReport(IMEI, (SlotStatus(1, SlotState.FAULT),) * 2), "slot"),
    ]
    for make, reason in cases:
        with pytest.raises(PowerbankError) as caught:
            make()
        assert caught.value.reason == reason


def test_status_report_is_completed_and_sorted():
    report = StatusReport(IMEI, (SlotStatus(3, SlotState.FAULT), SlotStatus(1, SlotState.EMPTY)))
    assert [s.slot for s in report.slots] == [1, 2, 3]
    assert report.status(2) == SlotStatus(2, SlotState.EMPTY)
    assert report.status(3).state is SlotState.FAULT
    assert report == StatusReport(IMEI, (SlotStatus(3, SlotState.FAULT),))


def test_answers_and_acks_built_from_device_packets(codec):
    query = ReturnQuery(IMEI, 2, BANK2)
    assert query.answer(True) == ReturnQueryAnswer(IMEI, 2, BANK2, True)
    assert codec.build(query.answer(False)).startswith(b'{"860000000000001,RQ,F.2,0000000013,')
    assert LendResult(IMEI, 1, BANK1, True).ack() == LendResultAck(IMEI, 1, BANK1, True)
    assert LendResult(IMEI, 1, BANK1, False).ack().command == "AR"
    assert ReturnResult(IMEI, 2, BANK2, False).ack() == ReturnResultAck(IMEI, 2, BANK2, False)
    assert ReturnResult(IMEI, 2, BANK2, True).ack().code == "RO"


def test_packet_to_dict_is_json_ready():
    assert pb.packet_to_dict(LendResult(IMEI, 1, BANK1, True)) == {
        "type": "lend_result",
        "command": "MC",
        "code": "BO",
        "imei": IMEI,
        "slot": 1,
        "bank": BANK1,
        "ok": True,
    }
    assert pb.packet_to_dict(ReturnQuery(IMEI, 2, BANK2)) == {
        "type": "return_query",
        "command": "MQ",
        "imei": IMEI,
        "slot": 2,
        "bank": BANK2,
    }
    report = pb.packet_to_dict(StatusReport(IMEI, AQ_SLOTS[:1]))
    assert report["slots"] == [
        {"slot": 1, "state": "full", "bank": BANK1},
        {"slot": 2, "state": "empty", "bank": None},
        {"slot": 3, "state": "empty", "bank": None},
    ]
    assert json.loads(json.dumps(report)) == report


def test_building_something_else_is_a_format_error(codec):
    with pytest.raises(PowerbankError) as caught:
        codec.build(pb.Packet(IMEI))
    assert caught.value.reason == "format"


def test_build_can_force_the_crc_digits(codec):
    assert codec.build(Heartbeat(IMEI), crc="DEAD") == b'{"860000000000001,CH,DEAD"}\r\n'
    for bad in ("DEADBEEF", "xyz!", "Ä000", 1234):
        with pytest.raises(PowerbankError) as caught:
            codec.build(Heartbeat(IMEI), crc=bad)
        assert caught.value.reason == "crc"


# ---------------------------------------------------------------------------- CRC settings


def test_crc_settings_reject_unknown_values():
    for bad in (
        {"algorithm": "crc32"},
        {"span": "all"},
        {"byte_order": "middle"},
        {"case": "title"},
        {"mode": "lenient"},
    ):
        with pytest.raises(ValueError):
            CrcSettings(**bad)


SPAN_COVERS = {
    "imei_to_last_comma": "860000000000001,CH,",
    "imei_to_last_field": "860000000000001,CH",
    "brace_to_last_comma": '{"860000000000001,CH,',
    "brace_to_last_field": '{"860000000000001,CH',
    # raw spans cover the received bytes; a built frame has no whitespace to keep
    "raw_imei_to_crc": "860000000000001,CH,",
    "raw_imei_to_last_field": "860000000000001,CH",
    "raw_brace_to_crc": '{"860000000000001,CH,',
    "raw_brace_to_last_field": '{"860000000000001,CH',
}


@pytest.mark.parametrize("span", pb.SPANS)
def test_each_span_covers_the_documented_bytes_when_building(span):
    codec = Codec(CrcSettings(span=span))
    expected = modbus(SPAN_COVERS[span])
    assert codec.build(Heartbeat(IMEI)) == f'{{"{IMEI},CH,{expected}"}}\r\n'.encode()
    assert codec.parse(codec.build(Heartbeat(IMEI))) == Heartbeat(IMEI)


@pytest.mark.parametrize(
    ("span", "covered"),
    [
        ("raw_imei_to_crc", "860000000000001, CH, "),
        ("raw_imei_to_last_field", "860000000000001, CH"),
        ("raw_brace_to_crc", '{"860000000000001, CH, '),
        ("raw_brace_to_last_field", '{"860000000000001, CH'),
        ("imei_to_last_comma", "860000000000001,CH,"),
    ],
)
def test_raw_spans_cover_the_received_bytes_with_their_spaces(span, covered):
    line = '{"860000000000001, CH, ' + modbus(covered) + '"}\r\n'
    decoded = Codec(CrcSettings(span=span)).decode(line)
    assert decoded.crc_ok is True
    assert decoded.packet == Heartbeat(IMEI)


def test_raw_span_keeps_fullwidth_bytes_in_their_encoding():
    line = '{"860000000000001，CH，'
    crc = f"{Crc16Modbus.calc('860000000000001，CH，'.encode('gbk')):04X}"
    data = (line + crc + '"}').encode("gbk")
    assert Codec(CrcSettings(span="raw_imei_to_crc")).decode(data).crc_ok is True


def test_byte_order_case_and_algorithm_are_applied():
    assert Crc16Xmodem.calc(b"860000000000001,CH,") == 0x073C
    codec = Codec(CrcSettings(algorithm="xmodem", byte_order="little", case="lower"))
    assert codec.build(Heartbeat(IMEI)) == b'{"860000000000001,CH,3c07"}\r\n'
    assert codec.parse('{"860000000000001,CH,3c07"}') == Heartbeat(IMEI)
    with pytest.raises(PowerbankError) as caught:
        codec.parse('{"860000000000001,CH,3C07"}')  # the letter case must match too
    assert caught.value.reason == "crc"


def test_mode_log_accepts_a_bad_crc_and_reports_it():
    decoded = Codec(CrcSettings(mode="log")).decode('{"860000000000001,CH,0000"}')
    assert decoded.packet == Heartbeat(IMEI)
    assert (decoded.crc, decoded.expected_crc, decoded.crc_ok) == ("0000", "0C49", False)


def test_mode_off_does_not_check():
    decoded = Codec(CrcSettings(mode="off")).decode('{"860000000000001,CH,0000"}')
    assert (decoded.packet, decoded.crc_ok, decoded.expected_crc) == (Heartbeat(IMEI), None, None)


def test_mode_strict_reports_success():
    decoded = Codec().decode('{"860000000000001,CH,0C49"}')
    assert (decoded.crc, decoded.expected_crc, decoded.crc_ok) == ("0C49", "0C49", True)


@pytest.mark.parametrize("mode", ["log", "off"])
def test_modes_still_reject_a_malformed_crc_field(mode):
    with pytest.raises(PowerbankError) as caught:
        Codec(CrcSettings(mode=mode)).parse('{"860000000000001,CH,0C4"}')
    assert caught.value.reason == "crc"


# ---------------------------------------------------------------------------- crc-detect


def test_crc_detect_finds_the_default_first_for_default_lines(codec):
    lines = [codec.build(form[2]).decode() for form in SEED_FORMS[:4]]
    found = pb.crc_detect(lines)
    assert found[0] == CrcSettings()
    assert all(s.mode == "strict" for s in found)


def test_crc_detect_finds_a_non_default_setting():
    target = CrcSettings(algorithm="kermit", span="brace_to_last_field", byte_order="little")
    codec = Codec(target)
    lines = [codec.build(p) for p in (Heartbeat(IMEI), LendResult(IMEI, 1, BANK1, False))]
    found = pb.crc_detect(lines)
    assert target in found
    assert all(Codec(s).parse(line) for s in found for line in lines)
    assert CrcSettings() not in found


def test_crc_detect_finds_a_raw_span_from_spaced_lines():
    assert (modbus("860000000000001, CH, "), modbus("860000000000001, CQ, ")) == ("7EAD", "B97C")
    lines = ['{"860000000000001, CH, 7EAD"}', '{"860000000000001, CQ, B97C"}']
    found = pb.crc_detect(lines)
    assert CrcSettings(span="raw_imei_to_crc") in found
    assert CrcSettings(span="raw_imei_to_crc", case="lower") not in found
    assert CrcSettings() not in found


def test_crc_detect_with_no_match_returns_nothing():
    assert pb.crc_detect(['{"860000000000001,CH,0C49"}', '{"860000000000001,CQ,0C49"}']) == []


def test_crc_detect_rejects_malformed_lines_and_no_lines():
    with pytest.raises(PowerbankError) as caught:
        pb.crc_detect(['{"86000000000000,CH,0C49"}'])
    assert caught.value.reason == "imei"
    with pytest.raises(PowerbankError):
        pb.crc_detect([])


# ---------------------------------------------------------------------------- decode for the CLI


def test_decode_for_cli_reports_a_good_crc():
    out = pb.decode_for_cli('{"860000000000001, MC, BO.1, 0000000012, 5637"}')
    assert out["packet"] == pb.packet_to_dict(MC_PACKET)
    assert out["crc"] == {
        "received": "5637",
        "ok": True,
        "algorithm": "modbus",
        "span": "imei_to_last_comma",
        "byte_order": "big",
        "case": "upper",
    }
    assert out["canonical"] == '{"860000000000001,MC,BO.1,0000000012,5637"}\r\n'
    assert json.loads(json.dumps(out)) == out


def test_decode_for_cli_ignores_a_terminator_typed_as_backslash_escapes():
    out = pb.decode_for_cli('{"860000000000001,CH,0C49"}\\r\\n')
    assert out["crc"]["ok"] is True


def test_decode_for_cli_reports_a_wrong_crc_with_the_expected_one():
    out = pb.decode_for_cli('{"860000000000001,CH,1234"}')
    assert out["crc"]["ok"] is False
    assert out["crc"]["received"] == "1234"
    assert out["crc"]["expected"] == "0C49"
    assert out["packet"]["type"] == "heartbeat"


def test_decode_for_cli_uses_given_settings_and_raises_on_bad_frames():
    out = pb.decode_for_cli('{"860000000000001,CH,0C49"}', CrcSettings(algorithm="arc"))
    assert out["crc"]["algorithm"] == "arc"
    assert out["crc"]["ok"] is False
    with pytest.raises(PowerbankError) as caught:
        pb.decode_for_cli('{"860000000000001,ZZ,0C49"}')
    assert caught.value.reason == "command"


# ---------------------------------------------------------------------------- properties

imeis = st.from_regex(r"[0-9]{15}", fullmatch=True)
banks = st.from_regex(r"[0-9A-Za-z]{1,32}", fullmatch=True)
slot_numbers = st.sampled_from(pb.SLOTS)


@st.composite
def slot_statuses(draw):
    slot = draw(slot_numbers)
    state = draw(st.sampled_from(list(SlotState)))
    if state is SlotState.EMPTY:
        return SlotStatus(slot, state)
    if state in (SlotState.FULL, SlotState.NOT_FULL):
        return SlotStatus(slot, state, draw(banks))
    return SlotStatus(slot, state, draw(st.none() | banks))


def _slot_bank(cls, *extra):
    return st.builds(cls, imeis, slot_numbers, banks, *extra)


packets = st.one_of(
    st.builds(Heartbeat, imeis),
    st.builds(StatusQuery, imeis),
    st.builds(
        StatusReport,
        imeis,
        st.lists(slot_statuses(), max_size=3, unique_by=lambda s: s.slot).map(tuple),
    ),
    _slot_bank(LendRequest),
    _slot_bank(ReturnQuery),
    _slot_bank(ReturnQueryAnswer, st.booleans()),
    _slot_bank(LendResult, st.booleans()),
    _slot_bank(ReturnResult, st.booleans()),
    _slot_bank(LendResultAck, st.booleans()),
    _slot_bank(ReturnResultAck, st.booleans()),
)
crc_settings = st.builds(
    CrcSettings,
    st.sampled_from(ALGORITHMS),
    st.sampled_from(pb.SPANS),
    st.sampled_from(("big", "little")),
    st.sampled_from(("upper", "lower")),
)

FULLWIDTH = {",": "，", ";": "；", ".": "．", '"': "“", "{": "｛", "}": "｝"}


@st.composite
def tolerant_variants(draw, line: str) -> str:
    """``line`` with whitespace around punctuation, full-width punctuation, another terminator."""
    body = line.rstrip("\r\n")
    out = []
    for char in body:
        if char in FULLWIDTH:
            space = st.sampled_from(["", "", " ", "  ", "\t"])
            mapped = FULLWIDTH[char] if draw(st.booleans()) else char
            out.append(draw(space) + mapped + draw(space))
        else:
            out.append(char)
    return "".join(out) + draw(st.sampled_from(["", "\n", "\r\n", "\r", " \r\n"]))


@given(packet=packets, crc=crc_settings)
def test_parse_of_build_is_identity(packet, crc):
    codec = Codec(crc)
    line = codec.build(packet)
    assert codec.parse(line) == packet
    assert codec.parse(line.decode()) == packet


@given(data=st.data(), packet=packets)
def test_tolerant_variants_parse_to_the_packet_and_rebuild_canonically(data, packet):
    codec = Codec()
    canonical = codec.build(packet)
    variant = data.draw(tolerant_variants(canonical.decode()))
    parsed = codec.parse(variant)
    assert parsed == packet
    assert codec.build(parsed) == canonical
    assert codec.parse(variant.encode("utf-8")) == packet
    assert codec.parse(variant.encode("gb18030")) == packet


def assert_only_powerbank_errors(codec, line):
    try:
        packet = codec.parse(line)
    except PowerbankError as exc:
        assert exc.reason in pb.ERROR_REASONS
    else:
        assert isinstance(packet, pb.Packet)
        assert codec.parse(codec.build(packet)) == packet


FUZZ = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)


@FUZZ
@given(line=st.binary(max_size=600))
def test_random_bytes_raise_only_powerbank_error(line):
    assert_only_powerbank_errors(Codec(CrcSettings(mode="off")), line)


@FUZZ
@given(line=st.text(max_size=600))
def test_random_text_raises_only_powerbank_error(line):
    assert_only_powerbank_errors(Codec(CrcSettings(mode="off")), line)


WORDS = ["860000000000001", "CH", "CQ", "AQ", "CC", "MQ", "RQ", "MC", "AM", "MR", "AR", "BW"]
WORDS += ["T", "F", "BO", "RO", "BF", "RF", "1", "2", "3", "4", "0000000012", "FU", "NF", "EM"]
WORDS += ["ER", "0C49", "5637", "", "1.FU.0000000012;", "3.ER;", "2."]
noise = st.text(alphabet='0123456789ABCDEFTXRONUWMQ.;, "{}\r\n\t，；“', max_size=8)
frame_pieces = st.tuples(
    st.just(IMEI) | noise,  # a valid IMEI and command half the time, to reach the data fields
    st.sampled_from(WORDS[1:11]) | noise,
    st.lists(st.sampled_from(WORDS) | noise, max_size=8),
).map(lambda head: [head[0], head[1], *head[2]])


@FUZZ
@given(
    pieces=frame_pieces,
    data=st.data(),
    mode=st.sampled_from(pb.CRC_MODES),
    span=st.sampled_from(pb.SPANS),
)
def test_frame_shaped_text_raises_only_powerbank_error(pieces, data, mode, span):
    separators = st.sampled_from([",", ",", ",", ".", ";", " .", "，", " ", ""])
    text = "".join(piece + data.draw(separators) for piece in pieces)
    codec = Codec(CrcSettings(span=span, mode=mode))
    assert_only_powerbank_errors(codec, '{"' + text + '"}')
    assert_only_powerbank_errors(codec, ('{"' + text + '"}\r\n').encode("utf-8"))


@FUZZ
@given(
    data=st.data(),
    packet=packets,
    mode=st.sampled_from(pb.CRC_MODES),
    span=st.sampled_from(pb.SPANS),
)
def test_mutated_valid_lines_raise_only_powerbank_error(data, packet, mode, span):
    codec = Codec(CrcSettings(span=span, mode=mode))
    line = bytearray(codec.build(packet))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(line)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from(list(b'0123456789AF,.;"{} \r\n') + [0xFF, 0x00, 0x80]))
        if action == "insert":
            line.insert(position, byte)
        elif position < len(line):
            if action == "delete":
                del line[position]
            else:
                line[position] = byte
    assert_only_powerbank_errors(codec, bytes(line))


@given(packet=packets, data=st.data())
def test_a_single_changed_digit_fails_the_strict_crc(packet, data):
    codec = Codec()
    line = codec.build(packet).decode()
    # change one character of the CRC-covered body to another valid character of its kind
    body_end = line.rfind(",")
    position = data.draw(st.integers(2, body_end - 1))
    assume(line[position].isdigit())
    replacement = data.draw(st.sampled_from("0123456789").filter(lambda c: c != line[position]))
    mutated = line[:position] + replacement + line[position + 1 :]
    try:
        codec.parse(mutated)
    except PowerbankError as exc:
        assert exc.reason in ("crc", "slot")  # a changed slot digit may leave 1..3 first
    else:
        raise AssertionError(f"{mutated!r} passed the CRC check")
