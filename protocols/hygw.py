"""The "hy/gw" heating-gateway MQTT envelope: tolerant decoder, exact encoder, message builders.

Pure codec, no I/O. Every message is ``{"gw":{"msg_id":N,"msg_gw_pr":0,"gw_id":"…"},"data":{…}}``
on ``hy/gw/get/<gw_id>`` (server -> gateway) or ``hy/gw/set/<gw_id>`` (gateway -> server).

Decoding accepts what the gateway and its documentation really emit (each repair is listed in
``Message.quirks``): ``"CSQ":99,99`` unquoted, ``"meter_data":{"…"}`` in braces, trailing commas,
NUL bytes, ``20XX`` years, a trailing ``/`` on the topic (last will). Failures raise
``HygwError`` with ``reason`` ``encoding``, ``json``, ``envelope``, ``msg_id``, ``gw_id``,
``data`` or ``topic``.

Encoding writes what the firmware's ``strstr`` parser needs: no whitespace, ``msg_id`` before
``gw_id``, the key orders of reference §1.2, plain ASCII strings without ``"`` (reason ``value``
or ``argument`` otherwise). This module does not import the CJ/T 188 codec: frames go in and out
as hex strings or bytes.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from .errors import HygwError

__all__ = [
    "BROADCAST_GW_ID",
    "DEFAULT_PREFIX",
    "KEY_ORDERS",
    "MESSAGE_KINDS",
    "METER_PROTOCOL_TYPES",
    "HygwError",
    "Message",
    "MeterId",
    "RawJson",
    "StatResult",
    "build_last_will",
    "build_meter_report",
    "build_periods_report",
    "build_periods_request",
    "build_read_now",
    "build_reboot",
    "build_set_periods",
    "build_stat_reply",
    "build_status_report",
    "build_status_request",
    "build_transparent",
    "build_transparent_reply",
    "decode_for_cli",
    "decode_message",
    "encode_message",
    "parse_meter_id",
    "stat_result",
    "subscribe_topic",
    "topic",
    "topic_gw_id",
    "will_topic",
]

DEFAULT_PREFIX = "hy/gw"
BROADCAST_GW_ID = "FFFFFFFFFFF"
GW_ID_LENGTH = 11
DIRECTIONS = ("get", "set")  # get: server -> gateway, set: gateway -> server

MSG_STATUS = 1
MSG_PERIODS = 2
MSG_SET_PERIODS = 12
MSG_READ_NOW = 18
MSG_METER_REPORT = 20
MSG_REBOOT = 30
MSG_TRANSPARENT = 40
MSG_LAST_WILL = 70

STAT_OK = 2
STAT_FAILED = 1

MESSAGE_KINDS: dict[int, str] = {
    1: "status",
    2: "periods",
    3: "main_meter_ids",
    4: "copy_meter_ids",
    5: "mqtt_params",
    12: "set_periods",
    13: "set_main_meters",
    14: "set_copy_meters",
    15: "set_server",
    16: "set_gw_id",
    17: "set_time",
    18: "read_now",
    20: "meter_report",
    30: "reboot",
    40: "transparent",
    45: "copy_statistics",
    50: "power_on",
    60: "firmware_upgrade",
    70: "last_will",
    80: "reserved",
}
"""msg_id -> kind name (reference §1.3)."""

KEY_ORDERS: dict[int, tuple[str, ...]] = {
    12: ("main_interval", "copy_interval", "heating_start", "heating_end"),
    15: ("username", "password", "url", "port"),
    40: ("transparent_port", "transparent", "transparent_count"),
}
"""Data keys the firmware reads in this order (reference §1.2); other keys follow as given."""

METER_PROTOCOL_TYPES: dict[str, int] = {"2034": 0x55, "2008": 0x53}
"""Meter-protocol code in ``meter_id`` -> CJ/T 188 meter type T of its frames."""


# --- stat codes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatResult:
    """The meaning of a ``stat`` value for one msg_id: ``ok`` and a short ``name``."""

    code: int
    ok: bool
    name: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"code": self.code, "ok": self.ok, "name": self.name}


_GENERIC_STATS: dict[int, tuple[bool, str]] = {
    STAT_OK: (True, "ok"),
    STAT_FAILED: (False, "failed"),
}
_STATS: dict[int, dict[int, tuple[bool, str]]] = {
    3: {32: (True, "ok"), 31: (True, "empty")},
    4: {42: (True, "ok"), 41: (True, "empty")},
    13: {132: (True, "ok"), 131: (False, "failed")},
    14: {142: (True, "ok"), 141: (False, "failed")},
    40: {401: (False, "bad_request")},  # no "transparent" or a bad port
    60: {602: (True, "chunk_ok"), 603: (True, "done_rebooting"), 601: (False, "resend")},
    70: {0: (False, "offline")},
}


def stat_result(msg_id: int, stat: int) -> StatResult:
    """What ``stat`` means in a reply to ``msg_id`` (reference §1.3; 1/2 are generic fail/ok)."""
    specific = _STATS.get(msg_id, {})
    if stat in specific:
        ok, name = specific[stat]
    elif stat in _GENERIC_STATS:
        ok, name = _GENERIC_STATS[stat]
    else:
        ok, name = False, "unknown"
    return StatResult(stat, ok, name)


# --- topics --------------------------------------------------------------------------------------


def topic(direction: str, gw_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``hy/gw/get/<gw_id>`` (server -> gateway) or ``hy/gw/set/<gw_id>`` (gateway -> server)."""
    if direction not in DIRECTIONS:
        raise HygwError("argument", f"direction must be get or set, not {direction!r}")
    _check_gw_id_for_topic(gw_id)
    return f"{prefix}/{direction}/{gw_id}"


