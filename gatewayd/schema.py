"""Building blocks for config schemas: the base models and the value types plugins share.

Every plugin and sink declares its config as a pydantic model derived from ``PluginConfig`` or
``SinkConfig``. Unknown keys are refused (``extra="forbid"``); a value type that fails raises a
``ValueError`` whose text becomes the config error message (``expected "host:port", got 9000``).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationInfo,
    field_validator,
)

__all__ = [
    "Field",
    "ConfigModel",
    "PluginConfig",
    "SinkConfig",
    "LocalSinkConfig",
    "HostPort",
    "UdpHostPort",
    "Transport",
    "listeners",
    "Duration",
    "PositiveDuration",
    "ByteSize",
    "Secret",
    "read_secret",
    "parse_host_port",
    "count_argument",
    "host_port_argument",
    "seconds_argument",
    "is_loopback",
    "parse_duration",
    "parse_byte_size",
]


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def parse_host_port(value: Any) -> str:
    """``"host:port"`` with port 0..65535; ``[::1]:80`` for IPv6. Returns it unchanged."""
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port", got {_describe(value)}')
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]]+):(\d{1,5})", value)
    if not match or int(match.group(2)) > 65535:
        raise ValueError(f'expected "host:port", got {_describe(value)}')
    return value


def host_port_argument(value: str) -> str:
    """An argparse ``type`` for HOST:PORT options: a usage error naming the option, not a
    traceback, when the value is not one."""
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (also written as ``::ffff:127.x.y.z``)."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def count_argument(value: str) -> int:
    """An argparse ``type`` for how-many options (cabinets, gateways): a whole number >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {number}")
    return number


def seconds_argument(value: str) -> float:
    """An argparse ``type`` for durations and intervals given in seconds: a number more than 0."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {value!r}") from None
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds more than 0, got {value}")
    return seconds


def split_host_port(value: str) -> tuple[str, int]:
    """``"[::1]:80"`` → ``("::1", 80)``; the value must have passed ``parse_host_port``."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds as a number, or a string such as ``500ms``, ``30s``, ``5m``, ``2h``, ``7d``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s or 5m, got {value}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a duration >= 0, got {value}")
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    raise ValueError(f"expected a duration such as 30s or 5m, got {_describe(value)}")


def parse_positive_duration(value: Any) -> float:
    """A duration that must be more than 0: a timeout or retry delay of 0 means 'fail at once'
    or 'retry without pause', never what an operator wanted."""
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration more than 0, got {_describe(value)}")
    return seconds


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


def parse_byte_size(value: Any) -> int:
    """Bytes as an integer, or a string such as ``64MiB``, ``512k``, ``1GB`` (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    raise ValueError(f"expected a size such as 64MiB or 1048576, got {_describe(value)}")


def at_least(other: str) -> Callable[[Any, float, ValidationInfo], float]:
    """A field validator: the value must not be below the (earlier) field ``other``, as a
    reconnect_max below its reconnect_initial. Use: ``field_validator("x_max")(at_least("x"))``."""

    def check(cls: Any, value: float, info: ValidationInfo) -> float:
        floor = info.data.get(other)
        if floor is not None and value < floor:
            raise ValueError(f"must be at least {other} ({floor:g} s)")
        return value

    return check


def check_readable(path: str) -> str:
    """A file named in the config must be readable now: a config error, not a failed start."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


Transport = Literal["tcp", "udp"]


@dataclass(frozen=True)
class _Listens:
    """Field metadata: the transport a ``listen`` key's address is bound with. Pydantic keeps
    it in ``FieldInfo.metadata``; ``listeners()`` and the config check read it."""

    transport: Transport


