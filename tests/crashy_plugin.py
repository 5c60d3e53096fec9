"""A UDP plugin with bugs on purpose, for the supervision tests against a real daemon
(``type: tests.crashy_plugin:Crashy``; the daemon runs from the repository root).

Datagrams: ``DEVICE VALUE`` is a reading; anything else raises inside ``context.handling`` (a
bug that costs one message); ``crash`` breaks a timer callback guarded with ``context.guard``
(a bug in the plugin's own state: the plugin fails and the supervisor restarts it).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import DatagramProtocol

from gatewayd.plugin import Plugin, PluginConfig
from gatewayd.schema import HostPort, split_host_port


class CrashyConfig(PluginConfig):
    listen: HostPort


class _Datagrams(DatagramProtocol):
    def __init__(self, plugin: Crashy) -> None:
        self.plugin = plugin

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.plugin.datagram(data.decode("utf-8", "replace"))


class Crashy(Plugin):
    protocol = "crashy"
    Config = CrashyConfig

    def start(self) -> None:
        host, port = split_host_port(self.config.listen)
        self.port = self.reactor.listenUDP(port, _Datagrams(self), interface=host)

    def stop(self) -> Any:
        return self.port.stopListening()

    def datagram(self, text: str) -> None:
        self.context.frame_in()
        if text == "crash":
            self.reactor.callLater(0, self.context.guard(self._broken_timer))
            return
        with self.context.handling(None, text):
            device, value = text.split(" ")  # "garbage" raises ValueError: one message lost
            self.context.record("reading", device, {"value": float(value)})

    def _broken_timer(self) -> None:
        {}["state the plugin lost"]
