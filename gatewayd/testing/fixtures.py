"""pytest fixtures for plugin tests: ``pytest_plugins = ["gatewayd.testing.fixtures"]``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gatewayd.testing import (
    Mosquitto,
    NatsCluster,
    PostgresCluster,
    free_port,
    free_udp_port,
    pty_pair,
)


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    """A running mosquitto on a free loopback port; ``.address``, ``.kill()``, ``.start()``."""
    broker = Mosquitto()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def postgresql() -> Iterator[PostgresCluster]:
    """A private PostgreSQL server (initdb in a temporary directory, a free port): ``.dsn``,
    ``.connect()``, ``.kill()``, ``.start()``, ``.restart()``; removed afterwards."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """Three nats-server nodes in one cluster with JetStream and MQTT (``stream_replicas: 3``)
    on free loopback ports: ``.mqtt_ports``, ``.kill(i)``, ``.start_node(i)``; removed afterwards.
    Skips the test when nats-server is not installed (``apt-get install nats-server``)."""
    try:
        cluster = NatsCluster(nodes=3, stream_replicas=3)
    except RuntimeError as exc:
        pytest.skip(f"{exc}; scripts/test.sh installs it")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def tcp_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()


@pytest.fixture
def udp_port() -> int:
    """A free UDP port on 127.0.0.1."""
    return free_udp_port()


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    """A raw pseudo-terminal pair ``(master_fd, slave_path)``."""
    with pty_pair() as pair:
        yield pair
