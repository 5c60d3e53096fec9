"""CJ/T 188 codec: the 19 seed frames, public frames, every failure reason, builders, fuzzing.

Expected values come from /work/shared/reference/cjt188-heating.md and cjt188-seed-frames.json.
"""

from __future__ import annotations

import contextlib

import pytest
from gatewayd.protocols import cjt188
from gatewayd.protocols.cjt188 import (
    FRAME,
    KNOWN_DIS,
    Cjt188Error,
    address_standard_order,
    build_frame,
    build_valve_opening,
    decode_for_cli,
    decode_payload,
    decode_valve_reply,
    is_reply_to,
    parse_frame,
    parse_hex,
)
from gatewayd.protocols.errors import ProtocolError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BUILDING = "27100583001111"
HOUSEHOLD = "23227310001111"

# The seed's frames, by document line: (hex as printed, repaired hex or None, verdict).
SEED = {
    138: (
        "685527100583001111813B901F0012235304050000000032785634002A872800932800000000005000000002C"
        "00000000FA00FA000000E803E8030000EA008185CB0123F7407316",
        "685527100583001111813B901F0012235304050000000032785634002A8728009328000000000005000000002"
        "C00000000FA00FA000000E803E8030000EA008185CB0123F7407316",
        "repaired",
    ),
    147: (
        "685323227310001111812D901F011073221201DC00DC0055640A28006F3300006401180119620105063005502"
        "000B42300212126052420407216",
        None,
        "valid",
    ),
    149: (
        "685527100583001111813B901F0012235304050000000032785634002A872800932800000000005000000002C"
        "00000000FA00FA000000E803E8030000EA000C85CB0123F740FE16",
        "685527100583001111813B901F0012235304050000000032785634002A8728009328000000000005000000002"
        "C00000000FA00FA000000E803E8030000EA000C85CB0123F740FE16",
        "repaired",
    ),
    151: (
        "685527100583001111813B901F0012235304050000000032785634002A872800932800000000005000000002C"
        "00000000FA00FA000000E803E8030000EA008185CB0123F7407316",
        "685527100583001111813B901F0012235304050000000032785634002A8728009328000000000005000000002"
        "C00000000FA00FA000000E803E8030000EA008185CB0123F7407316",
        "repaired",
    ),
    153: (
        "685323227310001111812D901F011073221201DC00DC0055640A28006F3300006401180119620105063005502"
        "000B42300412026052420408B16",
        None,
        "broken",
    ),
    162: (
        "685323227310001111812D901F011073221201DC00DC0055640A28006F3300006401230125620102353005502"
        "000B42300081926052420409416",
        None,
        "valid",
    ),
    192: (
        "685527100583001111813B901F0012235304050000000032785634002A8728009328000000000005000000002"
        "C00000000FA00FA000000E803E8030000EA008185CB0123F7407316",
        None,
        "valid",
    ),
    225: (
        "685323227310001111812D901F011073221201DC00DC0055640A28006F330006401230125620102353005502"
        "000B42300081926052420409416",
        "685323227310001111812D901F011073221201DC00DC0055640A28006F3300006401230125620102353005502"
        "000B42300081926052420409416",
        "repaired",
    ),
    239: (
        "FEFEFE685527100583001111605902F0100007916",
        "FEFEFE6855271005830011111605902F0100007916",
        "repaired",
    ),
    258: ("6855271005830011119603902F01F716", None, "valid"),
    270: (
        "FEFEFE685527100583001111605902F01F4016E16",
        "FEFEFE6855271005830011111605902F01F4016E16",
        "repaired",
    ),
    289: ("6855271005830011119603902F01F716", None, "valid"),
    320: ("6853232273100011118404A01900644A16", None, "valid"),
    334: ("FEFEFEFE6853232273100011110404A01900006616", None, "valid"),
    353: ("6853232273100011118404A0190000E616", None, "valid"),
    365: ("FEFEFE6853232273100011110404A01900329816", None, "valid"),
    381: ("6853232273100011118404A01900321816", None, "valid"),
    391: ("FEFEFEFE6853232273100011110404A0190064CA16", None, "valid"),
    405: ("6853232273100011118404A01900644A16", None, "valid"),
}
# Header per line: (T, address, C, L, DI, SER, preambles, CS) from the reference table §2.
HEADERS = {
    138: (0x55, BUILDING, 0x81, 0x3B, 0x901F, 0x00, 0, 0x73),
    147: (0x53, HOUSEHOLD, 0x81, 0x2D, 0x901F, 0x01, 0, 0x72),
    149: (0x55, BUILDING, 0x81, 0x3B, 0x901F, 0x00, 0, 0xFE),
    151: (0x55, BUILDING, 0x81, 0x3B, 0x901F, 0x00, 0, 0x73),
    162: (0x53, HOUSEHOLD, 0x81, 0x2D, 0x901F, 0x01, 0, 0x94),
    192: (0x55, BUILDING, 0x81, 0x3B, 0x901F, 0x00, 0, 0x73),
    225: (0x53, HOUSEHOLD, 0x81, 0x2D, 0x901F, 0x01, 0, 0x94),
    239: (0x55, BUILDING, 0x16, 0x05, 0x902F, 0x01, 3, 0x79),
    258: (0x55, BUILDING, 0x96, 0x03, 0x902F, 0x01, 0, 0xF7),
    270: (0x55, BUILDING, 0x16, 0x05, 0x902F, 0x01, 3, 0x6E),
    289: (0x55, BUILDING, 0x96, 0x03, 0x902F, 0x01, 0, 0xF7),
    320: (0x53, HOUSEHOLD, 0x84, 0x04, 0xA019, 0x00, 0, 0x4A),
    334: (0x53, HOUSEHOLD, 0x04, 0x04, 0xA019, 0x00, 4, 0x66),
    353: (0x53, HOUSEHOLD, 0x84, 0x04, 0xA019, 0x00, 0, 0xE6),
    365: (0x53, HOUSEHOLD, 0x04, 0x04, 0xA019, 0x00, 3, 0x98),
    381: (0x53, HOUSEHOLD, 0x84, 0x04, 0xA019, 0x00, 0, 0x18),
    391: (0x53, HOUSEHOLD, 0x04, 0x04, 0xA019, 0x00, 4, 0xCA),
    405: (0x53, HOUSEHOLD, 0x84, 0x04, 0xA019, 0x00, 0, 0x4A),
}


