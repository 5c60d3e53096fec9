"""The ESAM function table: argument validation as the library does it (150N), flags, Lc and P1."""

from __future__ import annotations

import contextlib

import pytest
from gatewayd.protocols.errors import ProtocolError
from gatewayd.protocols.esam import (
    FUNCTIONS,
    EsamError,
    call_context,
    class2_lc,
    class2_p1,
    meter_number_from_div,
    output_sizes,
    validate_arguments,
)
from hypothesis import given
from hypothesis import strategies as st

from tests.protocols import esam_calls
from tests.protocols.esam_calls import CALLS, in_function_order

DIV = esam_calls.DIV

# One valid call of every function: the shared table, and fixed values for the two that take a
# meter's session (their cryptography is tested in tests/esam; here only their form matters).
VALID: dict[str, dict] = in_function_order(
    {
        **CALLS,
        "open_device": {},
        "close_device": {},
        "infrared_auth": {
            "flag": 0,
            "div": DIV,
            "esam_no": esam_calls.ESAM_NO,
            "rand1": "271789B1271789B1",
            "rand1_endata": "B89467F6980DA078",
            "rand2": "98C1FFAFFA314BEC",
        },
        "mac_check": {
            "flag": 0,
            "rand": "447034E1",
            "div": "0000555555555555",
            "apdu": "04D6860016",
            "data": "04000106000000000000",
            "mac": "11223344",
        },
    }
)


def code_of(function: str, args: dict) -> int:
    with pytest.raises(EsamError) as info:
        validate_arguments(function, args)
    return info.value.code


def test_table_has_the_twenty_functions_in_seed_order():
    assert list(FUNCTIONS) == list(VALID)
    assert len(FUNCTIONS) == 20


@pytest.mark.parametrize("function", list(VALID))
def test_valid_arguments_normalise_to_bytes_and_ints(function):
    result = validate_arguments(function, VALID[function])
    for arg in FUNCTIONS[function].arguments:
        value = result[arg.name]
        assert isinstance(value, int if arg.kind == "int" else bytes)
        if arg.kind == "hex":
            assert value == bytes.fromhex(VALID[function][arg.name])


def test_lowercase_hex_bytes_and_decimal_strings_are_accepted():
    args = dict(VALID["user_control"], flag="1", data="1a00140730104001")
    result = validate_arguments("user_control", args)
    assert result["flag"] == 1 and result["data"] == bytes.fromhex("1A00140730104001")
    rand = bytes.fromhex(VALID["user_control"]["rand"])
    args["rand"] = rand
    assert validate_arguments("user_control", args)["rand"] == rand


def test_open_device_reader_type_defaults_to_zero_and_only_zero():
    assert validate_arguments("open_device", {}) == {"reader_type": 0}
    assert code_of("open_device", {"reader_type": 1}) == 1501


# --- every argument of every function: missing, not hex / not int, wrong size ---

CASES = [
    (function, position, arg)
    for function, spec in FUNCTIONS.items()
    for position, arg in enumerate(spec.arguments, start=1)
]


@pytest.mark.parametrize(
    ("function", "position", "arg"), CASES, ids=lambda v: getattr(v, "name", str(v))
)
def test_each_argument_error_carries_its_position(function, position, arg):
    good = VALID[function]
    expected = 1500 + position
    if arg.default is None:
        missing = {k: v for k, v in good.items() if k != arg.name}
        assert code_of(function, missing) == expected
    if arg.kind == "int":
        for bad in ("x", True, None, 2.0, "-1", 99):
            assert code_of(function, dict(good, **{arg.name: bad})) == expected
        return
    for bad in ("zz", "123", 12, None, " " + good[arg.name][1:]):
        assert code_of(function, dict(good, **{arg.name: bad})) == expected, bad
    if arg.sizes:
        too_long = good[arg.name] + "00"
        if len(too_long) // 2 not in arg.sizes:
            assert code_of(function, dict(good, **{arg.name: too_long})) == expected
        assert code_of(function, dict(good, **{arg.name: ""})) == expected
    else:
        assert code_of(function, dict(good, **{arg.name: "00" * (arg.max_bytes + 1)})) == expected
        if arg.min_bytes > 0:
            short = "00" * (arg.min_bytes - 1)
            assert code_of(function, dict(good, **{arg.name: short})) == expected


def test_error_names_the_argument_and_is_a_protocol_error():
    with pytest.raises(EsamError) as info:
        validate_arguments("user_control", dict(VALID["user_control"], esam_no="00"))
    err = info.value
    assert isinstance(err, ProtocolError) and isinstance(err, ValueError)
    assert err.code == 1504 and err.argument == "esam_no" and err.reason == "argument"
    assert "esam_no" in err.message and err.is_argument_error


