"""Config section and command arguments of the heating plugin (``type: heating``).

Kept apart from the plugin so that ``gatewayd check-config`` and the control API's argument
schemas need nothing but pydantic.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from gatewayd.mqtt import BrokerConfig
from gatewayd.schema import ConfigModel, Duration, PluginConfig, PositiveDuration

GW_ID_PATTERN = r"^[0-9A-Za-z]{11}$"
METER_ID_PATTERN = r"^[0-9A-Fa-f]{14}$"
ADDRESS_PATTERN = r"^[0-9A-Fa-f]{14}$"
MONTH_DAY_PATTERN = r"^(\d{4}-|20XX-)?\d{2}-\d{2}$"


def _looks_like_gw_id(value: str) -> bool:
    return re.fullmatch(GW_ID_PATTERN, value) is not None


class HeatingConfig(PluginConfig):
    """``plugins.<name>`` for ``type: heating``: hy/gw gateways on an MQTT broker."""

    broker: BrokerConfig = BrokerConfig()
    #: Topics: gateways publish to {topic_prefix}/set/<gw_id>, we to {topic_prefix}/get/<gw_id>.
    topic_prefix: str = "hy/gw"
    #: A gateway silent this long (while our broker link is up) goes offline.
    offline_after: PositiveDuration = 1800.0
    #: A gateway silent this long gets a status request (msg 1); null: never ask.
    poll_after: Duration | None = 600.0
    #: How long a command waits for the gateway's stat (or data) reply: then 504.
    command_timeout: PositiveDuration = 30.0
    #: set_valve/transparent: after stat 2, how long to wait for the meter's own reply.
    transparent_timeout: PositiveDuration = 30.0
    #: Retries the gateway makes on the meter bus for set_valve/transparent (1..20).
    transparent_count: int = Field(5, ge=1, le=20)
    #: QoS of the commands we publish (the gateway subscribes with QoS 2).
    command_qos: Literal[0, 1, 2] = 1
    #: QoS of our subscription. With 1, a QoS 1 message (the gateways' last will) is
    #: acknowledged to the broker only once its events are durable.
    subscribe_qos: Literal[0, 1] = 1
    #: Scaling of the 55H building valves' BCD totals: 0 whole units (the vendor's decoder),
    #: 2 CJ/T 188 XXXXXX.XX. Unconfirmed; see the plugin README.
    bcd_decimals: Literal[0, 2] = 0
    #: Last 3 address bytes (manufacturer code, wire order) of a meter whose address was never
    #: seen in a report, for set_valve. The seed's meters use 001111.
    manufacturer_code: str = Field("001111", pattern=r"^[0-9A-Fa-f]{6}$")
    #: Most gateways tracked; more are still decoded but not tracked for online/offline.
    max_gateways: int = Field(10000, ge=1)
    #: A report (msg 20) that can come again (QoS 1 or retained): within this long, the same
    #: payload from the same gateway is stored once (its events' idempotency keys are kept this
    #: long, across restarts). 0 or null: no keys, every delivery is stored.
    dedupe_window: Duration | None = 300.0
    #: Share the gateways with the other boxes of a fleet on the same broker: each gateway is
    #: handled by exactly one live box (rendezvous hashing over the boxes whose status says
    #: online, read by an mqtt sink); messages of the others' gateways are dropped undecoded.
    fleet: bool = False

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not value or any(c in value for c in "+#\x00"):
            raise ValueError("topic_prefix must be a topic without wildcards, e.g. hy/gw")
        return value

    @field_validator("broker")
    @classmethod
    def _client_id_is_not_a_gateway(cls, broker: BrokerConfig) -> BrokerConfig:
        if broker.client_id is not None and _looks_like_gw_id(broker.client_id):
            raise ValueError(
                f"client_id {broker.client_id!r} looks like a gateway id (11 letters/digits): "
                "gateways connect with their gw_id, and the broker drops one of two clients "
                "with the same id; choose e.g. gatewayd-heating"
            )
        return broker

    @field_validator("offline_after", "command_timeout", "transparent_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than 0 s")
        return value


# --- command arguments ---------------------------------------------------------------------------


class GatewayArgs(ConfigModel):
    """Every command names the gateway."""

    gw_id: str = Field(pattern=GW_ID_PATTERN, description="the gateway's 11-character id")


class SetPeriodsArgs(GatewayArgs):
    main_interval: int = Field(ge=1, le=65535, description="building valves, minutes")
    copy_interval: int = Field(ge=1, le=65535, description="household valves, minutes")
    heating_start: str = Field(pattern=MONTH_DAY_PATTERN, description="MM-DD")
    heating_end: str = Field(pattern=MONTH_DAY_PATTERN, description="MM-DD")


class ReadNowArgs(GatewayArgs):
    main: bool = Field(False, description="read the building valves (main meters) now")
    copy_meters: bool = Field(
        False, alias="copy", description="read the household valves (copy meters) now"
    )
    upload: bool = Field(False, description="upload the readings now")


class SetValveArgs(GatewayArgs):
    meter_id: str = Field(pattern=METER_ID_PATTERN, description="14 hex: number+protocol+port")
    opening: float = Field(ge=0, le=100, description="percent; 0.1 steps (55H), whole (53H)")
    address: str | None = Field(
        None,
        pattern=ADDRESS_PATTERN,
        description="the 7 address bytes (wire order); default: as last reported",
    )


class TransparentArgs(GatewayArgs):
    frame: str = Field(
        min_length=2,
        max_length=512,
        pattern=r"^[0-9A-Fa-f\s]+$",
        description="hex frame, FE preambles included",
    )
    port: int = Field(0, ge=0, le=5, description="0 M-Bus, 1 RS485-1, 2 RS485-2")
    count: int | None = Field(None, ge=1, le=20, description="bus retries (transparent_count)")
    wait_reply: bool = Field(True, description="wait for the meter's reply after stat 2")

    @field_validator("frame")
    @classmethod
    def _even(cls, value: str) -> str:
        compact = re.sub(r"\s+", "", value).upper()
        if len(compact) % 2:
            raise ValueError("an odd number of hex digits")
        return compact
