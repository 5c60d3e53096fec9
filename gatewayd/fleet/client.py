"""``FleetClient``: the backend's blocking client of a fleet of boxes behind one MQTT broker.

It runs paho's network thread (``loop_start``) and keeps a ``PresenceMap`` from the boxes'
retained status and presence topics; ``command`` finds the box that holds a device and sends the
command over that box's command topic, then blocks until the answer comes back on this client's
own ``reply_to`` topic. No Twisted: it works from any plain Python program.

Moves. If, while a command is in flight, presence shows the device online on another box with a
newer ``since``, or the box answers 404 and the device is (or within ``move_grace`` becomes)
online elsewhere, the command is sent ONCE more, to the new box, with the SAME request id. Ids
are remembered per box (each box's ``commands.db``), so this is safe against the old box: it
never runs the id twice. But the new box does not know the id: if the old box did run the
command (its answer was late or lost), the new box runs it as well. A device is connected to one
box at a time, so the old box normally answers 404 and nothing ran twice; a command that must
never run twice should be checked on the device before it is sent again with a new id.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho

from gatewayd.fleet.presence import PREFIX, BoxStatus, Presence, PresenceMap, unescape_level

__all__ = ["Answer", "CommandTimeout", "FleetClient", "FleetError"]

#: Topics of this client's own: ``<ANSWERS>/<client id>/answers/<box>`` and ``.../sync``.
CLIENT_PREFIX = "gatewayd-fleet"


class FleetError(Exception):
    """The broker cannot be reached, refused us, or the client is not connected."""


class CommandTimeout(TimeoutError):
    """No answer within the timeout; the command may still have run (retry with the same id)."""

    def __init__(self, message: str, request_id: str, gateway: str) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.gateway = gateway


@dataclass
class Answer:
    """A command's answer: the box's JSON body (with ``id`` and ``status``) and who answered."""

    body: dict[str, Any]
    gateway: str | None  # the box that answered; None: answered here, nothing was sent
    sent_to: list[str] = field(default_factory=list)  # the boxes it was sent to, in order

    @property
    def status(self) -> int:
        """The HTTP status the box answered (404 ``not_found`` when no box holds the device)."""
        status = self.body.get("status")
        return status if isinstance(status, int) else 500

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return 200 <= self.status < 300

    @property
    def result(self) -> Any:
        """The command's result (None for an error answer)."""
        return self.body.get("result")

    @property
    def error(self) -> dict[str, Any] | None:
        """``{"code", "message"}`` of an error answer, else None."""
        error = self.body.get("error")
        return error if isinstance(error, dict) else None


def _level(value: str) -> str:
    """A value as one topic level of our own topics (``/ + #`` and NUL cannot appear)."""
    return "".join(f"%{ord(c):02X}" if c in "%/+#\x00" else c for c in value)


