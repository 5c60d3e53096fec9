"""The heating messages' numbers, limits and their decoded forms (what commands answer).

Shared by the plugin (``plugins.heating.plugin``: the message flow) and its commands
(``plugins.heating.commands``): msg ids, payload limits, which reports are keyed, and the
JSON forms of a status, periods and a transparent frame.
"""

from __future__ import annotations

from datetime import UTC, datetime
from hashlib import blake2b
from typing import Any, Literal

from gatewayd.protocols import cjt188, hygw
from gatewayd.protocols.errors import Cjt188Error

MSG_STATUS, MSG_PERIODS, MSG_SET_PERIODS, MSG_READ_NOW = 1, 2, 12, 18
MSG_METER_REPORT, MSG_REBOOT, MSG_TRANSPARENT, MSG_LAST_WILL = 20, 30, 40, 70
#: Payloads longer than this are not decoded (frame.invalid, reason ``length``).
MAX_PAYLOAD = 64 * 1024
#: Characters of an undecodable payload kept in the frame.invalid event's ``raw``.
MAX_RAW = 4096
#: Messages whose events get idempotency keys when they can be delivered again: readings, which
#: a repeat within ``dedupe_window`` would only duplicate. Status (msg 1, also a heartbeat),
#: periods (2), command replies (12, 18, 30, 40) and the last will (70) are not keyed: see the
#: README, "Redelivered reports".
KEYED_MSG_IDS = frozenset({MSG_METER_REPORT})


def message_identity(gw_id: str, payload: bytes) -> str:
    """``<gw_id>:<24 hex>``: the gateway and a 96-bit BLAKE2b of the payload's bytes, the same
    for every delivery of one MQTT message (its events' keys append ``:<index>``)."""
    return f"{gw_id}:{blake2b(payload, digest_size=12).hexdigest()}"


def iso(posix: float | None) -> str | None:
    if posix is None:
        return None
    return datetime.fromtimestamp(posix, UTC).isoformat(timespec="seconds")


def status_data(message: hygw.Message) -> dict[str, Any]:
    """``gateway.status`` data from a msg 1: the firmware's keys under stable names."""
    fields, values = message.fields, message.values
    has_rst = fields.get("has_rst")
    data: dict[str, Any] = {
        "csq": None,
        "rssi": fields.get("RSSI"),
        "sinr": fields.get("SINR"),
        "iccid": fields.get("CCID"),
        "version": fields.get("GW_Ver"),
        "mbus_mv": fields.get("MBUS_mV"),
        "mbus_ma": fields.get("MBUS_mA"),
        "model": fields.get("GW_model"),
        "main_meter_total": fields.get("main_meter_total"),
        "copy_meter_total": fields.get("copy_meter_total"),
        "has_reset": bool(has_rst) if isinstance(has_rst, int) else has_rst,
    }
    if "CSQ" in fields:
        csq = values.get("CSQ") or {}
        data["csq"] = {"raw": fields["CSQ"], "rssi": csq.get("rssi"), "ber": csq.get("ber")}
    if message.stat is not None:
        data["stat"] = message.stat.to_dict()
    if message.quirks:
        data["quirks"] = list(message.quirks)
    return data


def periods_data(message: hygw.Message) -> dict[str, Any]:
    """``gateway.periods`` data from a msg 2 (heating dates as ``MM-DD``)."""
    fields, values = message.fields, message.values
    data = {
        "not_intimer_interval": fields.get("not_intimer_interval"),
        "heating_start": values.get("heating_start"),
        "heating_end": values.get("heating_end"),
        "main_interval": fields.get("main_interval"),
        "copy_interval": fields.get("copy_interval"),
        "copy_statistics": fields.get("copy_statistics"),
    }
    if message.stat is not None:
        data["stat"] = message.stat.to_dict()
    return data


def stat_only(message: hygw.Message) -> dict[str, Any]:
    stat = message.stat
    return {"stat": None if stat is None else stat.to_dict()}


def decode_hygw_for_cli(
    text: str, bcd_decimals: Literal[0, 2] = cjt188.BCD_DECIMALS_VENDOR
) -> dict[str, Any]:
    """``gatewayd decode hygw``: the message, and each frame of its ``meter_data`` decoded as
    the plugin would (``bcd_decimals`` as in its config; an undecodable one says why)."""
    result = hygw.decode_for_cli(text)
    frames = []
    for hex_frame in result["values"].get("meter_data") or []:
        try:
            frames.append(cjt188.decode_for_cli(hex_frame, bcd_decimals))
        except Cjt188Error as exc:
            frames.append({"hex": hex_frame, "error": exc.reason, "message": exc.message})
    if frames:
        result["meter_frames"] = frames
    return result


def frame_summary(hex_frame: str, bcd_decimals: int) -> dict[str, Any]:
    """One frame of a transparent reply for a command result: header and decoded payload."""
    try:
        frame = cjt188.parse_hex(hex_frame)
    except Cjt188Error as exc:
        return {"hex": hex_frame, "error": {"reason": exc.reason, "message": exc.message}}
    return {
        "hex": hex_frame,
        "frame": frame.to_dict(),
        "payload": cjt188.decode_payload(frame, bcd_decimals),
    }