def seed_frame(line: int) -> cjt188.Frame:
    printed, repaired, _ = SEED[line]
    return parse_hex(repaired or printed)


def field_values(payload: dict) -> dict:
    return {name: field["value"] for name, field in payload["fields"].items()}


# --- the seed -----------------------------------------------------------------------------------


def test_seed_inventory_matches_reference() -> None:
    verdicts = [verdict for _, _, verdict in SEED.values()]
    assert len(SEED) == 19
    assert verdicts.count("valid") == 12
    assert verdicts.count("repaired") == 6
    assert verdicts.count("broken") == 1


@pytest.mark.parametrize("line", sorted(HEADERS))
def test_seed_headers(line: int) -> None:
    frame = seed_frame(line)
    meter_type, address, control, length, di, ser, preambles, checksum = HEADERS[line]
    assert frame.meter_type == meter_type
    assert frame.address == address
    assert frame.control == control
    assert frame.length == length == len(frame.data) + 3
    assert frame.di == di
    assert frame.di_byte_order == "high_first"
    assert frame.ser == ser
    assert frame.preambles == preambles
    assert frame.checksum == checksum
    assert frame.raw == bytes.fromhex(SEED[line][1] or SEED[line][0])


@pytest.mark.parametrize("line", [n for n, (_, _, v) in SEED.items() if v == "repaired"])
def test_seed_as_printed_is_rejected_never_repaired(line: int) -> None:
    with pytest.raises(Cjt188Error) as caught:
        parse_hex(SEED[line][0])
    assert caught.value.reason == "format"  # an odd number of hex digits


def test_seed_line_153_wrong_checksum_rejected() -> None:
    with pytest.raises(Cjt188Error) as caught:
        parse_hex(SEED[153][0])
    assert caught.value.reason == "checksum"
    assert "8B" in caught.value.message and "91" in caught.value.message


