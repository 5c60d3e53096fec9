"""The fleet test of issue 14 §4: three real daemons (box-a, box-b, box-c) on a three-node NATS
cluster, each box's mqtt sink on a different node, the power-bank simulator spreading its
cabinets over the boxes through a small round-robin TCP balancer in the test.

It checks that every event every box stored (its local sqlite sink is the reference) reaches one
persistent QoS 1 consumer on one node; that the fleet client on another node queries and lends
wherever a cabinet is; that a box killed with ``kill -9`` (while its NATS node is down, so that
it holds a backlog) hands its cabinets over (they reconnect through the balancer, presence
follows, a lend to a moved cabinet succeeds) and, restarted on its state dir, delivers everything
it had stored; and that a box whose NATS node dies under load waits for the node (the sink has one
broker address) and then delivers its backlog. Repeats at the consumer are counted, not refused.
About 35-45 s, most of it the daemons' and the nodes' start-up.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from gatewayd.fleet import FleetClient
from gatewayd.testing import free_port, wait_for_port

pytestmark = pytest.mark.integration

BOXES = ("box-a", "box-b", "box-c")
CABINETS = 6
FIRST_IMEI = 860000000000001
IMEIS = [str(FIRST_IMEI + n) for n in range(CABINETS)]


class Balancer:
    """A threaded round-robin TCP proxy: each new connection goes to the next box whose port
    accepts; when either side closes, so does the other."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.next = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.chosen: list[int] = []
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = None
            for _ in range(len(self.backends)):
                port = self.backends[self.next % len(self.backends)]
                self.next += 1
                try:
                    upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
                except OSError:
                    continue
                upstream.settimeout(None)
                self.chosen.append(port)
                break
            if upstream is None:
                client.close()
                continue
            self.sockets += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