class FleetClient:
    """Connect with ``connect()`` (or ``with``), then ``devices()``, ``boxes()``, ``command()``.

    ``tls``: an ``ssl.SSLContext``, or True for the system's CAs. The client reconnects by
    itself (paho) and subscribes again; retained messages then refresh the map.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        tls: ssl.SSLContext | bool | None = None,
        keepalive: int = 60,
        timeout: float = 30.0,
        move_grace: float = 1.0,
        prefix: str = PREFIX,
    ) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self.timeout = timeout
        self.move_grace = move_grace
        self.client_id = client_id or f"gatewayd-fleet-{uuid.uuid4().hex[:12]}"
        self.presence = PresenceMap(prefix)
        self.answers_topic = f"{CLIENT_PREFIX}/{_level(self.client_id)}/answers"
        self._sync_topic = f"{CLIENT_PREFIX}/{_level(self.client_id)}/sync"
        self._cond = threading.Condition()
        self._connected = False
        self._refused: str | None = None
        self._subscribed_mid: int | None = None
        self._subscribed = False
        self._synced: set[str] = set()
        self._pending: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.listeners: list[Callable[[Presence | BoxStatus | str], None]] = []
        self._mqtt = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True
        )
        if username is not None:
            self._mqtt.username_pw_set(username, password)
        if tls:
            self._mqtt.tls_set_context(
                tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context()
            )
        self._mqtt.reconnect_delay_set(1, 30)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_disconnect = self._on_disconnect
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_message = self._on_message

    # --- lifecycle ------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> FleetClient:
        """Connect, subscribe and wait until the retained state has arrived; FleetError if not."""
        try:
            self._mqtt.connect(self.host, self.port, self.keepalive)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise FleetError(f"cannot reach the broker at {self.host}:{self.port}: {reason}")
        self._mqtt.loop_start()
        deadline = time.monotonic() + timeout
        with self._cond:
            done = self._cond.wait_for(
                lambda: self._subscribed or self._refused is not None, _left(deadline)
            )
            refused = self._refused
        if refused is not None or not done:
            self.close()
            raise FleetError(
                f"the broker at {self.host}:{self.port} "
                + (f"refused the connection: {refused}" if refused else "did not answer in time")
            )
        if not self.sync(_left(deadline)):
            self.close()
            raise FleetError(f"the broker at {self.host}:{self.port} did not answer in time")
        return self

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait until every message the broker sent before now has arrived (retained ones
        included): a round trip through our own sync topic. False on timeout."""
        token = uuid.uuid4().hex
        self._mqtt.publish(self._sync_topic, token.encode(), qos=1)
        with self._cond:
            done = self._cond.wait_for(lambda: token in self._synced, timeout)
            self._synced.discard(token)
        return done

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._mqtt.disconnect()
        self._mqtt.loop_stop()

    def __enter__(self) -> FleetClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the fleet's state ----------------------------------------------------------------

    def devices(self, online_only: bool = False) -> list[Presence]:
        """Every box's claim about every device (see ``PresenceMap.devices``)."""
        with self._cond:
            return self.presence.devices(online_only)

    def boxes(self) -> list[BoxStatus]:
        """Every box seen, with its status."""
        with self._cond:
            return self.presence.boxes()

    def locate(self, plugin: str, device: str) -> Presence | None:
        """The claim of the box holding ``device`` of ``plugin``; None if no box has it online."""
        with self._cond:
            return self.presence.locate(plugin, device)

    def wait_for(self, predicate: Callable[[PresenceMap], bool], timeout: float = 10.0) -> bool:
        """Block until ``predicate(presence map)`` holds (checked after every change)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.presence), timeout)

    # --- commands -------------------------------------------------------------------------

    def command(
        self,
        plugin: str,
        command: str,
        device: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        expires: datetime | None = None,
    ) -> Answer:
        """Send ``command`` of ``plugin`` to the box holding ``device`` and wait for its answer.

        Returns the answer (any status; 404 ``not_found`` without sending when no box has the
        device online). Raises ``CommandTimeout`` after ``timeout`` seconds without one, and
        ``FleetError`` when not connected. ``expires`` defaults to now + timeout.
        """
        timeout = self.timeout if timeout is None else timeout
        request_id = request_id or uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        expires = expires or datetime.now(UTC) + timedelta(seconds=timeout)
        body = {
            "id": request_id,
            "args": args or {},
            "expires": expires.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        }
        target = self.locate(plugin, device)
        if target is None:
            message = f"no box has device {device!r} of plugin {plugin!r} online"
            return Answer(_error(request_id, 404, "not_found", message), None)
        sent_to: list[str] = []
        with self._cond:
            self._pending[request_id] = []
        try:
            self._send(target.gateway, plugin, command, body, sent_to)
            while True:
                got = self._next(request_id, plugin, device, target, deadline, len(sent_to) == 1)
                if got is None:
                    raise CommandTimeout(
                        f"no answer from box {target.gateway!r} within {timeout:g} s "
                        f"(request id {request_id}); the command may still have run",
                        request_id,
                        target.gateway,
                    )
                if isinstance(got, Presence):  # moved while in flight
                    target = got
                    self._send(target.gateway, plugin, command, body, sent_to)
                    continue
                gateway, answer = got
                if answer.get("status") == 404 and gateway == sent_to[0]:
                    if len(sent_to) > 1:
                        continue  # the old box does not have it: wait for the new one
                    moved = self._moved_within(plugin, device, target, deadline)
                    if moved is not None:
                        target = moved
                        self._send(target.gateway, plugin, command, body, sent_to)
                        continue
                return Answer(answer, gateway, sent_to)
        finally:
            with self._cond:
                self._pending.pop(request_id, None)

    def _send(
        self, gateway: str, plugin: str, command: str, body: dict[str, Any], sent_to: list[str]
    ) -> None:
        """Publish the request to ``gateway``'s command topic, its answer routed back to us."""
        if not self._mqtt.is_connected():
            raise FleetError(f"not connected to the broker at {self.host}:{self.port}")
        topic = f"{self.presence.prefix}/{gateway}/commands/{plugin}/{command}"
        payload = {**body, "reply_to": f"{self.answers_topic}/{_level(gateway)}"}
        info = self._mqtt.publish(topic, json.dumps(payload).encode(), qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise FleetError(f"cannot publish to {topic}: {paho.error_string(info.rc)}")
        sent_to.append(gateway)

    def _next(
        self,
        request_id: str,
        plugin: str,
        device: str,
        target: Presence,
        deadline: float,
        may_move: bool,
    ) -> tuple[str, dict[str, Any]] | Presence | None:
        """Wait for an answer to ``request_id`` or (``may_move``) a newer claim on another box."""
        moved: list[Presence] = []

        def ready() -> bool:
            if self._pending[request_id]:
                return True
            if may_move:
                claim = self.presence.locate(plugin, device)
                if claim and claim.gateway != target.gateway and claim.newer_than(target):
                    moved.append(claim)
                    return True
            return False

        with self._cond:
            if not self._cond.wait_for(ready, _left(deadline)):
                return None
            if self._pending[request_id]:
                return self._pending[request_id].pop(0)
            return moved[-1]

    def _moved_within(
        self, plugin: str, device: str, target: Presence, deadline: float
    ) -> Presence | None:
        """After a 404: the device's claim on another box, waiting up to ``move_grace``."""
        until = min(deadline, time.monotonic() + self.move_grace)
        found: list[Presence] = []

        def elsewhere() -> bool:
            claim = self.presence.locate(plugin, device)
            if claim is not None and claim.gateway != target.gateway:
                found.append(claim)
                return True
            return False

        with self._cond:
            self._cond.wait_for(elsewhere, _left(until))
        return found[-1] if found else None

    # --- paho callbacks (the network thread) ----------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            with self._cond:
                self._refused = str(reason)
                self._cond.notify_all()
            client.disconnect()
            return
        topics = [(t, 1) for t in self.presence.topics]
        topics += [(f"{self.answers_topic}/+", 1), (self._sync_topic, 1)]
        _, mid = client.subscribe(topics)
        with self._cond:
            self._connected = True
            self._subscribed_mid = mid

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        with self._cond:
            self._connected = False
            self._cond.notify_all()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            if mid == self._subscribed_mid:
                self._subscribed = True
                self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        topic, payload = message.topic, message.payload
        with self._cond:
            if topic == self._sync_topic:
                self._synced.add(payload.decode("ascii", "replace"))
            elif topic.startswith(self.answers_topic + "/"):
                self._answer(unescape_level(topic.rpartition("/")[2]) or "", payload)
            else:
                change = self.presence.update(topic, payload)
                if change is not None:
                    for listener in list(self.listeners):
                        listener(change)
            self._cond.notify_all()

    def _answer(self, gateway: str, payload: bytes) -> None:
        """Keep an answer for its waiting ``command`` call; others (late, not ours) are dropped."""
        try:
            answer = json.loads(payload)
        except ValueError:
            return
        if isinstance(answer, dict) and answer.get("id") in self._pending:
            self._pending[answer["id"]].append((gateway, answer))


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _error(request_id: str, status: int, code: str, message: str) -> dict[str, Any]:
    """An answer made here, shaped like a box's: ``ok``, ``error``, ``id``, ``status``."""
    return {
        "ok": False,
        "error": {"code": code, "message": message},
        "id": request_id,
        "status": status,
    }