def test_repairs_reproduce_the_independent_copies() -> None:
    assert SEED[138][1] == SEED[151][1] == SEED[192][0]
    assert SEED[225][1] == SEED[162][0]


@pytest.mark.parametrize("line", [138, 149, 151, 192])
def test_building_valve_report_vendor_scaling(line: int) -> None:
    payload = decode_payload(seed_frame(line))
    assert payload["decoder"] == "building_valve_55"
    fields = payload["fields"]
    assert field_values(payload) == {
        "heat_total": 4532312.0,
        "flow_rate": 0.0,
        "volume_total": 3456780.0,  # 345678 x (L x 10) = 3456.78 m³, the vendor's reading
        "supply_temperature": 28.87,
        "return_temperature": 28.93,
        "valve_opening": 25.0,
        "valve_setpoint": 25.0,
    }
    assert fields["heat_total"] == {
        "value": 4532312.0,
        "unit": "kWh",
        "raw": "1223530405",
        "bcd": "04532312",
        "unit_code": "05",
        "scaling": "vendor_integer",
    }
    assert fields["volume_total"]["unit"] == "L"
    assert fields["volume_total"]["unit_code"] == "2A"
    assert fields["flow_rate"]["unit"] == "L/h"
    assert fields["supply_temperature"] == {
        "value": 28.87,
        "unit": "°C",
        "raw": "872800",
        "bcd": "002887",
    }
    assert fields["valve_opening"] == {"value": 25.0, "unit": "%", "raw": "FA00"}
    d49 = "0C" if line == 149 else "81"
    assert payload["unparsed"] == {
        "d21_25": "0000000005",
        "d26_30": "000000002C",
        "d31_34": "00000000",
        "d39_55": f"0000E803E8030000EA00{d49}85CB0123F740",
    }


def test_building_valve_report_standard_scaling() -> None:
    payload = decode_payload(seed_frame(192), bcd_decimals=2)
    assert payload["fields"]["heat_total"]["value"] == 45323.12
    assert payload["fields"]["heat_total"]["scaling"] == "standard"
    assert payload["fields"]["volume_total"]["value"] == 34567.8  # 34.5678 m³
    assert payload["fields"]["supply_temperature"]["value"] == 28.87  # not scaled by the setting


def test_bcd_decimals_is_checked() -> None:
    with pytest.raises(Cjt188Error) as caught:
        decode_payload(seed_frame(192), bcd_decimals=1)  # type: ignore[arg-type]
    assert caught.value.reason == "argument"


@pytest.mark.parametrize(
    ("line", "supply", "ret", "clock"),
    [
        (147, 28.0, 28.1, "2024-05-26T21:21:00"),
        (162, 29.1, 29.3, "2024-05-26T19:08:00"),
        (225, 29.1, 29.3, "2024-05-26T19:08:00"),
    ],
)
def test_household_valve_report(line: int, supply: float, ret: float, clock: str) -> None:
    payload = decode_payload(seed_frame(line))
    assert payload["decoder"] == "household_valve_53"
    assert field_values(payload) == {
        "room_temperature": 22.0,
        "room_setpoint": 22.0,
        "valve_opening": 100.0,
        "supply_temperature": supply,
        "return_temperature": ret,
        "battery_voltage": 3.6,
        "status": 0x40,
    }
    assert payload["fields"]["room_temperature"]["raw"] == "DC00"
    assert payload["fields"]["battery_voltage"] == {"value": 3.6, "unit": "V", "raw": "B4"}
    assert payload["inferred"] == {"meter_clock": clock}
    assert payload["unparsed"]["d0_4"] == "1073221201"
    assert payload["unparsed"]["d9_9"] == "55"


def test_household_valve_negative_room_temperature() -> None:
    data = bytearray(seed_frame(147).data)
    data[5:7] = (0xF000 | 25).to_bytes(2, "little")  # vendor: F high nibble = negative
    frame = parse_frame(build_frame(0x53, HOUSEHOLD, 0x81, 0x901F, 1, bytes(data)))
    assert decode_payload(frame)["fields"]["room_temperature"]["value"] == -2.5