def will_topic(gw_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The gateway's last-will topic: ``hy/gw/set/<gw_id>/`` with its trailing slash."""
    return topic("set", gw_id, prefix) + "/"


def subscribe_topic(prefix: str = DEFAULT_PREFIX) -> str:
    """What the server subscribes to: every gateway's publications, the last will included."""
    return f"{prefix}/set/#"


def _check_gw_id_for_topic(gw_id: str) -> None:
    if not isinstance(gw_id, str) or not gw_id or any(c in gw_id for c in "/+#\x00"):
        raise HygwError("gw_id", f"{gw_id!r} cannot be used in a topic")


@functools.lru_cache(maxsize=4096)  # one entry per gateway topic; errors are not cached
def topic_gw_id(topic_name: str, prefix: str = DEFAULT_PREFIX) -> tuple[str, str]:
    """``(direction, gw_id)`` of ``<prefix>/<get|set>/<gw_id>``; trailing slashes are ignored."""
    stripped = topic_name.rstrip("/")
    head = prefix.rstrip("/") + "/"
    if not stripped.startswith(head):
        raise HygwError("topic", f"{topic_name!r} is not under {prefix!r}")
    parts = stripped[len(head) :].split("/")
    if len(parts) != 2 or parts[0] not in DIRECTIONS or not parts[1]:
        raise HygwError("topic", f"expected {head}<get|set>/<gw_id>, got {topic_name!r}")
    if any(c in parts[1] for c in "+#"):
        raise HygwError("topic", f"wildcard in gw_id of {topic_name!r}")
    return parts[0], parts[1]


# --- meter ids -----------------------------------------------------------------------------------

_METER_ID_RE = re.compile(r"[0-9A-Fa-f]{14}")


@dataclass(frozen=True)
class MeterId:
    """A 14-hex ``meter_id``: meter number (8), meter-protocol code (4), port (2) (§1.3)."""

    number: str
    protocol: str
    port: int

    def __str__(self) -> str:
        return f"{self.number}{self.protocol}{self.port:02X}"

    @property
    def meter_type(self) -> int | None:
        """CJ/T 188 T of this meter's frames (55H for "2034", 53H for "2008"), None if unknown."""
        return METER_PROTOCOL_TYPES.get(self.protocol)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "meter_id": str(self),
            "number": self.number,
            "protocol": self.protocol,
            "port": self.port,
            "meter_type": None if self.meter_type is None else f"{self.meter_type:02X}",
        }