#: ``"host:port"`` of a TCP socket (``"[::1]:80"`` for IPv6; port 0 picks a free one).
HostPort = Annotated[str, BeforeValidator(parse_host_port), _Listens("tcp")]
#: ``"host:port"`` of a UDP socket: the same text as ``HostPort``; a ``listen`` key of this type
#: may share its port with a TCP listener (the config check compares per transport).
UdpHostPort = Annotated[str, BeforeValidator(parse_host_port), _Listens("udp")]
#: A path to a file that must be readable when the config is checked (TLS CAs, certificates).
ReadableFile = Annotated[str, AfterValidator(check_readable)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_positive_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_byte_size)]
#: A secret value: printed as ``**********`` in reprs, errors and dumps.
Secret = Annotated[SecretStr, PlainSerializer(lambda s: "**********", when_used="always")]


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=False)


class PluginConfig(ConfigModel):
    """Keys every plugin instance accepts; a plugin's own model adds its keys to these."""

    type: str
    startup_error_behavior: Literal["error", "retry", "ignore"] = "error"
    #: After a runtime failure (an exception in a guarded callback): ``on-failure`` stops and
    #: starts the instance again with backoff, ``never`` leaves it failed.
    restart: Literal["on-failure", "never"] = "on-failure"
    #: More than this many restarts within ``restart_window`` is a crash loop: left failed.
    restart_limit: int = Field(5, ge=0, le=1000)
    restart_window: PositiveDuration = 600.0

    #: Keys the supervisor reads: a reload that changes only these keeps the instance running.
    SUPERVISION_KEYS: ClassVar[frozenset[str]] = frozenset(
        {"restart", "restart_limit", "restart_window"}
    )


class SinkConfig(ConfigModel):
    """Keys every sink accepts: the queue in front of it and how it is retried and paced."""

    type: str
    max_bytes: ByteSize = 256 * 1024 * 1024
    max_age: PositiveDuration = 7 * 24 * 3600.0
    overflow: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    batch_size: int = Field(500, ge=1, le=100_000)
    write_timeout: PositiveDuration = 30.0
    retry_initial: PositiveDuration = 1.0
    retry_max: PositiveDuration = 60.0
    replay_rate: float | None = Field(1000.0, gt=0, allow_inf_nan=False)
    #: ``/health`` says ``warning`` (HTTP 200) once the sink has been failing this long...
    warn_after: PositiveDuration = 60.0
    #: ... or its oldest queued event is this old (null: never on age alone).
    warn_age: PositiveDuration | None = 600.0

    @field_validator("max_bytes")
    @classmethod
    def _room_for_events(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be more than 0 (a queue that holds nothing loses everything)")
        return value

    _retry_max_at_least_initial = field_validator("retry_max")(at_least("retry_initial"))


class LocalSinkConfig(SinkConfig):
    """The keys of a sink that writes on this box (a file, a database, the console).

    ``retry_max`` defaults to 5 s, not 60 s: a retry costs nothing but a failed local write and
    loads no server, and the usual cause (a full disk) can clear at any moment, so delivery
    resumes within 5 s of the cause going instead of waiting out a minute of backoff.
    """

    retry_max: PositiveDuration = 5.0


def listeners(config: BaseModel) -> list[tuple[str, Transport, str]]:
    """``(key, transport, "host:port")`` for each address ``config`` listens on.

    A listener is a key named ``listen`` or ``listen_*`` holding one address; its transport is
    ``udp`` when the field is declared ``UdpHostPort``, else ``tcp``. Other address keys (a broker
    to connect to) are not listeners. Why: two listeners on one port of one transport fail only
    once the daemon runs; the config check finds them first, per transport.
    """
    found: list[tuple[str, Transport, str]] = []
    for name, info in type(config).model_fields.items():
        key = info.alias or name
        if not (key == "listen" or key.startswith("listen_")):
            continue
        value = getattr(config, name, None)
        if not isinstance(value, str):
            continue
        marks = [m.transport for m in info.metadata if isinstance(m, _Listens)]
        found.append((key, marks[0] if marks else "tcp", value))
    return found


def read_secret(path: str | Path) -> str:
    """The content of a ``*_file`` secret, without its trailing newline."""
    return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