def test_building_valve_negative_flow() -> None:
    data = bytearray(seed_frame(192).data)
    data[5:9] = bytes([0x50, 0x12, 0x00, 0xF0])  # BCD 0000 1250 with F on the top byte
    frame = parse_frame(build_frame(0x55, BUILDING, 0x81, 0x901F, 0, bytes(data)))
    assert decode_payload(frame)["fields"]["flow_rate"]["value"] == -1250.0


def test_bad_bcd_digit_gives_no_value() -> None:
    data = bytearray(seed_frame(192).data)
    data[15] = 0x8A  # supply temperature digit A
    frame = parse_frame(build_frame(0x55, BUILDING, 0x81, 0x901F, 0, bytes(data)))
    field = decode_payload(frame)["fields"]["supply_temperature"]
    assert field["value"] is None and field["error"] == "bcd" and field["raw"] == "8A2800"


# --- valve commands and replies ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meter_type", "address", "percent", "preambles", "expected"),
    [
        (0x55, BUILDING, 0, 3, SEED[239][1]),
        (0x55, BUILDING, 50, 3, SEED[270][1]),
        (0x55, BUILDING, 100, 3, "FEFEFE6855271005830011111605902F01E8036416"),  # ref §1.4
        (0x53, HOUSEHOLD, 0, 4, SEED[334][0]),
        (0x53, HOUSEHOLD, 50, 3, SEED[365][0]),
        (0x53, HOUSEHOLD, 100, 4, SEED[391][0]),
        (0x53, "34567891001111", 100, 3, "FEFEFE6853345678910011110404A01900649516"),  # template
    ],
)
def test_build_valve_opening_matches_vendor_bytes(
    meter_type: int, address: str, percent: float, preambles: int, expected: str
) -> None:
    built = build_valve_opening(meter_type, address, percent, preambles=preambles)
    assert built.hex().upper() == expected


def test_build_valve_opening_tenths_and_ser() -> None:
    frame = parse_frame(build_valve_opening(0x55, BUILDING, 37.5, ser=7))
    assert frame.preambles == 3 and frame.ser == 7 and frame.control == 0x16
    assert frame.data == (375).to_bytes(2, "little")
    assert decode_payload(frame)["fields"]["valve_opening"]["value"] == 37.5


@pytest.mark.parametrize(
    ("meter_type", "percent"),
    [(0x55, 100.1), (0x55, -1), (0x55, 12.34), (0x53, 50.5), (0x53, 101), (0x20, 50), (0x53, True)],
)
def test_build_valve_opening_rejects(meter_type: int, percent: float) -> None:
    with pytest.raises(Cjt188Error) as caught:
        build_valve_opening(meter_type, BUILDING, percent)
    assert caught.value.reason == "argument"


@pytest.mark.parametrize(
    ("line", "decoder", "opening"),
    [
        (239, "valve_55_command", 0.0),
        (270, "valve_55_command", 50.0),
        (334, "valve_53_command", 0.0),
        (365, "valve_53_command", 50.0),
        (391, "valve_53_command", 100.0),
        (353, "valve_53_reply", 0.0),
        (381, "valve_53_reply", 50.0),
        (405, "valve_53_reply", 100.0),
    ],
)
def test_valve_command_payloads(line: int, decoder: str, opening: float) -> None:
    payload = decode_payload(seed_frame(line))
    assert payload["decoder"] == decoder
    assert payload["fields"]["valve_opening"]["value"] == opening


def test_valve_55_ack() -> None:
    frame = seed_frame(258)
    assert decode_payload(frame)["fields"]["command_state"]["value"] == "done"
    assert decode_valve_reply(frame) == {
        "meter_type": "55",
        "address": BUILDING,
        "state": "done",
        "ok": True,
        "opening_percent": None,
    }


@pytest.mark.parametrize(("di", "state"), [(0x901F, "running"), (0x903F, "failed")])
def test_valve_55_ack_other_states(di: int, state: str) -> None:
    frame = parse_frame(build_frame(0x55, BUILDING, 0x96, di, 1))
    reply = decode_valve_reply(frame)
    assert reply["state"] == state and reply["ok"] is False