def test_unknown_function_and_argument():
    with pytest.raises(EsamError) as info:
        validate_arguments("format_card", {})
    assert info.value.code == -1 and info.value.is_argument_error
    with pytest.raises(EsamError) as info:
        validate_arguments("identity_authentication", {"flag": 0, "div": DIV, "key": "00"})
    assert info.value.code == 1500 and info.value.argument == "key"
    assert code_of("identity_authentication", ["flag"]) == 1500


# --- flag rules ---


@pytest.mark.parametrize(
    ("function", "refused"), [("increase_purse", 0), ("decrease_purse", 0), ("init_purse", 1)]
)
def test_purse_flag_rules(function, refused):
    assert code_of(function, dict(VALID[function], flag=refused)) == 1501


@pytest.mark.parametrize(
    "function", [f for f, s in FUNCTIONS.items() if s.arguments and s.arguments[0].name == "flag"]
)
def test_flag_must_be_0_or_1(function):
    assert code_of(function, dict(VALID[function], flag=2)) == 1501


# --- class-2 parameters: Lc and P1 ---


def test_class2_lc_rule():
    # (len + 3) rounded up to 16, + 4
    assert [class2_lc(n) for n in (5, 8, 13, 14, 29, 30)] == [20, 20, 20, 36, 36, 52]


def test_class2_p1_rule_follows_the_seed_list():
    # seed §8: DI2 mod 5 = 0..4 -> P1 88, 89, 90, 91, 92 (as written in the APDU)
    assert [class2_p1(di2) for di2 in range(10)] == [0x88, 0x89, 0x90, 0x91, 0x92] * 2
    assert class2_p1(0x10) == 0x89  # 16 mod 5 = 1


@pytest.mark.parametrize(
    ("data", "apdu"),
    [
        ("0400100400230000", "04D6880014"),  # seed example: DI2 00 -> 88, 8 bytes -> Lc 14
        ("04011004" + "00" * 10, "04D6890024"),  # DI2 01 -> 89, 14 bytes -> Lc 24
        ("04021004AA", "04D6900014"),  # DI2 02 -> 90
        ("04031004AA", "04D6910014"),
        ("04041004AA", "04D6920014"),
        ("04051004AA", "04D6880014"),  # DI2 05 -> 88 again
    ],
)
def test_class2_apdu_accepted(data, apdu):
    args = dict(VALID["parameter_else_update"], data=data, apdu=apdu)
    assert validate_arguments("parameter_else_update", args)["apdu"] == bytes.fromhex(apdu)


@pytest.mark.parametrize(
    "apdu",
    ["04D6890014", "04D68A0014", "04D6880018", "04D6880010", "84D6880014", "04B0880014"],
)
def test_class2_apdu_refused_with_1504(apdu):
    assert code_of("parameter_else_update", dict(VALID["parameter_else_update"], apdu=apdu)) == 1504


@pytest.mark.parametrize("function", ["parameter_update", "price1_update", "price2_update"])
def test_class1_lc_counts_the_mac(function):
    good = VALID[function]
    lc = len(good["data"]) // 2 + 4
    assert validate_arguments(function, good)["apdu"][4] == lc
    bad = good["apdu"][:8] + f"{lc - 4:02X}"
    assert code_of(function, dict(good, apdu=bad)) == 1504


def test_mac_check_apdu_rules():
    good = VALID["mac_check"]  # 10 data bytes -> Lc 10 + 4 + 8 = 0x16
    assert code_of("mac_check", dict(good, apdu="04D6860015")) == 1504
    assert code_of("mac_check", dict(good, apdu="04D6810016")) == 1504
    assert validate_arguments("mac_check", dict(good, apdu="04D6862A16"))["apdu"][3] == 0x2A


# --- key update ids ---


@pytest.mark.parametrize(
    ("key_sum", "key_id", "code"),
    [
        (17, "00010203", None),
        (17, "0D0E0F10", None),
        (17, "10", None),
        (17, "0001020304", 1503),  # more than 4 keys
        (17, "0100", 1503),  # not ascending
        (17, "0101", 1503),  # repeated
        (17, "11", 1503),  # id above 10
        (4, "0004", 1503),  # id not below key_sum
        (18, "00", 1501),  # key_sum above 17
        (0, "00", 1501),
    ],
)
def test_key_update_rules(key_sum, key_id, code):
    args = dict(VALID["key_update_v2"], key_sum=key_sum, key_id=key_id)
    if code is None:
        assert validate_arguments("key_update_v2", args)["key_id"] == bytes.fromhex(key_id)
    else:
        assert code_of("key_update_v2", args) == code


