"""The heating plugin's commands: refresh, periods, read now, reboot, transparent, set_valve.

A mixin of ``HeatingPlugin`` (``plugins.heating.plugin``), split off so that the plugin module
keeps the message flow and this one the request/reply side: each command publishes one request
on ``<prefix>/get/<gw_id>`` and is answered by the gateway's reply, correlated by
``state.Correlator``; its ``command.result`` is the core's, annotated with the request's
``msg_id``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gatewayd.protocols import cjt188, hygw
from gatewayd.protocols.errors import Cjt188Error, HygwError
from twisted.internet import defer

from gatewayd.mqtt import MqttError
from gatewayd.plugin import (
    BadArguments,
    CommandError,
    DeviceRefused,
    NotFound,
    command,
)

from .config import (
    GatewayArgs,
    ReadNowArgs,
    SetPeriodsArgs,
    SetValveArgs,
    TransparentArgs,
)
from .messages import (
    MSG_PERIODS,
    MSG_READ_NOW,
    MSG_REBOOT,
    MSG_SET_PERIODS,
    MSG_STATUS,
    MSG_TRANSPARENT,
    frame_summary,
    periods_data,
    stat_only,
    status_data,
)
from .state import PendingCommand

__all__ = ["BrokerUnavailable", "HeatingCommands"]


class BrokerUnavailable(CommandError):
    """503: the plugin is not connected to the MQTT broker right now (it keeps reconnecting)."""

    status = 503
    code = "broker_unavailable"


class HeatingCommands:
    """The commands; expects the plugin's ``config``, ``registry``, ``correlator``, ``link``,
    ``fleet``, ``prefix``, ``context`` and ``reactor``."""

    # --- commands --------------------------------------------------------------------------

    def _publish(self, gw_id: str, payload: bytes) -> None:
        if self.link is None:
            raise MqttError("not started")
        sent = self.link.publish(
            hygw.topic("get", gw_id, self.prefix), payload, qos=self.config.command_qos
        )
        sent.addErrback(lambda failure: None)  # a stop before PUBACK; the command times out
        self.context.frame_out()

    def _send(
        self,
        name: str,
        gw_id: str,
        msg_id: int,
        payload: bytes,
        *,
        wait_reply: bool = False,
        allow_unknown: bool = False,
    ) -> PendingCommand:
        """Publish a command and register it for correlation (404, 409, 503 raised here)."""
        if gw_id == hygw.BROADCAST_GW_ID:
            raise BadArguments("gw_id: the broadcast id cannot be answered; name one gateway")
        refusal = self.fleet.refusal(gw_id) if self.fleet is not None else None
        if refusal is not None:
            raise refusal
        gateway = self.registry.get(gw_id)
        if not allow_unknown:
            if gateway is None:
                raise NotFound(
                    f"gateway {gw_id} has not been heard from since the plugin started "
                    "(the refresh command asks it)"
                )
            if not gateway.online:
                raise NotFound(f"gateway {gw_id} is offline")
        if self.link is None or not self.link.connected:
            raise BrokerUnavailable(
                f"not connected to the MQTT broker {self.config.broker.host}:"
                f"{self.config.broker.port}; it keeps reconnecting"
            )
        pending = self.correlator.begin(
            gw_id, msg_id, name, self.config.command_timeout, wait_reply=wait_reply
        )
        try:
            self._publish(gw_id, payload)
        except MqttError as exc:
            self.correlator.discard(pending)
            raise BrokerUnavailable(str(exc)) from None
        return pending

    def _finish(
        self, name: str, gw_id: str, pending: PendingCommand, to_result: Callable[[Any], Any]
    ) -> defer.Deferred:
        """Turn the reply into the command's result; its ``command.result`` (emitted by the
        core) gets the gateway as device and the request's ``msg_id``."""
        self.context.annotate(device=gw_id, msg_id=pending.msg_id)
        return pending.deferred.addCallback(to_result)

    @command("refresh", args=GatewayArgs, device="gw_id")
    def refresh(self, args: GatewayArgs) -> defer.Deferred:
        """Ask a gateway for its status (msg 1); works for gateways not heard from yet."""
        payload = hygw.build_status_request(args.gw_id)
        pending = self._send("refresh", args.gw_id, MSG_STATUS, payload, allow_unknown=True)
        return self._finish("refresh", args.gw_id, pending, status_data)

    @command("get_periods", args=GatewayArgs, device="gw_id")
    def get_periods(self, args: GatewayArgs) -> defer.Deferred:
        """Read the reporting periods and heating season (msg 2)."""
        payload = hygw.build_periods_request(args.gw_id)
        pending = self._send("get_periods", args.gw_id, MSG_PERIODS, payload)
        return self._finish("get_periods", args.gw_id, pending, periods_data)

    @command("set_periods", args=SetPeriodsArgs, device="gw_id")
    def set_periods(self, args: SetPeriodsArgs) -> defer.Deferred:
        """Write the reporting periods (minutes) and heating season (MM-DD) (msg 12)."""
        try:
            payload = hygw.build_set_periods(
                args.gw_id,
                main_interval=args.main_interval,
                copy_interval=args.copy_interval,
                heating_start=args.heating_start,
                heating_end=args.heating_end,
            )
        except HygwError as exc:
            raise BadArguments(exc.message) from None
        pending = self._send("set_periods", args.gw_id, MSG_SET_PERIODS, payload)
        return self._finish("set_periods", args.gw_id, pending, stat_only)

    @command("read_now", args=ReadNowArgs, device="gw_id")
    def read_now(self, args: ReadNowArgs) -> defer.Deferred:
        """Read meters now (msg 18): main (building valves), copy (household), upload."""
        payload = hygw.build_read_now(
            args.gw_id, main=args.main, copy=args.copy_meters, up=args.upload
        )
        pending = self._send("read_now", args.gw_id, MSG_READ_NOW, payload)
        return self._finish("read_now", args.gw_id, pending, stat_only)

    @command("reboot", args=GatewayArgs, device="gw_id")
    def reboot(self, args: GatewayArgs) -> defer.Deferred:
        """Reboot the gateway (msg 30); it drops off (last will) and reports again."""
        payload = hygw.build_reboot(args.gw_id)
        pending = self._send("reboot", args.gw_id, MSG_REBOOT, payload)
        return self._finish("reboot", args.gw_id, pending, stat_only)

    @command("transparent", args=TransparentArgs, device="gw_id")
    def transparent(self, args: TransparentArgs) -> defer.Deferred:
        """Pass a raw frame to a meter bus port (msg 40) and return the meter's reply frames."""
        count = args.count or self.config.transparent_count
        try:
            payload = hygw.build_transparent(args.gw_id, args.frame, port=args.port, count=count)
        except HygwError as exc:
            raise BadArguments(exc.message) from None
        pending = self._send(
            "transparent", args.gw_id, MSG_TRANSPARENT, payload, wait_reply=args.wait_reply
        )
        decimals = self.config.bcd_decimals

        def result(message: hygw.Message) -> dict[str, Any]:
            stat = pending.stat or (message.stat.to_dict() if message.stat else None)
            return {
                "gw_id": args.gw_id,
                "port": args.port,
                "frame_sent": args.frame,
                "stat": stat,
                "frames": [frame_summary(f, decimals) for f in message.frames],
            }

        return self._finish("transparent", args.gw_id, pending, result)

    @command("set_valve", args=SetValveArgs, device="gw_id")
    def set_valve(self, args: SetValveArgs) -> defer.Deferred:
        """Set a valve's opening (55H building or 53H household valve) through msg 40.

        Builds the vendor frame for the meter type, waits for the gateway's stat and for the
        meter's reply, and reports whether the valve confirmed.
        """
        meter_id = args.meter_id.upper()
        parsed = hygw.parse_meter_id(meter_id)
        known = self.registry.find_meter(meter_id)
        meter_type = known.meter_type if known and known.meter_type else parsed.meter_type
        if meter_type not in (cjt188.METER_BUILDING_VALVE, cjt188.METER_HOUSEHOLD_VALVE):
            raise BadArguments(
                f"meter_id: {meter_id} is not a known valve (meter protocol {parsed.protocol}: "
                "2034 building valve 55H, 2008 household valve 53H)"
            )
        address = (
            (args.address or "").upper()
            or (known.address if known else None)
            or parsed.number + self.config.manufacturer_code.upper()
        )
        try:
            frame = cjt188.build_valve_opening(meter_type, address, args.opening)
        except Cjt188Error as exc:
            raise BadArguments(f"opening: {exc.message}") from None
        try:
            payload = hygw.build_transparent(
                args.gw_id, frame, port=parsed.port, count=self.config.transparent_count
            )
        except HygwError as exc:
            raise BadArguments(f"meter_id: {exc.message}") from None
        request = cjt188.parse_frame(frame)
        pending = self._send("set_valve", args.gw_id, MSG_TRANSPARENT, payload, wait_reply=True)

        def result(message: hygw.Message) -> dict[str, Any]:
            return self._valve_result(args, meter_id, request, frame, pending, message)

        return self._finish("set_valve", args.gw_id, pending, result)

    def _valve_result(
        self,
        args: SetValveArgs,
        meter_id: str,
        request: cjt188.Frame,
        frame: bytes,
        pending: PendingCommand,
        message: hygw.Message,
    ) -> dict[str, Any]:
        """The set_valve result from the meter's reply; 502 when it refused or was garbled."""
        problems = []
        for hex_frame in message.frames:
            try:
                reply = cjt188.parse_hex(hex_frame)
            except Cjt188Error as exc:
                self._emit_invalid(
                    meter_id,
                    exc.reason,
                    exc.message,
                    hex_frame,
                    gateway=args.gw_id,
                    meter_id=meter_id,
                )
                problems.append(f"{hex_frame}: {exc.reason}")
                continue
            if not cjt188.is_reply_to(request, reply):
                problems.append(f"{hex_frame}: not a reply to the command")
                continue
            outcome = cjt188.decode_valve_reply(reply)
            state = outcome["state"]
            if state in ("failed", "error_reply", "not_a_valve_reply"):
                raise DeviceRefused(f"valve {meter_id} answered {state} ({hex_frame})", code=state)
            echoed = outcome["opening_percent"]
            return {
                "gw_id": args.gw_id,
                "meter_id": meter_id,
                "meter_type": f"{request.meter_type:02X}",
                "address": request.address,
                "opening_requested": args.opening,
                "frame_sent": frame.hex().upper(),
                "stat": pending.stat,
                "reply_frame": hex_frame,
                "state": state,
                "confirmed": state == "done" and (echoed is None or echoed == args.opening),
                "opening_percent": echoed,
            }
        code = "no_reply_frame" if not problems else "invalid_reply"
        detail = "; ".join(problems) or "the gateway's msg 40 reply carries no meter frame"
        raise DeviceRefused(f"valve {meter_id}: {detail}", code=code)