@pytest.mark.parametrize(("line", "opening"), [(353, 0.0), (381, 50.0), (405, 100.0)])
def test_valve_53_reply(line: int, opening: float) -> None:
    reply = decode_valve_reply(seed_frame(line))
    assert reply["state"] == "done" and reply["ok"] is True
    assert reply["opening_percent"] == opening


def test_valve_reply_error_and_not_a_reply() -> None:
    error = parse_frame(build_frame(0x53, HOUSEHOLD, 0xC4, 0xA019, 0, b"\x01"))
    assert decode_valve_reply(error)["state"] == "error_reply"
    assert decode_payload(error)["decoder"] == "error_reply"
    assert decode_valve_reply(seed_frame(192))["state"] == "not_a_valve_reply"
    assert decode_valve_reply(seed_frame(365))["state"] == "not_a_valve_reply"  # a command


def test_is_reply_to() -> None:
    assert is_reply_to(seed_frame(239), seed_frame(258))
    assert is_reply_to(seed_frame(365), seed_frame(381))
    assert not is_reply_to(seed_frame(239), seed_frame(381))  # other meter
    assert not is_reply_to(seed_frame(365), seed_frame(258))
    assert not is_reply_to(seed_frame(192), seed_frame(258))  # 901F read vs 96H ack
    running = parse_frame(build_frame(0x55, BUILDING, 0x96, 0x901F, 1))
    assert is_reply_to(seed_frame(239), running)
    other_di = parse_frame(build_frame(0x53, HOUSEHOLD, 0x84, 0xA017, 0, b"\x32"))
    assert not is_reply_to(seed_frame(365), other_di)
    low_first = parse_frame(
        build_frame(0x53, HOUSEHOLD, 0x84, 0xA019, 0, b"\x32", di_byte_order="low_first")
    )
    assert is_reply_to(seed_frame(365), low_first)
    head = bytes.fromhex("68532322731000111184" + "01") + b"\x01"  # C4 with SER only, no DI
    head = head[:9] + b"\xc4" + head[10:]
    bare_error = parse_frame(head + bytes([sum(head) & 0xFF, 0x16]))
    assert bare_error.di is None and bare_error.is_error_reply
    assert is_reply_to(seed_frame(365), bare_error)


# --- public frames ----------------------------------------------------------------------------


def test_public_jy_heat_meter_unit_before_value() -> None:
    frame = parse_hex(
        "FEFEFEFE682032413140000000812E901F01 0802000000 0802000000 1700000000 3500000000 "
        "2C34100000 352500 662500 000000 53001210071520 0000 3116"
    )
    payload = decode_payload(frame)
    assert payload["decoder"] == "heat_meter" and payload["unit_position"] == "first"
    assert field_values(payload) == {
        "settlement_heat": 0.02,
        "heat_total": 0.02,
        "heat_power": 0.0,
        "flow_rate": 0.0,
        "volume_total": 10.34,
        "supply_temperature": 25.35,
        "return_temperature": 25.66,
        "working_hours": 0.0,
        "meter_clock": "2015-07-10T12:00:53",
        "status": 0,
    }
    assert payload["fields"]["heat_total"]["unit"] == "MWh"
    assert payload["fields"]["volume_total"]["unit"] == "m³"


def test_standard_heat_meter_unit_after_value_and_multipliers() -> None:
    data = (
        bytes.fromhex("0000000005")  # settlement heat 0 kWh
        + bytes.fromhex("563412000A")  # heat 1234.56 x (MWh x 100)
        + bytes.fromhex("5000000017")  # power 0.50 kW
        + bytes.fromhex("2500000035")  # flow 0.0025 m³/h
        + bytes.fromhex("000100002E")  # volume 1.00 x (m³ x 100)
        + bytes.fromhex("004500")  # supply 45.00
        + bytes.fromhex("503500")  # return 35.50
        + bytes.fromhex("341200")  # 1234 h
        + bytes.fromhex("59592323122420")  # 2024-12-23 23:59:59
        + bytes.fromhex("0500")  # closed, battery low
    )
    payload = decode_payload(
        parse_frame(build_frame(0x20, "11223344556677", 0x81, 0x901F, 0, data))
    )
    assert payload["unit_position"] == "last"
    values = field_values(payload)
    assert values["heat_total"] == 123456.0 and payload["fields"]["heat_total"]["unit"] == "MWh"
    assert values["heat_power"] == 0.5
    assert values["flow_rate"] == 0.0025
    assert values["volume_total"] == 100.0
    assert values["supply_temperature"] == 45.0 and values["return_temperature"] == 35.5
    assert values["working_hours"] == 1234.0
    assert values["meter_clock"] == "2024-12-23T23:59:59"
    assert payload["inferred"] == {"valve_state": "closed", "battery_low": True}