def parse_meter_id(text: str) -> MeterId:
    """Split ``27100583203400`` into number 27100583, protocol 2034, port 0; reason ``value``."""
    if not isinstance(text, str) or not _METER_ID_RE.fullmatch(text):
        raise HygwError("value", f"meter_id must be 14 hex digits, got {text!r}")
    upper = text.upper()
    return MeterId(upper[:8], upper[8:12], int(upper[12:], 16))


@functools.lru_cache(maxsize=65536)  # one entry per meter: reports repeat the same ids
def _meter_id_dict(text: str) -> dict[str, Any]:
    """``parse_meter_id(text).to_dict()``, cached: callers copy it before handing it out."""
    return parse_meter_id(text).to_dict()


# --- decoding ------------------------------------------------------------------------------------

_STRING = r'"(?:[^"\\]|\\.)*"'
_CSQ_RE = re.compile(r'"CSQ"\s*:\s*(-?\d+)\s*,\s*(-?\d+)(?=\s*[,}\]])|' + _STRING)
_BRACED_METER_DATA_RE = re.compile(
    r'"meter_data"\s*:\s*\{(\s*"[^"\\]*"\s*(?:,\s*"[^"\\]*"\s*)*,?\s*)\}|' + _STRING
)
_TRAILING_COMMA_RE = re.compile(r",(\s*[\]}])|" + _STRING)
_DATE_RE = re.compile(r"(?:\d{4}|\d\dXX)-(\d{2})-(\d{2})", re.IGNORECASE)
_HEX_RE = re.compile(r"[0-9A-Fa-f]{8,}")
_GW_ID_RE = re.compile(r"[0-9A-Za-z]+")


