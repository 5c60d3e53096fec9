"""The ``mqtt`` sink's config and its topic names: the template, and how values are escaped.

A topic is rendered from a template over ``{gateway} {plugin} {protocol} {device} {type}``; each
value is escaped so that it stays one topic level a subscriber can match and decode:

- ``%`` ``+`` ``#`` ``/``, the control characters (U+0000..U+001F, U+007F..U+009F), Unicode
  non-characters and lone surrogates become ``%XX`` of their UTF-8 bytes (``+`` → ``%2B``,
  ``#`` → ``%23``, ``/`` → ``%2F``, NUL → ``%00``, ``%`` → ``%25``). Brokers refuse such
  characters in a topic (mosquitto drops the connection), so one odd device name would
  otherwise stop the sink; ``%`` is escaped too, so percent-decoding gives back every value.
- A missing or empty value (an event without ``device``) is ``-``; the value ``-`` itself is
  ``%2D``, so ``-`` always means "none".

Everything else (letters of any script, spaces, ``$``, ``.``) is kept as it is.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import unquote

from pydantic import Field, ValidationInfo, field_validator

from gatewayd.commands.mqtt import CommandsConfig
from gatewayd.mqtt import BrokerConfig
from gatewayd.schema import PositiveDuration, SinkConfig
from gatewayd.sinks.templates import PLACEHOLDERS, fill, parse_placeholders
from gatewayd.sinks.thingsboard import ThingsBoardConfig, gatewayd_only, thingsboard_section

__all__ = [
    "DEFAULT_TOPIC",
    "PLACEHOLDERS",
    "MqttBrokerConfig",
    "MqttSinkConfig",
    "TopicTemplate",
    "escape_level",
    "unescape_level",
]

DEFAULT_TOPIC = "gatewayd/{gateway}/events/{plugin}/{type}"
#: Keys of the gatewayd topics, which must keep their defaults with ``format: thingsboard``.
GATEWAYD_ONLY = ("topic", "retain", "payload", "watch_presence", "commands")
#: How a missing or empty value (an event without a device) is written.
MISSING = "-"

_NONCHARACTERS = "".join(
    f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17)
)
_UNSAFE = re.compile(f"[%+#/\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef{_NONCHARACTERS}]")


def _percent(match: re.Match[str]) -> str:
    raw = match.group().encode("utf-8", "surrogatepass")
    return "".join(f"%{byte:02X}" for byte in raw)


def escape_level(value: str | None, extra: str = "") -> str:
    """One value as a topic level: reversible (``unescape_level``), never a wildcard or ``/``.

    ``extra``: more characters to percent-escape, for brokers that refuse them in topics
    (nats-server before 2.10 refuses ``.`` and every version refuses a space: ``". "``).
    """
    if not value:
        return MISSING
    if value == MISSING:
        return "%2D"
    escaped = _UNSAFE.sub(_percent, value)
    for char in extra:  # after the standard ones, whose escapes hold no such character
        if char in escaped:
            escaped = escaped.replace(char, "".join(f"%{b:02X}" for b in char.encode()))
    return escaped


def unescape_level(level: str) -> str | None:
    """The value ``escape_level`` wrote (None for ``-``): plain percent-decoding."""
    if level == MISSING:
        return None
    return unquote(level, errors="surrogatepass")


class TopicTemplate:
    """A validated topic template, split once into literal text and placeholders."""

    def __init__(self, template: str, extra: str = "") -> None:
        self.template = template
        self.extra = extra  # characters escaped besides the standard ones (``topic_escape``)
        self.parts: list[tuple[str, str | None]] = []  # (literal text, placeholder or None)
        if not template:
            raise ValueError("the topic must not be empty")
        if any(c in template for c in "+#\x00"):
            raise ValueError("a topic to publish to cannot hold + # or NUL")
        if template.startswith("$"):
            raise ValueError("topics starting with $ belong to the broker")
        self.parts = parse_placeholders(template)

    def render(self, event: Any, gateway: str = "") -> str:
        """The topic of ``event``; ``gateway`` stands in for an event without one."""
        extra = self.extra
        return fill(self.parts, event, gateway, lambda value: escape_level(value, extra))


class MqttBrokerConfig(BrokerConfig):
    """``broker:`` of the mqtt sink: the shared model, with a persistent session by default."""

    #: false: the broker keeps the session across reconnects and restarts, so a QoS 1 message
    #: in flight when the link broke is completed, not forgotten.
    clean_session: bool = False


class MqttSinkConfig(SinkConfig):
    """``sinks.<name>`` for ``type: mqtt``: events published to a broker (northbound)."""

    type: str = "mqtt"
    broker: MqttBrokerConfig = Field(default_factory=MqttBrokerConfig)
    #: gatewayd: the topics below; thingsboard: ThingsBoard's gateway API (``thingsboard:``).
    format: Literal["gatewayd", "thingsboard"] = "gatewayd"
    #: Topic of each event; placeholders {gateway} {plugin} {protocol} {device} {type}.
    topic: str = DEFAULT_TOPIC
    #: 1: a batch is acknowledged once the broker acknowledged every message. 0 can lose events.
    qos: int = Field(1, ge=0, le=1)
    retain: bool = False
    #: event: one message per event; batch: one JSON array per topic per written batch.
    payload: Literal["event", "batch"] = "event"
    #: QoS 1 messages sent and not yet acknowledged, at most (also paho's in-flight window).
    max_inflight: int = Field(100, ge=1, le=65535)
    #: More characters to percent-escape in topic values, for brokers that refuse them: ``". "``
    #: for nats-server before 2.10 (it refuses ``.``; every version refuses a space).
    topic_escape: str = ""

    @field_validator("topic_escape")
    @classmethod
    def _extra_characters(cls, value: str) -> str:
        """Characters escaped anyway (``% + # /``, control characters) or alphanumerics are not
        allowed here: the first would be escaped twice, the second would make topics unreadable."""
        bad = sorted({c for c in value if _UNSAFE.match(c) or c.isalnum() or c in "-_"})
        if bad:
            raise ValueError(f"cannot escape {''.join(bad)!r} (give only characters like '. ')")
        return value

    #: Subscribe to every box's presence (``gatewayd/+/devices/+/+``) so that a device that
    #: moved to another box is let go here (fleet deployments; see README "Fleet").
    watch_presence: bool = False
    #: How often the box's status (retained on ``gatewayd/{gateway}/status``) is published again.
    status_interval: PositiveDuration = 30.0
    #: Take the backend's commands from ``<prefix>/commands/+/+`` (``gatewayd.commands.mqtt``);
    #: null: none.
    commands: CommandsConfig | None = None
    #: ``format: thingsboard``: the token, device names and RPC (``gatewayd.sinks.thingsboard``).
    thingsboard: ThingsBoardConfig | None = None

    _gatewayd_only = field_validator(*GATEWAYD_ONLY)(gatewayd_only)
    _thingsboard = field_validator("thingsboard")(thingsboard_section)

    @field_validator("topic")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        TopicTemplate(value)
        return value

    @field_validator("max_inflight")
    @classmethod
    def _room_in_paho(cls, value: int, info: ValidationInfo) -> int:
        broker = info.data.get("broker")
        limit = broker.max_queued_messages if broker is not None else 0
        if limit and value > limit:
            raise ValueError(f"must be at most broker.max_queued_messages ({limit})")
        return value

    def config_warnings(self) -> list[tuple[tuple[str, ...], str]]:
        """What ``check-config`` should warn about: ``(key path, message)`` pairs."""
        if self.qos == 0:
            return [
                (
                    ("qos",),
                    "QoS 0 can lose events: a batch counts as delivered once written to the "
                    "socket, and what the broker never got is gone (use qos: 1)",
                )
            ]
        return []