def test_key_state_and_compare_index_values():
    assert code_of("key_update_v2", dict(VALID["key_update_v2"], key_state="02")) == 1502
    for index in ("04", "0B", "FF"):
        assert code_of("enc_for_compare", dict(VALID["enc_for_compare"], key_index=index)) == 1501
    for index in ("05", "0A"):
        assert validate_arguments(
            "enc_for_compare", dict(VALID["enc_for_compare"], key_index=index)
        )


def test_data_clear_takes_8_or_12_bytes():
    good = VALID["data_clear1"]
    assert validate_arguments("data_clear1", dict(good, data="1B" + "00" * 11))
    assert code_of("data_clear1", dict(good, data="1B" + "00" * 9)) == 1504


def test_file_writes_take_at_most_0x95_bytes():
    good = VALID["mac_write"]
    assert validate_arguments("mac_write", dict(good, data="AA" * 0x95))
    assert code_of("mac_write", dict(good, data="AA" * 0x96)) == 1507


# --- outputs and event context ---


@pytest.mark.parametrize(
    ("function", "sizes"),
    [
        ("identity_authentication", {"rand": 8, "endata": 8}),
        ("user_control", {"endata": 20}),
        ("parameter_update", {"data": 8}),
        ("price1_update", {"data": 132}),
        ("parameter_else_update", {"endata": 20}),
        ("increase_purse", {"data": 22}),
        ("init_purse", {"data": 16}),
        ("key_update_v2", {"data": 4 * 36 + 4}),
        ("data_clear1", {"data": 20}),
        ("infrared_rand", {"rand1": 8}),
        ("infrared_auth", {"rand2_endata": 8}),
        ("mac_check", {"valid": None}),
        ("mac_write", {"data": 8}),
        ("enc_mac_write", {"data": 48 + 4}),  # 35 data bytes padded to 48, and the MAC
        ("enc_for_compare", {"data": 64}),
        ("decrease_purse", {"endata": 20}),
        ("switch_charge_mode", {"data": 17}),
        ("open_device", {}),
    ],
)
def test_output_sizes(function, sizes):
    assert output_sizes(function, validate_arguments(function, VALID[function])) == sizes


def test_meter_number_from_div():
    assert meter_number_from_div("0000123456789012") == "123456789012"
    assert meter_number_from_div(bytes.fromhex("0000000000000001")) == "000000000001"
    assert meter_number_from_div("1100123456789012") is None
    assert meter_number_from_div("00001234") is None
    assert meter_number_from_div("zz") is None
    assert meter_number_from_div(None) is None


def test_call_context_is_lenient():
    assert call_context("user_control", VALID["user_control"]) == {
        "function": "user_control",
        "flag": 0,
        "meter": "000000000001",
    }
    assert call_context("user_control", {"flag": "7", "div": 3}) == {
        "function": "user_control",
        "flag": None,
        "meter": None,
    }
    assert call_context("enc_for_compare", VALID["enc_for_compare"])["meter"] is None
    assert call_context("x", None) == {"function": "x", "flag": None, "meter": None}


# --- fuzzing: the validators raise only EsamError ---

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.text(alphabet="0123456789abcdefABCDEF", max_size=600),
    st.binary(max_size=300),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@given(st.sampled_from(list(FUNCTIONS)), st.dictionaries(st.text(max_size=12), values, max_size=8))
def test_fuzz_random_arguments(function, args):
    try:
        result = validate_arguments(function, args)
    except EsamError as err:
        assert err.code == 1500 or 1501 <= err.code <= 1508
        return
    assert set(result) == {arg.name for arg in FUNCTIONS[function].arguments}


@given(st.sampled_from(list(FUNCTIONS)), st.data())
def test_fuzz_one_argument_of_a_valid_call(function, data):
    spec = FUNCTIONS[function]
    if not spec.arguments:
        return
    args = dict(VALID[function])
    position = data.draw(st.integers(min_value=1, max_value=len(spec.arguments)))
    name = spec.arguments[position - 1].name
    args[name] = data.draw(values)
    try:
        validate_arguments(function, args)
    except EsamError as err:
        # the changed argument, or a rule that involves it (flag, Lc/P1 on apdu, key ids)
        assert 1501 <= err.code <= 1508, err
    call_context(function, args)


@given(st.one_of(st.text(max_size=20), st.none(), st.integers()), values)
def test_fuzz_function_names(function, args):
    with contextlib.suppress(EsamError):
        validate_arguments(function, args)
