"""Valid arguments of the ESAM functions, shared by the protocol, soft-backend and plugin tests.

Seed examples where legible (OCR slips repaired). ``CALLS`` holds the 16 functions that compute
something from their arguments alone; the soft backend's golden outputs are computed from exactly
these values. ``open_device`` and ``close_device`` take nothing; ``infrared_auth`` and
``mac_check`` need values from a meter's session (``tests/esam/helpers.calls`` takes them from a
soft meter, the protocol tests use fixed ones).
"""

from __future__ import annotations

METER_NO = "000000000001"
DIV = "0000" + METER_NO
ESAM_NO = "0001111100000032"

CALLS: dict[str, dict] = {
    "identity_authentication": {"flag": 0, "div": DIV},
    "user_control": {
        "flag": 0,
        "rand": "271789B1",
        "div": DIV,
        "esam_no": ESAM_NO,
        "data": "1A00140730104001",
    },
    "parameter_update": {
        "flag": 0,
        "rand": "B4C8C420",
        "div": DIV,
        "apdu": "04D6811008",
        "data": "00002209",
    },
    "price1_update": {
        "flag": 0,
        "rand": "B4C8C420",
        "div": DIV,
        "apdu": "04D6830484",
        "data": "00001234" * 32,
    },
    "price2_update": {
        "flag": 1,
        "rand": "B4C8C420",
        "div": DIV,
        "apdu": "04D6840484",
        "data": "00005678" * 32,
    },
    "parameter_else_update": {
        "flag": 0,
        "rand": "B4C8C420",
        "div": DIV,
        "apdu": "04D6880014",
        "data": "0400100400230000",
    },
    "increase_purse": {
        "flag": 1,
        "rand": "B4C8C420",
        "div": DIV,
        "data": "000000C800000002112233445566",
    },
    "init_purse": {"flag": 0, "rand": "B4C8C420", "div": DIV, "data": "000000C8"},
    "key_update_v2": {
        "key_sum": 17,
        "key_state": "01",
        "key_id": "0001020A",
        "rand": "B6382720",
        "div": DIV,
        "esam_no": ESAM_NO,
    },
    "data_clear1": {
        "flag": 0,
        "rand": "B4C8C420",
        "div": DIV,
        "data": "1B00140903111011AABBCCDD",
    },
    "infrared_rand": {},
    "mac_write": {
        "flag": 0,
        "rand": "690AF9B6",
        "div": DIV,
        "esam_no": ESAM_NO,
        "file_id": "18",
        "data_begin": "0010",
        "data": "11223344",
    },
    "enc_mac_write": {
        "flag": 0,
        "rand": "F5A307BE",
        "div": DIV,
        "esam_no": ESAM_NO,
        "file_id": "15",
        "data_begin": "0000",
        "data": "1122334455" * 7,
    },
    "enc_for_compare": {"key_index": "06", "div": "0102030405060708", "data": "5A" * 64},
    "decrease_purse": {"flag": 1, "rand": "B4C8C420", "div": DIV, "data": "000000C8"},
    "switch_charge_mode": {
        "flag": 1,
        "rand": "B4C8C420",
        "div": DIV,
        "data": "020000005000000001",
    },
}


def in_function_order(calls: dict[str, dict]) -> dict[str, dict]:
    """``calls`` ordered as the seed lists the functions (``FUNCTIONS``)."""
    from gatewayd.protocols.esam import FUNCTIONS

    return {name: calls[name] for name in FUNCTIONS if name in calls}