def test_unknown_unit_code_keeps_raw() -> None:
    data = bytes.fromhex("00020000FF000200002C0000000000000000FF")
    payload = decode_payload(
        parse_frame(build_frame(0x10, "11223344556677", 0x81, 0x901F, 0, data))
    )
    field = payload["fields"]["volume_total"]
    assert field["value"] is None and field["unit_code"] == "FF" and field["error"] == "unit_code"
    assert field["bcd"] == "00000200"


@pytest.mark.parametrize(
    ("text", "volume", "settlement", "order"),
    [
        (
            "FEFEFEFE6810180212202000008116901F00000200002C000200002C0000000000000000FF8516",
            2.0,
            2.0,
            "high_first",
        ),
        (
            "FEFEFE6810120000000000008116901F00100010002C100010002C0000000000000000FF6716",
            1000.10,
            1000.10,
            "high_first",
        ),
        (
            "6810010203040506078116901F96005555052C005555052C0000000000000000002616",
            55555.0,
            55555.0,
            "high_first",
        ),
        (
            "6810060004000000008116 1F90 00 123456782C 234567892C 0A0F0C170B1114 2184 9D16",
            785634.12,
            896745.23,
            "low_first",
        ),
    ],
)
def test_public_water_meters(text: str, volume: float, settlement: float, order: str) -> None:
    frame = parse_hex(text)
    assert frame.di == 0x901F and frame.di_byte_order == order
    payload = decode_payload(frame)
    assert payload["decoder"] == "water_meter"
    assert payload["fields"]["volume_total"]["value"] == volume
    assert payload["fields"]["settlement_volume"]["value"] == settlement
    assert payload["fields"]["volume_total"]["unit"] == "m³"


def test_water_meter_clock_from_ng_gateway_payload() -> None:
    data = bytes.fromhex("003412002C000010002C00301408012620" + "0000")
    payload = decode_payload(
        parse_frame(build_frame(0x10, "11223344556677", 0x81, 0x901F, 0, data))
    )
    assert payload["fields"]["volume_total"]["value"] == 1234.0
    assert payload["fields"]["settlement_volume"]["value"] == 1000.0
    assert payload["fields"]["meter_clock"]["value"] == "2026-01-08T14:30:00"


def test_gas_meter_uses_the_water_layout() -> None:
    data = bytes.fromhex("000200002C000200002C0000000000000000FF")
    frame = parse_frame(build_frame(0x30, "11223344556677", 0x81, 0x901F, 0, data))
    assert decode_payload(frame)["decoder"] == "gas_meter"


@pytest.mark.parametrize(
    "text",
    [
        "6810120000000000000103901F003D16",
        "6810AAAAAAAAAAAAAA0103901F906116",
        "FEFEFEFE6810180212202000000103901F009716",
        "FEFEFEFE68AAAAAAAAAAAAAAAA0303810A004916",
    ],
)
def test_public_requests(text: str) -> None:
    assert decode_payload(parse_hex(text))["decoder"] == "request"


def test_public_sc_valve_open_a017() -> None:
    frame = parse_hex("FEFEFEFE6810690590051533780404A01701555016")
    assert frame.di == 0xA017 and frame.ser == 1
    assert decode_payload(frame)["fields"]["valve_action"]["value"] == "open"