class Consumer:
    """The backend: one persistent QoS 1 subscriber to every event; counts event ids."""

    def __init__(self, port: int) -> None:
        self.ids: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="backend", clean_session=False
        )
        self.client.on_message = self._message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("gatewayd/+/events/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _message(self, client, userdata, message) -> None:
        body = json.loads(message.payload)
        events = body if isinstance(body, list) else [body]
        with self.lock:
            for event in events:
                self.ids[event["id"]] += 1

    def seen(self) -> set[str]:
        with self.lock:
            return set(self.ids)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Box:
    """One daemon: its config (powerbank plugin, mqtt sink to one NATS node, sqlite sink)."""

    def __init__(self, tmp_path: Path, name: str, mqtt_port: int) -> None:
        self.name = name
        self.directory = tmp_path / name
        self.directory.mkdir()
        self.device_port, api_port = free_port(), free_port()
        self.config = self.directory / "gatewayd.yaml"
        self.config.write_text(
            f"""\
gateway: {{id: {name}, state_dir: {self.directory / "state"}, log_level: info,
           shutdown_timeout: 8s}}
api: {{listen: "127.0.0.1:{api_port}"}}
plugins:
  cabinets: {{type: powerbank, listen: "127.0.0.1:{self.device_port}", emit_heartbeats: true}}
sinks:
  north:
    type: mqtt
    broker: {{host: 127.0.0.1, port: {mqtt_port}, client_id: {name},
              reconnect_initial: 0.2, reconnect_max: 1}}
    topic_escape: ". "
    payload: batch
    watch_presence: true
    commands: {{allow: ["cabinets.*"]}}
  store: {{type: sqlite, path: events.db}}
routes:
  - {{match: {{type: "*"}}, sinks: [north, store]}}
"""
        )
        self.process: subprocess.Popen | None = None
        self.runs = 0

    def start(self) -> None:
        self.runs += 1
        with open(self.directory / f"log-{self.runs}.txt", "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gatewayd", "run", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9

    def log(self) -> str:
        return "".join(
            path.read_text(errors="replace")[-1500:]
            for path in sorted(self.directory.glob("log-*.txt"))
        )

    def stored_ids(self) -> set[str]:
        path = self.directory / "state" / "events.db"
        if not path.exists():
            return set()
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            return {row[0] for row in db.execute("SELECT id FROM events")}


def wait(predicate, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def lend_one(fleet: FleetClient, imei: str) -> tuple[str, dict]:
    """Query ``imei`` through the fleet, lend the first bank it holds; (box, lend result)."""
    answer = fleet.command("cabinets", "query", imei, {"imei": imei}, timeout=15)
    assert answer.status == 200, answer.body
    for slot in answer.result["slots"]:
        if slot.get("bank"):
            args = {"imei": imei, "slot": slot["slot"], "bank": slot["bank"]}
            lent = fleet.command("cabinets", "lend", imei, args, timeout=20)
            if lent.status == 200:
                return lent.gateway, lent.result
    pytest.fail(f"no bank of {imei} could be lent: {answer.body}")


def test_three_boxes_on_a_nats_cluster_behind_a_balancer(tmp_path: Path, nats_cluster):
    started = time.monotonic()
    boxes = [Box(tmp_path, name, nats_cluster.mqtt_ports[i]) for i, name in enumerate(BOXES)]
    consumer = Consumer(nats_cluster.mqtt_ports[0])
    balancer = Balancer([box.device_port for box in boxes])
    simulator: subprocess.Popen | None = None
    fleet = FleetClient("127.0.0.1", nats_cluster.mqtt_ports[2], move_grace=5)
    try:
        assert consumer.subscribed.wait(15)
        time.sleep(2)  # NATS sets up the persistent subscription's consumer
        for box in boxes:
            box.start()
        for box in boxes:
            wait_for_port(box.device_port, timeout=30)
        fleet.connect()
        assert fleet.wait_for(lambda p: all(p.box_alive(b) for b in BOXES), 30)

        simulator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gatewayd",
                "simulate",
                "powerbank",
                "--connect",
                f"127.0.0.1:{balancer.port}",
                "--cabinets",
                str(CABINETS),
                "--first-imei",
                str(FIRST_IMEI),
                "--heartbeat",
                "1",
                "--rate",
                "10",
                "--fail-rate",
                "0",
                "--return-interval",
                "0",
                "--empty-rate",
                "0",
                "--seed",
                "7",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def where() -> dict[str, str | None]:
            return {i: getattr(fleet.locate("cabinets", i), "gateway", None) for i in IMEIS}

        # The balancer spreads the cabinets: two on every box.
        assert fleet.wait_for(
            lambda p: all(p.locate("cabinets", i) is not None for i in IMEIS), 30
        ), where()
        placed = where()
        assert Counter(placed.values()) == {b: 2 for b in BOXES}, placed

        # 2. The fleet client (on another node) lends wherever a cabinet is.
        for imei in (IMEIS[0], IMEIS[1], IMEIS[2]):
            gateway, result = lend_one(fleet, imei)
            assert gateway == placed[imei] and result["outcome"] == "succeeded", result

        # 3. box-b's NATS node dies, so box-b keeps storing what it cannot deliver; then
        # box-b is killed with kill -9 holding that backlog, and its node comes back.
        victim = boxes[1]
        moved = [i for i, b in placed.items() if b == victim.name]
        nats_cluster.kill(1)
        time.sleep(3)
        victim.kill()
        unsent = victim.stored_ids() - consumer.seen()  # stored, not yet at the consumer
        assert unsent, "box-b had no backlog when it was killed"
        nats_cluster.start_node(1)
        # Its cabinets come back through the balancer on the other boxes; presence follows.
        assert fleet.wait_for(
            lambda p: all(
                getattr(p.locate("cabinets", i), "gateway", victim.name) != victim.name
                for i in moved
            ),
            40,
        ), where()
        after = where()
        assert all(after[i] in ("box-a", "box-c") for i in moved), after
        gateway, result = lend_one(fleet, moved[0])
        assert gateway == after[moved[0]] != victim.name and result["outcome"] == "succeeded"

        # Restarted on its state dir, the killed box delivers the backlog it had stored.
        victim.start()
        wait_for_port(victim.device_port, timeout=30)
        assert wait(lambda: unsent <= consumer.seen(), 30), len(unsent - consumer.seen())

        # 4. A NATS node dies under load: box-c, whose sink is on it, waits for it (no
        # failover list) and then delivers its backlog; the others go on. (The fleet client
        # is on that node too, and is not used from here on.)
        nats_cluster.kill(2)
        time.sleep(3)
        waiting = boxes[2].stored_ids() - consumer.seen()
        assert waiting, "box-c delivered while its node was down?"
        assert boxes[2].process.poll() is None
        nats_cluster.start_node(2)
        assert wait(lambda: waiting <= consumer.seen(), 30), len(waiting - consumer.seen())
        time.sleep(3)  # load for a while longer

        simulator.send_signal(signal.SIGTERM)
        simulator.wait(10)
        # 1. Every event every box stored reaches the consumer, at least once by id.
        stored = {box.name: box.stored_ids() for box in boxes}
        assert all(stored.values()), {name: len(ids) for name, ids in stored.items()}
        expected = set().union(*stored.values())
        assert wait(lambda: expected <= consumer.seen(), 60), {
            name: len(ids - consumer.seen()) for name, ids in stored.items()
        }
        repeats = sum(n - 1 for n in consumer.ids.values())
        print(
            f"events stored {len(expected)} ({ {n: len(i) for n, i in stored.items()} }),"
            f" consumed {len(consumer.ids)}, repeats {repeats},"
            f" unsent by the killed box {len(unsent)}, waiting on box-c {len(waiting)},"
            f" took {time.monotonic() - started:.1f} s"
        )
        assert time.monotonic() - started < 150
    finally:
        if simulator is not None and simulator.poll() is None:
            simulator.kill()
            simulator.wait()
        fleet.close()
        balancer.close()
        codes = {box.name: box.stop() for box in boxes}
        consumer.close()
    assert all(code in (0, None) for code in codes.values()), (codes, [b.log() for b in boxes])
