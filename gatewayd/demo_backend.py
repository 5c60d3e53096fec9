"""``gatewayd demo``'s stand-in for a backend: one command over the northbound MQTT link.

Why: the demo shows every path a deployment uses. When the demo config has an ``mqtt`` sink
that takes commands, this sends one command (``cabinets.query`` of the first simulated cabinet)
to the box's command topic a few seconds after start, the way a backend would, and prints the
answer that comes back on its ``reply_to`` topic. The plugin's ``command.result`` event (with
``source: mqtt``) shows in the event stream as well.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.logger import Logger

from gatewayd.mqtt import BrokerConfig, MqttClient

__all__ = ["DemoBackend", "demo_backend"]

log = Logger(namespace="gatewayd.demo")

#: The command the demo backend sends: (plugin instance, command, arguments).
DEMO_COMMAND = ("cabinets", "query", {"imei": "860000000000001"})
REPLY_TO = "gatewayd-demo/backend/answers"


class DemoBackend:
    """Sends one command over MQTT after ``delay`` seconds (retrying until the link is up)."""

    def __init__(self, reactor: Any, broker: BrokerConfig, prefix: str, delay: float = 8.0):
        plugin, command, arguments = DEMO_COMMAND
        self.reactor = reactor
        self.topic = f"{prefix}/commands/{plugin}/{command}"
        self.request = {"id": "demo-1", "args": arguments, "reply_to": REPLY_TO}
        self.delay = delay
        settings = broker.model_copy(update={"client_id": "gatewayd-demo-backend"})
        self.client = MqttClient(
            reactor,
            settings,
            on_message=self._answered,
            subscriptions=[(REPLY_TO, 1)],
            name="demo backend",
            log=log,
        )
        self._call: Any = None
        self._tries = 0

    def start(self) -> None:
        self.client.start()
        self._call = self.reactor.callLater(self.delay, self._send)

    def stop(self) -> Any:
        if self._call is not None and self._call.active():
            self._call.cancel()
        return self.client.stop()

    def _send(self) -> None:
        self._call = None
        self._tries += 1
        if not self.client.subscribed:
            if self._tries < 10:
                self._call = self.reactor.callLater(2.0, self._send)
            return
        body = json.dumps(self.request)
        _say(f"demo backend: sending over MQTT to {self.topic}: {body}")
        self.client.publish(self.topic, body.encode(), qos=1).addErrback(lambda _: None)

    def _answered(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        _say(f"demo backend: answer on {topic}: {payload.decode(errors='replace')}")


def demo_backend(daemon: Any, reactor: Any) -> DemoBackend | None:
    """A backend for the demo's first ``mqtt`` sink that allows the demo command, if any."""
    plugin, command, _ = DEMO_COMMAND
    if plugin not in daemon.plugins:
        return None
    for name, sink_config in daemon.config.sinks.items():
        commands = getattr(sink_config, "commands", None)
        if getattr(sink_config, "type", None) != "mqtt" or commands is None:
            continue
        channel = getattr(getattr(daemon.sinks.get(name), "sink", None), "channel", None)
        if channel is None or not channel.allows(plugin, command):
            continue
        prefix = commands.prefix.replace("{gateway}", daemon.gateway_id)
        return DemoBackend(reactor, sink_config.broker, prefix)
    return None


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