class Message(NamedTuple):
    """One decoded hy/gw message (immutable; made for every message, hence a NamedTuple).

    ``fields`` is the ``data`` object as sent (after the tolerant repairs); ``values`` is the same
    with known keys normalised: ``stat`` -> StatResult dict, ``CSQ`` -> ``{"rssi", "ber"}`` (99 ->
    None), ``heating_start``/``heating_end`` -> ``"MM-DD"``, ``meter_data`` -> list of upper-case
    hex frames, ``meter_id`` -> MeterId dict (None if malformed).
    """

    msg_id: int
    gw_id: str
    fields: dict[str, Any]
    values: dict[str, Any]
    quirks: tuple[str, ...] = ()
    msg_gw_pr: Any = 0
    direction: str | None = None
    topic: str | None = None
    raw: str = ""

    @property
    def kind(self) -> str:
        """The msg_id's name (``status``, ``meter_report``…), ``unknown`` if not in the table."""
        return MESSAGE_KINDS.get(self.msg_id, "unknown")

    @property
    def stat(self) -> StatResult | None:
        """The reply status, if the message carries an integer ``stat``."""
        stat = self.fields.get("stat")
        if isinstance(stat, int) and not isinstance(stat, bool):
            return stat_result(self.msg_id, stat)
        return None

    @property
    def frames(self) -> list[str]:
        """The meter frames (hex) of a msg 20 / msg 40 reply; empty for other messages."""
        return list(self.values.get("meter_data") or [])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the CLI and for events."""
        return {
            "topic": self.topic,
            "direction": self.direction,
            "msg_id": self.msg_id,
            "kind": self.kind,
            "gw_id": self.gw_id,
            "msg_gw_pr": self.msg_gw_pr,
            "fields": self.fields,
            "values": self.values,
            "quirks": list(self.quirks),
        }


def _sub_outside_strings(pattern: re.Pattern[str], text: str, replace: Any) -> tuple[str, int]:
    """Apply ``replace`` to matches of the first alternative; string literals stay as they are."""
    count = 0

    def substitute(match: re.Match[str]) -> str:
        nonlocal count
        if match.group(1) is None:
            return match.group(0)
        count += 1
        return replace(match)

    return pattern.sub(substitute, text), count


def _repair(text: str) -> tuple[str, list[str]]:
    """Rewrite the known firmware/documentation deviations into JSON; list what was repaired."""
    quirks: list[str] = []
    if "\x00" in text:
        text = text.replace("\x00", "")
        quirks.append("nul_bytes")
    if text.startswith("\ufeff"):
        text = text[1:]
        quirks.append("byte_order_mark")
    text = text.strip()
    text, n = _sub_outside_strings(_CSQ_RE, text, lambda m: f'"CSQ":"{m.group(1)},{m.group(2)}"')
    if n:
        quirks.append("csq_unquoted")
    text, n = _sub_outside_strings(
        _BRACED_METER_DATA_RE, text, lambda m: f'"meter_data":[{m.group(1)}]'
    )
    if n:
        quirks.append("meter_data_braces")
    text, n = _sub_outside_strings(_TRAILING_COMMA_RE, text, lambda m: m.group(1))
    if n:
        quirks.append("trailing_comma")
    closers = _missing_closers(text)
    if closers:
        text += closers
        quirks.append("unclosed_braces")
    return text, quirks


def _missing_closers(text: str) -> str:
    """The ``}``/``]`` a text lacks at its end (seed §8.2.3 drops the last ``}``); "" if none
    or if the nesting is broken otherwise (then json.loads reports it)."""
    pairs = {"{": "}", "[": "]"}
    stack: list[str] = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in pairs:
            stack.append(pairs[char])
        elif char in "}]" and (not stack or stack.pop() != char):
            return ""
    if in_string or len(stack) > 2:
        return ""
    return "".join(reversed(stack))


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge ints, deep nesting
        raise HygwError("json", str(exc)[:200]) from None


def _csq(value: Any) -> dict[str, int | None] | None:
    """``"rssi,ber"`` from AT+CSQ; 99 means unknown."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        parts: list[str] = [str(value)]
    elif isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
    else:
        return None
    numbers: list[int | None] = []
    for part in parts[:2]:
        if not re.fullmatch(r"-?\d{1,6}", part):
            return None
        number = int(part)
        numbers.append(None if number == 99 else number)
    numbers += [None] * (2 - len(numbers))
    return {"rssi": numbers[0], "ber": numbers[1]}


def _month_day(value: Any) -> str | None:
    """``"20XX-09-01"`` or ``"2024-09-01"`` -> ``"09-01"``: only month and day are meaningful."""
    if not isinstance(value, str):
        return None
    match = _DATE_RE.fullmatch(value.strip())
    return f"{match.group(1)}-{match.group(2)}" if match else None


def _meter_frames(value: Any) -> list[str]:
    """The frames under ``meter_data``, hex upper-cased, anything else as it came.

    Every entry of the list (or the bare string) is a frame: one that is not hex stays in the
    list so that the frame codec rejects it with its reason (``format``, ``truncated``...)
    rather than it vanishing. Inside nested oddities (a dict, a list in the list) only the hex
    strings are frames, as the reference advises; the rest may be labels.
    """
    if isinstance(value, str):
        value = [value]
    elif type(value) is not list:
        return _hex_strings(value)
    frames: list[str] = []
    for item in value:
        if type(item) is str:
            if _HEX_RE.fullmatch(item):  # the usual case
                frames.append(item.upper())
            else:  # hex with spaces or a newline is compacted; anything else kept as it came
                compact = re.sub(r"\s+", "", item)
                frames.append(compact.upper() if _HEX_RE.fullmatch(compact) else item)
        elif isinstance(item, (list, dict)):
            frames.extend(_hex_strings(item))
        else:  # a number, true, null: not a frame, but say what it was
            frames.append(json.dumps(item))
    return frames


