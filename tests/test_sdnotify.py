"""sd_notify datagrams to a real Unix datagram socket."""

import os
import socket

from gatewayd.sdnotify import Notifier


def test_sends_datagram_to_path_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path})
        assert notifier.notify(READY="1", STATUS="up")
        assert server.recv(1024) == b"READY=1\nSTATUS=up"


def test_abstract_socket():
    name = f"gatewayd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify(WATCHDOG="1")
        assert server.recv(1024) == b"WATCHDOG=1"


def test_without_socket_is_a_noop():
    notifier = Notifier({})
    assert not notifier.enabled and not notifier.notify(READY="1")


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert Notifier({"WATCHDOG_USEC": "400000"}).watchdog_interval == 0.2
    assert Notifier({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({}).watchdog_interval is None
