"""The power-bank plugin (``type: powerbank``): config, the TCP listener, commands, the CLI bits.

Why: this is the glue between the pieces that do the work: ``server`` splits each cabinet's stream
into frames, the codec (``gatewayd.protocols.powerbank``) parses them, ``state.CabinetRegistry``
runs the flows and decides what to answer. Here a frame that does not parse becomes a
``frame.invalid`` event (the connection and every other cabinet carry on), commands of the control
API reach the registry, and ``gatewayd crc-detect`` is added to the command line.
See README.md beside this file for every key, event and command.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from gatewayd.protocols.powerbank import (
    Codec,
    CrcSettings,
    Packet,
    PowerbankError,
    crc_detect,
    decode_for_cli,
)
from pydantic import BeforeValidator, Field, field_validator, model_validator
from twisted.internet import defer

from gatewayd.plugin import Device, Plugin, command
from gatewayd.schema import (
    ConfigModel,
    Duration,
    HostPort,
    PluginConfig,
    PositiveDuration,
    split_host_port,
)

from .idlists import IdList
from .server import CabinetConnection, CabinetServer
from .state import CabinetRegistry, FlowSettings

__all__ = [
    "CrcConfig",
    "LendArgs",
    "PowerbankConfig",
    "PowerbankPlugin",
    "QueryArgs",
    "RateLimitConfig",
]

IMEI_PATTERN = re.compile(r"[0-9]{15}")
BANK_PATTERN = re.compile(r"[0-9A-Za-z]{1,32}")


# --- config --------------------------------------------------------------------------------


def _imei(value: Any) -> str:
    """15 digits; a YAML number is accepted when it has 15 digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not IMEI_PATTERN.fullmatch(value):
        raise ValueError(f"expected an IMEI of 15 digits, got {value!r}")
    return value


def _bank(value: Any) -> str:
    """1..32 letters or digits, as a string (a YAML number would lose leading zeros)."""
    if not isinstance(value, str):
        raise ValueError(
            f'a power bank id is a string of 1..32 letters or digits ("0000000012"; quote it in '
            f"a config file), got {value!r}"
        )
    if not BANK_PATTERN.fullmatch(value):
        raise ValueError(f"a power bank id is 1..32 letters or digits, got {value!r}")
    return value


