"""systemd notification: READY, STOPPING, STATUS and the watchdog, as datagrams to NOTIFY_SOCKET.

A dozen lines of standard library instead of a dependency: the ``sdnotify`` package swallows
every error, ``systemd-python`` needs libsystemd headers. Without ``NOTIFY_SOCKET`` every call
is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends ``KEY=VALUE`` datagrams to the socket named by ``NOTIFY_SOCKET`` (``@`` = abstract)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = self._watchdog_interval(env)

    @staticmethod
    def _watchdog_interval(env: Mapping[str, str]) -> float | None:
        """Half of WATCHDOG_USEC in seconds, if the watchdog is meant for this process."""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2 / 1_000_000

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str) -> bool:
        """Send one datagram such as ``notify(READY="1", STATUS="running")``; False if not sent."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError:
            return False
        return True