def _hex_strings(value: Any, depth: int = 0) -> list[str]:
    """The hex strings (whitespace allowed) in a nested value, upper-cased and compacted."""
    if depth > 4:
        return []
    if isinstance(value, str):
        compact = re.sub(r"\s+", "", value)
        return [compact.upper()] if _HEX_RE.fullmatch(compact) else []
    if isinstance(value, list):
        return [frame for item in value for frame in _hex_strings(item, depth + 1)]
    if isinstance(value, dict):
        return [
            frame
            for key, item in value.items()
            for frame in _hex_strings(key, depth + 1) + _hex_strings(item, depth + 1)
        ]
    return []


def _normalise(msg_id: int, fields: dict[str, Any], quirks: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = dict(fields)
    stat = fields.get("stat")
    if isinstance(stat, int) and not isinstance(stat, bool):
        values["stat"] = stat_result(msg_id, stat).to_dict()
    if "CSQ" in fields:
        values["CSQ"] = _csq(fields["CSQ"])
    for key in ("heating_start", "heating_end"):
        if key in fields:
            raw = fields[key]
            if isinstance(raw, str) and "XX" in raw.upper() and "year_placeholder" not in quirks:
                quirks.append("year_placeholder")
            values[key] = _month_day(raw)
    if "meter_data" in fields:
        values["meter_data"] = _meter_frames(fields["meter_data"])
    if "meter_id" in fields:
        raw_id = fields["meter_id"]
        try:
            if type(raw_id) is str:
                values["meter_id"] = dict(_meter_id_dict(raw_id))
            else:
                values["meter_id"] = parse_meter_id(raw_id).to_dict()
        except HygwError:
            values["meter_id"] = None
            quirks.append("meter_id_format")
    return values


def _msg_id(gw: Mapping[str, Any], quirks: list[str]) -> int:
    value = gw.get("msg_id")
    if isinstance(value, str) and re.fullmatch(r"\s*\d{1,5}\s*", value):
        quirks.append("msg_id_string")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise HygwError("msg_id", f"expected an integer 0..65535, got {value!r}")
    return value


def _gw_id(gw: Mapping[str, Any], quirks: list[str]) -> str:
    value = gw.get("gw_id")
    if not isinstance(value, str) or not _GW_ID_RE.fullmatch(value):
        raise HygwError("gw_id", f"expected a string of letters and digits, got {value!r}")
    if len(value) != GW_ID_LENGTH:
        quirks.append("gw_id_length")
    return value


def _fast_json(payload: Any) -> tuple[Any, str]:
    """The usual case, valid JSON, parsed by orjson: ``(document, text)``, or ``(None, "")``
    when orjson refuses it or when its result could differ from the standard library's (orjson
    reads integers beyond 64 bits as floats; any float sends the message the exact way)."""
    if type(payload) is not bytes and type(payload) is not str:
        return None, ""
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, ""
    if _has_float(document):
        return None, ""
    # orjson accepted it, so it is valid UTF-8.
    return document, payload if type(payload) is str else payload.decode()


def _has_float(document: Any) -> bool:
    stack = [document]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is float:
            return True
        if kind is dict:
            stack.extend(node.values())
        elif kind is list:
            stack.extend(node)
    return False


def _tolerant_json(payload: Any) -> tuple[Any, str, list[str]]:
    """``(document, text, quirks)`` with the standard library, repairing the known quirks."""
    if isinstance(payload, bytes | bytearray | memoryview):
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HygwError("encoding", f"not UTF-8 ({exc.reason})") from None
    elif isinstance(payload, str):
        text = payload
    else:
        raise HygwError("argument", f"payload must be bytes or str, not {payload!r}")
    try:
        # Valid JSON. None of the repairs can change valid JSON (each one rewrites a construct
        # JSON rejects), so they only run when this fails.
        return json.loads(text), text, []
    except (ValueError, RecursionError):
        repaired, quirks = _repair(text)
        return _load_json(repaired), text, quirks


def decode_message(
    payload: bytes | str, topic: str | None = None, prefix: str = DEFAULT_PREFIX
) -> Message:
    """Decode one hy/gw message, tolerating the known quirks; raise HygwError(reason) otherwise.

    With ``topic``, the direction is read from it (a trailing ``/`` is accepted and noted) and a
    gw_id differing from the envelope's is noted as quirk ``topic_gw_id_mismatch``.
    """
    document, text = _fast_json(payload)
    quirks: list[str] = []
    if document is None:
        document, text, quirks = _tolerant_json(payload)
    if not isinstance(document, dict) or not isinstance(document.get("gw"), dict):
        raise HygwError("envelope", 'expected {"gw":{...},"data":{...}}')
    gw = document["gw"]
    msg_id = _msg_id(gw, quirks)
    gw_id = _gw_id(gw, quirks)
    data = document.get("data")
    if data is None:
        data = {}
        quirks.append("data_missing")
    if not isinstance(data, dict):
        raise HygwError("data", f"expected an object, got {type(data).__name__}")
    direction: str | None = None
    if topic is not None:
        direction, topic_id = topic_gw_id(topic, prefix)
        if topic.endswith("/"):
            quirks.append("topic_trailing_slash")
        if topic_id != gw_id:
            quirks.append("topic_gw_id_mismatch")
    values = _normalise(msg_id, data, quirks)
    return Message(
        msg_id=msg_id,
        gw_id=gw_id,
        fields=data,
        values=values,
        quirks=tuple(quirks),
        msg_gw_pr=gw.get("msg_gw_pr"),
        direction=direction,
        topic=topic,
        raw=text,
    )


_LOG_PREFIX_RE = re.compile(r"^\s*(?:len\s*:\s*\d+\s*,)?\s*(?:Data\s*:)?\s*", re.IGNORECASE)


def decode_for_cli(text: str) -> dict[str, Any]:
    """``gatewayd decode hygw TEXT``: the JSON alone, or as the vendor tool logs it
    (``len:274,Data:hy/gw/set/02345678903{...}``), whose topic is then decoded too."""
    start = text.find("{")
    topic_name: str | None = None
    if start > 0:
        head = _LOG_PREFIX_RE.sub("", text[:start], count=1).strip()
        topic_name = head or None
        text = text[start:]
    return decode_message(text, topic=topic_name).to_dict()


# --- encoding ------------------------------------------------------------------------------------


class RawJson(str):
    """A value written verbatim into the JSON (only to reproduce firmware quirks in simulators)."""

    __slots__ = ()


_SAFE_STRING_RE = re.compile(r"[\x20-\x21\x23-\x5B\x5D-\x7E]*")  # printable ASCII but " and \


def _encode_value(value: Any, path: str) -> str:
    if isinstance(value, RawJson):
        return str(value)
    if isinstance(value, bool) or value is None or isinstance(value, float):
        raise HygwError("value", f"{path} must be an integer, string or list, not {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if not _SAFE_STRING_RE.fullmatch(value):
            raise HygwError("value", f'{path} must be printable ASCII without " or \\')
        return f'"{value}"'
    if isinstance(value, list | tuple):
        return "[" + ",".join(_encode_value(v, f"{path}[]") for v in value) + "]"
    if isinstance(value, Mapping):
        return _encode_object(value, path)
    raise HygwError("value", f"{path} has unsupported type {type(value).__name__}")


def _encode_object(obj: Mapping[str, Any], path: str) -> str:
    items = []
    for key, value in obj.items():
        if not isinstance(key, str) or not _SAFE_STRING_RE.fullmatch(key):
            raise HygwError("value", f"bad key {key!r} in {path}")
        items.append(f'"{key}":{_encode_value(value, f"{path}.{key}")}')
    return "{" + ",".join(items) + "}"


def _ordered(msg_id: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    order = KEY_ORDERS.get(msg_id, ())
    ordered = {key: fields[key] for key in order if key in fields}
    ordered.update((key, value) for key, value in fields.items() if key not in ordered)
    return ordered


def encode_message(msg_id: int, gw_id: str, **fields: Any) -> bytes:
    """The exact bytes the firmware expects: compact, ``msg_id`` before ``gw_id``, keys ordered.

    ``gw_id`` must be 11 letters/digits (the gateway drops any other length unless broadcast).
    """
    if isinstance(msg_id, bool) or not isinstance(msg_id, int) or not 0 <= msg_id <= 0xFFFF:
        raise HygwError("msg_id", f"expected an integer 0..65535, got {msg_id!r}")
    if not isinstance(gw_id, str) or len(gw_id) != GW_ID_LENGTH or not _GW_ID_RE.fullmatch(gw_id):
        raise HygwError("gw_id", f"expected 11 letters or digits, got {gw_id!r}")
    envelope = f'{{"gw":{{"msg_id":{msg_id},"msg_gw_pr":0,"gw_id":"{gw_id}"}},"data":'
    return (envelope + _encode_object(_ordered(msg_id, fields), "data") + "}").encode("ascii")


def _hex_frame(frame: bytes | str) -> str:
    """A frame for ``meter_data``/``transparent``: upper-case hex without separators."""
    if isinstance(frame, bytes | bytearray):
        return bytes(frame).hex().upper()
    if isinstance(frame, str):
        compact = re.sub(r"\s+", "", frame)
        if len(compact) % 2 == 0 and re.fullmatch(r"[0-9A-Fa-f]+", compact):
            return compact.upper()
    raise HygwError("argument", f"frame must be bytes or hex text, got {frame!r}")


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise HygwError("argument", f"{name} must be an integer {low}..{high}")
    return value


# server -> gateway


def build_status_request(gw_id: str) -> bytes:
    """msg 1: ask the gateway for its status (it answers with ``build_status_report``'s form)."""
    return encode_message(MSG_STATUS, gw_id)


def build_periods_request(gw_id: str) -> bytes:
    """msg 2: read the reporting periods."""
    return encode_message(MSG_PERIODS, gw_id)


def build_reboot(gw_id: str) -> bytes:
    """msg 30: reboot the gateway."""
    return encode_message(MSG_REBOOT, gw_id)


def _heating_date(name: str, value: str) -> str:
    """``MM-DD`` becomes ``20XX-MM-DD`` (the firmware's own form); full dates pass."""
    if isinstance(value, str):
        if re.fullmatch(r"\d{2}-\d{2}", value):
            return f"20XX-{value}"
        if _DATE_RE.fullmatch(value):
            return value
    raise HygwError("argument", f"{name} must be MM-DD or YYYY-MM-DD, got {value!r}")


def build_set_periods(
    gw_id: str, *, main_interval: int, copy_interval: int, heating_start: str, heating_end: str
) -> bytes:
    """msg 12: write the periods (minutes; heating dates ``MM-DD``), in the firmware's key order."""
    return encode_message(
        MSG_SET_PERIODS,
        gw_id,
        main_interval=_check_int("main_interval", main_interval, 1, 65535),
        copy_interval=_check_int("copy_interval", copy_interval, 1, 65535),
        heating_start=_heating_date("heating_start", heating_start),
        heating_end=_heating_date("heating_end", heating_end),
    )


def build_read_now(
    gw_id: str, *, main: bool = False, copy: bool = False, up: bool = False
) -> bytes:
    """msg 18: read the building valves (main), household valves (copy) now; 1 start, 0 stop."""
    return encode_message(
        MSG_READ_NOW,
        gw_id,
        main_immediately=int(bool(main)),
        copy_immediately=int(bool(copy)),
        up_immediately=int(bool(up)),
    )


def build_transparent(gw_id: str, frame: bytes | str, *, port: int = 0, count: int = 5) -> bytes:
    """msg 40: pass ``frame`` (with its FE preambles) to the meter bus ``port`` (0 = M-Bus)."""
    return encode_message(
        MSG_TRANSPARENT,
        gw_id,
        transparent_port=_check_int("port", port, 0, 5),
        transparent=_hex_frame(frame),
        transparent_count=_check_int("count", count, 1, 20),
    )


# gateway -> server (what the firmware sends; for simulators)


def build_stat_reply(msg_id: int, gw_id: str, stat: int = STAT_OK) -> bytes:
    """The gateway's bare answer ``{"stat":N}`` to msg 1/2/12/18/30/40 and the others."""
    return encode_message(msg_id, gw_id, stat=_check_int("stat", stat, 0, 65535))


def build_status_report(
    gw_id: str,
    *,
    stat: int = STAT_OK,
    csq: str = "99,99",
    rssi: int = -98,
    sinr: int = 13,
    ccid: str = "89860025102250386087",
    gw_ver: str = "V1.0",
    has_rst: int = 0,
    mbus_mv: int = 29392,
    mbus_ma: int = 3,
    gw_model: int = 136,
    main_meter_total: int = 0,
    copy_meter_total: int = 0,
    csq_quoted: bool = False,
) -> bytes:
    """msg 1 as the gateway sends it; ``csq_quoted=False`` reproduces the unquoted ``99,99``."""
    if not isinstance(csq, str) or not re.fullmatch(r"\d{1,2},\d{1,2}", csq):
        raise HygwError("argument", f"csq must be 'rssi,ber', got {csq!r}")
    return encode_message(
        MSG_STATUS,
        gw_id,
        stat=stat,
        CSQ=csq if csq_quoted else RawJson(csq),
        RSSI=rssi,
        SINR=sinr,
        CCID=ccid,
        GW_Ver=gw_ver,
        has_rst=has_rst,
        MBUS_mV=mbus_mv,
        MBUS_mA=mbus_ma,
        GW_model=gw_model,
        main_meter_total=main_meter_total,
        copy_meter_total=copy_meter_total,
    )


def build_periods_report(
    gw_id: str,
    *,
    stat: int = STAT_OK,
    not_intimer_interval: int = 1440,
    heating_start: str = "20XX-09-01",
    heating_end: str = "20XX-05-01",
    main_interval: int = 10,
    copy_interval: int = 60,
    copy_statistics: int = 1,
) -> bytes:
    """msg 2 as the gateway answers it (keys in the order the seed shows)."""
    return encode_message(
        MSG_PERIODS,
        gw_id,
        stat=stat,
        not_intimer_interval=not_intimer_interval,
        heating_start=_heating_date("heating_start", heating_start),
        heating_end=_heating_date("heating_end", heating_end),
        main_interval=main_interval,
        copy_interval=copy_interval,
        copy_statistics=copy_statistics,
    )


def _frame_list(frames: bytes | str | Iterable[bytes | str]) -> list[str]:
    if isinstance(frames, bytes | bytearray | str):
        frames = [frames]
    return [_hex_frame(frame) for frame in frames]


def build_meter_report(
    gw_id: str, meter_id: str | MeterId, frames: bytes | str | Sequence[bytes | str]
) -> bytes:
    """msg 20: a meter's reading; ``frames`` are the meter's replies *without* FE preambles."""
    meter = meter_id if isinstance(meter_id, MeterId) else parse_meter_id(meter_id)
    return encode_message(
        MSG_METER_REPORT, gw_id, meter_id=str(meter), meter_data=_frame_list(frames)
    )


def build_transparent_reply(
    gw_id: str, frames: bytes | str | Sequence[bytes | str], *, port: int = 0
) -> bytes:
    """msg 40 from the gateway: the meter's answer to a transparent frame."""
    return encode_message(
        MSG_TRANSPARENT,
        gw_id,
        transparent_port=_check_int("port", port, 0, 5),
        meter_data=_frame_list(frames),
    )


def build_last_will(gw_id: str) -> bytes:
    """msg 70, the gateway's last will (published on ``will_topic(gw_id)``)."""
    return encode_message(MSG_LAST_WILL, gw_id, stat=0)