def _existing_file(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected the path of a file, got {value!r}")
    if not Path(value).is_file():
        raise ValueError(f"no such file: {value}")
    return value


def _banks(value: Any) -> str | list[str]:
    """``accept_all``, a list of bank ids, or the path of a file of them."""
    if value == "accept_all":
        return value
    if isinstance(value, list):
        return [_bank(item) for item in value]
    if isinstance(value, str):
        try:
            return _existing_file(value)
        except ValueError as exc:
            raise ValueError(
                f"expected accept_all, a list of power bank ids or the path of a file of them; "
                f"{exc}"
            ) from None
    raise ValueError(
        f"expected accept_all, a list of power bank ids or the path of a file of them, "
        f"got {value!r}"
    )


Imei = Annotated[str, BeforeValidator(_imei)]
BankId = Annotated[str, BeforeValidator(_bank)]
ExistingFile = Annotated[str, BeforeValidator(_existing_file)]


class RateLimitConfig(ConfigModel):
    """Per-connection frame rate: ``rate`` frames/s sustained, ``burst`` at once."""

    rate: float = Field(20.0, gt=0)
    burst: int = Field(40, ge=1)


class CrcConfig(ConfigModel):
    """How the CRC-16 of a frame is computed and checked (find it with ``gatewayd crc-detect``)."""

    algorithm: Literal["modbus", "ccitt-false", "xmodem", "arc", "kermit", "x25"] = "modbus"
    span: Literal[
        "imei_to_last_comma",
        "imei_to_last_field",
        "brace_to_last_comma",
        "brace_to_last_field",
        "raw_imei_to_crc",
        "raw_imei_to_last_field",
        "raw_brace_to_crc",
        "raw_brace_to_last_field",
    ] = "imei_to_last_comma"
    byte_order: Literal["big", "little"] = "big"
    case: Literal["upper", "lower"] = "upper"
    mode: Literal["strict", "log", "off"] = "strict"

    def settings(self) -> CrcSettings:
        """The codec's ``CrcSettings`` for this section."""
        return CrcSettings(self.algorithm, self.span, self.byte_order, self.case, self.mode)


class PowerbankConfig(PluginConfig):
    """``plugins.<name>`` with ``type: powerbank`` (README.md documents every key)."""

    @model_validator(mode="before")
    @classmethod
    def _crc_mode_spelling(cls, data: Any) -> Any:
        """``crc_mode:`` (the spelling of the original specification) is ``crc.mode``."""
        if not isinstance(data, dict) or "crc_mode" not in data:
            return data
        data = dict(data)
        mode = data.pop("crc_mode")
        crc = data.get("crc")
        if crc is None:
            data["crc"] = {"mode": mode}
        elif isinstance(crc, dict):
            if "mode" in crc:
                raise ValueError("give crc.mode or crc_mode, not both")
            data["crc"] = {**crc, "mode": mode}
        return data

    listen: HostPort = "0.0.0.0:9000"
    max_line: int = Field(512, ge=64, le=65536)
    max_connections: int = Field(20000, ge=1)
    rate_limit: RateLimitConfig | None = Field(default_factory=RateLimitConfig)
    heartbeat_interval: PositiveDuration = 60.0
    idle_timeout: Duration | None = None
    allow_imei: list[Imei] | None = None
    allow_imei_file: ExistingFile | None = None
    banks: Annotated[str | list[str], BeforeValidator(_banks)] = "accept_all"
    lend_timeout: PositiveDuration = 20.0
    query_timeout: PositiveDuration = 10.0
    duplicate_window: Duration = 600.0
    emit_heartbeats: bool = False
    crc: CrcConfig = Field(default_factory=CrcConfig)

    @field_validator("heartbeat_interval", "lend_timeout", "query_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(f"expected a duration > 0, got {value:g}")
        return value

    @property
    def effective_idle_timeout(self) -> float | None:
        """``idle_timeout``, by default 3 × ``heartbeat_interval``; None when it is 0 (never)."""
        timeout = (
            self.idle_timeout if self.idle_timeout is not None else 3 * self.heartbeat_interval
        )
        return timeout or None


class QueryArgs(ConfigModel):
    """Arguments of ``query``."""

    imei: Imei


class LendArgs(ConfigModel):
    """Arguments of ``lend``."""

    imei: Imei
    slot: int = Field(ge=1, le=3)
    bank: BankId


# --- the plugin ----------------------------------------------------------------------------


def frame_text(data: bytes) -> str:
    """A received frame as text for an event's ``raw`` (ASCII, UTF-8 or GB18030, else escaped)."""
    if data.isascii():
        return data.decode("ascii")
    for encoding in ("utf-8", "gb18030"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("ascii", "backslashreplace")


class PowerbankPlugin(Plugin):
    """Plugin type ``powerbank``: a TCP server for 3-slot power-bank rental cabinets."""

    protocol = "powerbank"
    Config = PowerbankConfig
    decoders = {"powerbank": decode_for_cli}
    #: Pending-connection queue of the listener: thousands of cabinets reconnect at once after an
    #: outage of the box or the mobile network.
    listen_backlog = 1024

    config: PowerbankConfig

    def init(self) -> None:
        config, context = self.config, self.context
        self.codec = Codec(config.crc.settings(), max_length=config.max_line)
        self.allowed: IdList | None = None
        if config.allow_imei is not None or config.allow_imei_file is not None:
            self.allowed = IdList(
                "allow_imei",
                IMEI_PATTERN,
                config.allow_imei or (),
                Path(config.allow_imei_file) if config.allow_imei_file else None,
                clock=self.reactor,
            )
        self.banks: IdList | None = None
        if config.banks != "accept_all":
            listed = isinstance(config.banks, list)
            self.banks = IdList(
                "banks",
                BANK_PATTERN,
                config.banks if listed else (),
                None if listed else Path(config.banks),
                clock=self.reactor,
            )
        allowed, banks = self.allowed, self.banks
        self.registry = CabinetRegistry(
            self.reactor,
            context.emit,
            FlowSettings(
                lend_timeout=config.lend_timeout,
                query_timeout=config.query_timeout,
                duplicate_window=config.duplicate_window,
                emit_heartbeats=config.emit_heartbeats,
            ),
            is_allowed=(lambda imei: True) if allowed is None else allowed.__contains__,
            accepts_bank=(lambda bank: True) if banks is None else banks.__contains__,
            record=context.record,
            seen=context.seen,
            forget=context.forget,
        )
        rate = config.rate_limit
        self.server = CabinetServer(
            self,
            self.reactor,
            max_line=config.max_line,
            max_connections=config.max_connections,
            idle_timeout=config.effective_idle_timeout,
            rate=rate.rate if rate else None,
            burst=rate.burst if rate else 1,
        )
        self.port: Any = None
        self.crc_mismatches = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for id_list in (self.allowed, self.banks):
            if id_list is not None:
                id_list.load()  # an unreadable file fails the start, naming it
        host, port = split_host_port(self.config.listen)
        self.port = self.reactor.listenTCP(
            port, self.server, backlog=self.listen_backlog, interface=host
        )
        self._publish_gauges()
        self.log.info(
            "powerbank {plugin}: listening on {listen}",
            plugin=self.name,
            listen=self.config.listen,
        )

    def stop(self) -> defer.Deferred:
        self.registry.stop()
        stopping = []
        if self.port is not None:
            stopping.append(defer.maybeDeferred(self.port.stopListening))
            self.port = None
        stopping.append(self.server.close_all("shutdown"))
        return defer.DeferredList(stopping, consumeErrors=True)

    @property
    def listening_port(self) -> int:
        """The TCP port actually listened on (useful with ``listen: "127.0.0.1:0"``)."""
        return self.port.getHost().port

    def _publish_gauges(self) -> None:
        server, registry, metrics = self.server, self.registry, self.context.metrics
        for name, help_text, read in (
            ("connections", "Open cabinet TCP connections", lambda: len(server.connections)),
            ("cabinets_known", "Cabinets seen since start", lambda: len(registry.cabinets)),
            (
                "lends_pending",
                "Lends waiting for the cabinet's result",
                lambda: sum(1 for c in registry.cabinets.values() if c.lend is not None),
            ),
            ("duplicates_total", "Duplicate MC/MR/MQ answered again", lambda: registry.duplicates),
            (
                "connections_refused_total",
                "Connections closed at once: max_connections reached",
                lambda: server.refused,
            ),
            (
                "lines_too_long_total",
                "Connections closed for a line over max_line",
                lambda: server.lines_too_long,
            ),
            ("noise_lines_total", "Modem noise dropped before frames", lambda: server.noise),
            (
                "rate_limited_total",
                "Times a connection's reading was paused by rate_limit",
                lambda: server.rate_limited,
            ),
            (
                "crc_mismatches_total",
                "Frames accepted with a wrong CRC (crc.mode: log)",
                lambda: self.crc_mismatches,
            ),
            (
                "replies_dropped_total",
                "Answers not sent: the cabinet had no connection then",
                lambda: registry.replies_dropped,
            ),
            (
                "answers_withheld_total",
                "Answers not sent because their event could not be stored (the cabinet resends)",
                lambda: registry.not_stored,
            ),
        ):
            metrics.gauge(name, help_text, read)

    # --- the server's handler --------------------------------------------------------------

    def frame_received(self, conn: CabinetConnection, frame: bytes) -> None:
        """Parse one frame; a bad one is ``frame.invalid``, a good one goes to the registry."""
        self.context.frame_in()
        raw = frame_text(frame)
        try:
            decoded = self.codec.decode(frame)
        except PowerbankError as exc:
            self.context.record(
                "frame.invalid",
                conn.imei or _claimed_imei(frame),
                {"reason": exc.reason, "message": exc.message, "address": conn.address},
                raw,
            )
            return
        if decoded.crc_ok is False:
            self._crc_mismatch(conn, decoded.crc, decoded.expected_crc)
        # A bug must cost one frame, not the connection or other cabinets.
        with self.context.handling(conn.imei, raw, address=conn.address):
            self.registry.packet_received(conn, decoded.packet, raw)

    def _crc_mismatch(self, conn: CabinetConnection, received: str, expected: str | None) -> None:
        self.crc_mismatches += 1
        if not conn.crc_warned:  # once per connection: crc.mode log is for commissioning
            conn.crc_warned = True
            self.log.warn(
                "powerbank {plugin}: {address}: CRC {received} != {expected} accepted "
                "(crc.mode: log); run gatewayd crc-detect on captured lines",
                plugin=self.name,
                address=conn.address,
                received=received,
                expected=expected,
            )

    def frame_too_long(self, conn: CabinetConnection, data: bytes) -> None:
        self.context.record(
            "frame.invalid",
            conn.imei,
            {
                "reason": "length",
                "message": f"more than {self.config.max_line} bytes without a frame end; "
                "connection closed",
                "address": conn.address,
            },
            frame_text(data),
        )

    def connection_lost(self, conn: CabinetConnection, reason: str) -> None:
        self.registry.connection_lost(conn, reason)

    def encode(self, packet: Packet) -> bytes:
        self.context.frame_out()
        return self.codec.build(packet)

    # --- devices and commands --------------------------------------------------------------

    def device_elsewhere(self, device: str, gateway: str, since: float) -> None:
        """A cabinet that reconnected to another box of the fleet: let go of our older link."""
        if self.registry.moved_elsewhere(device, gateway, since):
            self.context.log.info(
                "cabinet {imei} is on box {gateway} now: closed its older connection here",
                imei=device,
                gateway=gateway,
            )

    def devices(self) -> list[Device]:
        listed = []
        for imei in sorted(self.registry.cabinets):
            cabinet = self.registry.cabinets[imei]
            listed.append(
                Device(
                    id=imei,
                    online=cabinet.online,
                    last_seen=cabinet.last_seen,
                    details={
                        "address": cabinet.address,
                        "online_since": cabinet.online_since,
                        "slots": [cabinet.inventory[n] for n in sorted(cabinet.inventory)],
                        "lend": cabinet.lend.describe() if cabinet.lend else None,
                    },
                )
            )
        return listed

    @command("query", args=QueryArgs, device="imei")
    def query(self, args: QueryArgs) -> defer.Deferred:
        """Ask a cabinet for the state of its slots (CQ → AQ); answers {"slots": [...]}."""
        return self.registry.query(args.imei)

    @command("lend", args=LendArgs, device="imei")
    def lend(self, args: LendArgs) -> defer.Deferred:
        """Lend (eject) power bank `bank` from `slot`; never resent, reconciled on timeout."""
        return self.registry.lend(args.imei, args.slot, args.bank)

    # --- command line ----------------------------------------------------------------------

    @classmethod
    def register_cli(cls, subparsers: argparse._SubParsersAction) -> None:
        parser = subparsers.add_parser(
            "crc-detect",
            help="find the power-bank CRC settings under which captured lines check",
            description="Tries every CRC algorithm x span x byte order x letter case on the "
            "captured power-bank lines and prints the settings under which all of them check, "
            "the defaults first. Capture two or three different commands.",
        )
        parser.add_argument(
            "lines", nargs="+", metavar="LINE", help="a line as the cabinet sent it"
        )
        parser.add_argument("--json", action="store_true", help="print a JSON list")
        parser.set_defaults(func=cmd_crc_detect)


_LEADING_IMEI = re.compile(rb'\{"(\d{15}),')


def _claimed_imei(frame: bytes) -> str | None:
    """The IMEI a rejected frame starts with, if any: on a connection that has not yet sent a
    valid frame (wrong CRC settings, say), its errors still name the cabinet."""
    match = _LEADING_IMEI.match(frame)
    return match.group(1).decode() if match else None


_TYPED_TERMINATOR = re.compile(r"(?:\\r|\\n)+\s*$")


def cmd_crc_detect(args: argparse.Namespace) -> int:
    """``gatewayd crc-detect LINE [LINE ...]``: 0 with matches, 1 with none or a bad line."""
    lines = [_TYPED_TERMINATOR.sub("", line) for line in args.lines]
    try:
        matches = crc_detect(lines)
    except PowerbankError as exc:
        print(f"invalid powerbank line ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    found = [
        {"algorithm": m.algorithm, "span": m.span, "byte_order": m.byte_order, "case": m.case}
        for m in matches
    ]
    if args.json:
        print(json.dumps(found, indent=2))
        return 0 if found else 1
    if not found:
        print(
            f"no CRC setting matches all {len(lines)} line(s); check that they were captured "
            "byte for byte (crc.mode: log accepts them meanwhile)",
            file=sys.stderr,
        )
        return 1
    print(f"{len(found)} setting(s) match all {len(lines)} line(s); put one under the plugin:")
    for item in found:
        print(
            f"  crc: {{algorithm: {item['algorithm']}, span: {item['span']}, "
            f"byte_order: {item['byte_order']}, case: {item['case']}}}"
        )
    distinct = {(m["algorithm"], _CANONICAL_SPAN.get(m["span"], m["span"]), m["byte_order"],
                 m["case"]) for m in found}  # fmt: skip
    if len(distinct) < len(found):
        print("a raw_* span and its canonical twin agree on lines without spaces: either works")
    if len(distinct) > 1:
        print("several differ: capture more lines of different commands to tell them apart")
    return 0


#: The canonical span a ``raw_*`` span equals on lines without whitespace.
_CANONICAL_SPAN = {
    "raw_imei_to_crc": "imei_to_last_comma",
    "raw_imei_to_last_field": "imei_to_last_field",
    "raw_brace_to_crc": "brace_to_last_comma",
    "raw_brace_to_last_field": "brace_to_last_field",
}