def test_unknown_payload_is_reported_not_raised() -> None:
    frame = parse_frame(build_frame(0x55, BUILDING, 0x81, 0x901F, 0, b"\x01\x02"))
    payload = decode_payload(frame)
    assert payload["decoder"] == "unknown"
    assert payload["unparsed"] == {"data": "0102"}
    assert "T=55" in payload["reason"]


# --- framing failures --------------------------------------------------------------------------

GOOD = bytes.fromhex(SEED[381][0])


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "truncated"),
        (b"\xfe\xfe\xfe", "truncated"),
        (b"\xfe\xfe\x69" + GOOD[1:], "start"),
        (b"\x00" + GOOD, "start"),
        (GOOD[:8], "truncated"),
        (GOOD[:-1], "truncated"),
        (GOOD[:-1] + b"\x17", "end"),
        (GOOD + b"\x00", "length"),
        (GOOD[:10] + b"\x03" + GOOD[11:], "length"),  # L says 3, frame carries 4
        (GOOD[:10] + b"\x05" + GOOD[11:], "truncated"),  # L says 5, frame carries 4
        (GOOD[:-2] + bytes([GOOD[-2] ^ 1]) + b"\x16", "checksum"),
        (GOOD[:12] + bytes([GOOD[12] ^ 0x10]) + GOOD[13:], "checksum"),
    ],
)
def test_each_failure_has_its_reason(data: bytes, reason: str) -> None:
    with pytest.raises(Cjt188Error) as caught:
        parse_frame(data)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ProtocolError) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("text", ["68 1", "zz", "6853 2322 731G"])
def test_bad_hex_is_format(text: str) -> None:
    with pytest.raises(Cjt188Error) as caught:
        parse_hex(text)
    assert caught.value.reason == "format"


# --- building, DI order, construct ---------------------------------------------------------


def test_build_frame_reproduces_seed_reply() -> None:
    built = build_frame(0x53, HOUSEHOLD, 0x84, 0xA019, 0, b"\x32")
    assert built.hex().upper() == SEED[381][0]


def test_di_low_first_on_the_wire() -> None:
    built = build_frame(0x10, "11223344556677", 0x01, 0x901F, 0, di_byte_order="low_first")
    assert built[11:13] == b"\x1f\x90"
    frame = parse_frame(built)
    assert frame.di == 0x901F and frame.di_byte_order == "low_first"


def test_unknown_di_is_read_as_printed() -> None:
    frame = parse_frame(build_frame(0x10, "11223344556677", 0x01, 0x1234, 0))
    assert frame.di == 0x1234 and frame.di_byte_order == "high_first"


def test_known_dis_have_no_byte_swapped_twin() -> None:
    for di in KNOWN_DIS:
        swapped = (di & 0xFF) << 8 | di >> 8
        assert swapped == di or swapped not in KNOWN_DIS


def test_construct_declaration_builds_and_parses() -> None:
    value = {
        "meter_type": 0x53,
        "address": bytes.fromhex(HOUSEHOLD),
        "control": 0x84,
        "body": {"ident": {"di": b"\xa0\x19", "ser": 0}, "data": b"\x32"},
    }
    built = FRAME.build({"signed": {"value": value}})
    assert built.hex().upper() == SEED[381][0]
    parsed = FRAME.parse(built)
    assert parsed.checksum == 0x18 and parsed.signed.value.body.data == b"\x32"


def test_frames_without_di() -> None:
    body = bytes.fromhex("6810112233445566778102") + b"\x01\x02"
    raw = body + bytes([sum(body) & 0xFF, 0x16])
    frame = parse_frame(raw)
    assert frame.di is None and frame.ser is None and frame.data == b"\x01\x02"
    assert frame.is_error_reply is False
    assert decode_payload(frame)["decoder"] == "unknown"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"address": "2710058300111"},
        {"address": "ZZ100583001111"},
        {"address": b"\x00" * 6},
        {"meter_type": 256},
        {"control": -1},
        {"ser": 300},
        {"di": 0x10000},
        {"data": b"\x00" * 253},
        {"preambles": -1},
        {"di_byte_order": "middle"},
    ],
)
def test_build_frame_rejects_bad_arguments(kwargs: dict) -> None:
    args = {"meter_type": 0x53, "address": HOUSEHOLD, "control": 0x04, "di": 0xA019, "ser": 0}
    args |= kwargs
    with pytest.raises(Cjt188Error) as caught:
        build_frame(**args)
    assert caught.value.reason == "argument"


def test_address_standard_order() -> None:
    assert address_standard_order(BUILDING) == "11110083051027"


def test_decode_for_cli_accepts_spaces_and_lower_case() -> None:
    result = decode_for_cli(" fefefe 6853 2322 7310 0011 1104 04a0 1900 3298 16\n")
    assert result["frame"]["address"] == HOUSEHOLD
    assert result["frame"]["preambles"] == 3
    assert result["payload"]["fields"]["valve_opening"]["value"] == 50.0


# --- properties and fuzzing ------------------------------------------------------------------

addresses = st.binary(min_size=7, max_size=7)
known_dis = st.sampled_from(sorted(KNOWN_DIS))


@settings(max_examples=300, deadline=None)
@given(
    meter_type=st.integers(0, 255),
    address=addresses,
    control=st.integers(0, 255),
    di=st.one_of(known_dis, st.integers(0, 0xFFFF)),
    low_first=st.booleans(),
    ser=st.integers(0, 255),
    data=st.binary(max_size=cjt188.MAX_DATA),
    preambles=st.integers(0, 6),
)
def test_round_trip(
    meter_type: int,
    address: bytes,
    control: int,
    di: int,
    low_first: bool,
    ser: int,
    data: bytes,
    preambles: int,
) -> None:
    order = "low_first" if low_first and di in KNOWN_DIS else "high_first"
    if order == "high_first" and di not in KNOWN_DIS and ((di & 0xFF) << 8 | di >> 8) in KNOWN_DIS:
        order = "low_first"  # a byte-swapped known DI is read as that DI sent low byte first
        di = (di & 0xFF) << 8 | di >> 8
    raw = build_frame(
        meter_type, address, control, di, ser, data, preambles=preambles, di_byte_order=order
    )
    frame = parse_frame(raw)
    assert (frame.meter_type, frame.address, frame.control) == (
        meter_type,
        address.hex().upper(),
        control,
    )
    assert (frame.di, frame.di_byte_order, frame.ser, frame.data) == (di, order, ser, data)
    assert frame.length == len(data) + 3 and frame.raw == raw
    assert frame.preambles == preambles


def _exercise(data: bytes) -> None:
    try:
        frame = parse_frame(data)
    except Cjt188Error:
        return
    for decimals in (0, 2):
        decode_payload(frame, bcd_decimals=decimals)  # type: ignore[arg-type]
    decode_valve_reply(frame)
    frame.to_dict()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_random_bytes(data: bytes) -> None:
    _exercise(data)
    _exercise(b"\x68" + data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    line=st.sampled_from(sorted(HEADERS)),
    position=st.integers(0, 200),
    value=st.integers(0, 255),
    action=st.sampled_from(["set", "insert", "delete", "truncate"]),
)
def test_fuzz_mutated_valid_frames(line: int, position: int, value: int, action: str) -> None:
    raw = bytearray(seed_frame(line).raw)
    index = position % (len(raw) + 1)
    if action == "set" and index < len(raw):
        raw[index] = value
    elif action == "insert":
        raw.insert(index, value)
    elif action == "delete" and index < len(raw):
        del raw[index]
    else:
        raw = raw[:index]
    _exercise(bytes(raw))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_hex_text(text: str) -> None:
    with contextlib.suppress(Cjt188Error):
        decode_for_cli(text)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(min_size=42, max_size=42), ser=st.integers(0, 255))
def test_fuzz_vendor_payloads_decode(payload: bytes, ser: int) -> None:
    for meter_type, size in ((0x53, 42), (0x55, 56), (0x20, 43), (0x10, 19)):
        data = (payload * 2)[:size]
        frame = parse_frame(build_frame(meter_type, HOUSEHOLD, 0x81, 0x901F, ser, data))
        result = decode_payload(frame)
        assert result["decoder"] != "unknown"
        for field in result["fields"].values():
            assert set(field) >= {"value", "unit", "raw"}
