"""Northbound benchmark: events/s through the mqtt, http and postgresql sinks, each beside a
bare client doing the same delivery, in one run on loopback.

Usage: ``python bench/northbound.py [--events N] [--batch-size N] [--only mqtt,http,postgresql]``

For every sink the events are emitted into a real durable queue (``queue_sync: full``) and
timed from the first ``emit()`` until the sink has acknowledged the last one (QoS 1: every
PUBACK; http: every 2xx; postgresql: every commit). The baselines send the same payloads with
no queue and no daemon:

* mqtt: a bare paho client (its own network thread, QoS 1, the same max_inflight) publishing
  the same messages (``payload: event``: one per event; ``batch``: one JSON array per batch)
  and waiting for every PUBACK;
* http: a bare treq client POSTing the same ndjson batches, one at a time like the sink, to the
  same server (a separate process that answers 200);
* postgresql: a bare psycopg ``COPY`` of the same rows, one transaction per batch, into a table
  of the same shape (a private cluster made with initdb).

Goals (issue 13): each sink >= 20,000 events/s; mqtt and postgresql >= 0.5 x their bare
baseline. The machine is shared: run it a few times.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import make_events  # noqa: E402

from gatewayd.config_model import RouteConfig  # noqa: E402
from gatewayd.delivery import SinkRunner  # noqa: E402
from gatewayd.events import Event  # noqa: E402
from gatewayd.pipeline import Pipeline, encode_event  # noqa: E402
from gatewayd.queue import QueueStore  # noqa: E402
from gatewayd.registry import SINK_GROUP, load  # noqa: E402
from gatewayd.sinks.base import SinkContext  # noqa: E402

CHUNK = 1000
GATEWAY = "edge-01"


async def through_sink(
    reactor: Any, events: list[Event], directory: Path, settings: dict[str, Any]
) -> float:
    """Seconds from the first emit until the sink acknowledged every event."""
    sink_class = load(SINK_GROUP, settings["type"])
    config = sink_class.Config.model_validate(settings)
    store = QueueStore(directory / "queues", reactor, sync="full")
    store.start()
    queue = store.queue(
        "north", max_bytes=config.max_bytes, max_age=config.max_age, overflow=config.overflow
    )
    context = SinkContext("north", GATEWAY, reactor, directory, Logger())
    sink = sink_class("north", config, context)
    runner = SinkRunner(sink, queue, config, reactor)
    await store.ready()
    runner.start()
    while runner.state != "ok":  # connected (or the table made) before the clock starts
        await task.deferLater(reactor, 0.01, lambda: None)
    pipeline = Pipeline([RouteConfig(sinks=["north"])], {"north": queue}, {"north": runner})
    total = len(events)
    started = time.perf_counter()
    for start in range(0, total, CHUNK):
        for event in events[start : start + CHUNK]:
            pipeline.emit(event)
        await task.deferLater(reactor, 0, lambda: None)
    while runner.delivered < total:
        await task.deferLater(reactor, 0.002, lambda: None)
    elapsed = time.perf_counter() - started
    assert runner.failures == 0, f"{settings['type']}: {runner.failures} failed writes"
    await runner.stop()
    await store.stop()
    return elapsed


# --- mqtt -----------------------------------------------------------------------------------


def bare_paho(port: int, messages: list[tuple[str, bytes]], inflight: int) -> float:
    """Seconds for a bare paho QoS 1 publisher to get a PUBACK for every message."""
    import paho.mqtt.client as paho

    done = threading.Event()
    acked = 0
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-bare")
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)

    def on_publish(*_: Any) -> None:
        nonlocal acked
        acked += 1
        if acked == len(messages):
            done.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    for topic, payload in messages:
        client.publish(topic, payload, qos=1)
    done.wait(300)
    elapsed = time.perf_counter() - started
    client.loop_stop()
    client.disconnect()
    assert acked == len(messages), f"bare paho: {acked} of {len(messages)} acknowledged"
    return elapsed


def mqtt_messages(events: list[Event], payloads: list[str], mode: str, batch: int) -> list:
    if mode == "event":
        return [
            (f"gatewayd/{GATEWAY}/events/{e.plugin}/{e.type}", p.encode())
            for e, p in zip(events, payloads, strict=True)
        ]
    return [
        (
            f"gatewayd/{GATEWAY}/events/batch",
            ("[" + ",".join(payloads[i : i + batch]) + "]").encode(),
        )
        for i in range(0, len(payloads), batch)
    ]


# --- http -----------------------------------------------------------------------------------

SERVER = """
import sys
from twisted.internet import reactor
from twisted.web import resource, server

class Count(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        request.content.read()
        return b"{}"

port = reactor.listenTCP(0, server.Site(Count()), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


async def bare_treq(reactor: Any, url: str, bodies: list[bytes]) -> float:
    """Seconds for a bare treq client to POST every batch, one at a time, each answered 200."""
    import treq
    from twisted.web.client import HTTPConnectionPool

    pool = HTTPConnectionPool(reactor)
    started = time.perf_counter()
    for body in bodies:
        response = await treq.post(
            url, data=body, headers={"Content-Type": "application/x-ndjson"}, pool=pool
        )
        await response.content()
        assert response.code == 200, response.code
    elapsed = time.perf_counter() - started
    await pool.closeCachedConnections()
    return elapsed


# --- postgresql -----------------------------------------------------------------------------


def bare_copy(dsn: str, rows: list[tuple], batch: int) -> float:
    """Seconds for a bare psycopg COPY of the rows, one transaction per batch."""
    import psycopg

    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE bare (id text PRIMARY KEY, ts timestamptz, gateway text, plugin text,"
            " protocol text, device text, type text, data jsonb, raw text)"
        )
        conn.commit()
        started = time.perf_counter()
        for i in range(0, len(rows), batch):
            with (
                conn.cursor() as cursor,
                cursor.copy(
                    "COPY bare (id, ts, gateway, plugin, protocol, device, type, data, raw)"
                    " FROM STDIN"
                ) as copy,
            ):
                for row in rows[i : i + batch]:
                    copy.write_row(row)
            conn.commit()
        return time.perf_counter() - started


def pg_rows(events: list[Event]) -> list[tuple]:
    import orjson

    return [
        (
            e.id,
            e.ts,
            e.gateway,
            e.plugin,
            e.protocol,
            e.device,
            e.type,
            orjson.dumps(e.data).decode(),
            e.raw,
        )
        for e in events
    ]


# --- main -----------------------------------------------------------------------------------


async def main(reactor: Any, options: argparse.Namespace) -> None:
    from gatewayd.testing import Mosquitto
    from gatewayd.testing.postgres import PostgresCluster

    n = options.events
    batch = options.batch_size
    only = set(options.only.split(","))
    results: list[tuple[str, str, float, float | None]] = []  # sink, what, rate, bare rate

    def fresh() -> tuple[list[Event], list[str]]:
        events = make_events(n)  # new ids each time: the sinks see new events
        for event in events:
            event.gateway = GATEWAY
        return events, [encode_event(e) for e in events]

    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        root = Path(tmp)
        if "mqtt" in only:
            broker = Mosquitto()
            broker.start()
            try:
                for mode in ("event", "batch"):
                    events, payloads = fresh()
                    gc.collect()
                    bare = bare_paho(broker.port, mqtt_messages(events, payloads, mode, batch), 100)
                    events, payloads = fresh()
                    (root / f"mqtt-{mode}").mkdir()
                    settings = {
                        "type": "mqtt",
                        "broker": {
                            "host": "127.0.0.1",
                            "port": broker.port,
                            "client_id": f"b-{mode}",
                        },
                        "qos": 1,
                        "payload": mode,
                        "batch_size": batch,
                        "replay_rate": None,
                    }
                    gc.collect()
                    took = await through_sink(reactor, events, root / f"mqtt-{mode}", settings)
                    results.append(("mqtt", f"payload: {mode}", n / took, n / bare))
            finally:
                broker.stop()
        if "http" in only:
            server = subprocess.Popen(
                [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
            )
            try:
                port = int(server.stdout.readline())
                url = f"http://127.0.0.1:{port}/events"
                events, payloads = fresh()
                bodies = [
                    ("\n".join(payloads[i : i + batch]) + "\n").encode() for i in range(0, n, batch)
                ]
                gc.collect()
                bare = await bare_treq(reactor, url, bodies)
                events, payloads = fresh()
                (root / "http").mkdir()
                settings = {"type": "http", "url": url, "batch_size": batch, "replay_rate": None}
                gc.collect()
                took = await through_sink(reactor, events, root / "http", settings)
                results.append(("http", "format: ndjson", n / took, n / bare))
            finally:
                server.terminate()
                server.wait()
        if "postgresql" in only:
            cluster = PostgresCluster()
            cluster.start()
            try:
                events, _ = fresh()
                bare = bare_copy(cluster.dsn, pg_rows(events), batch)
                events, _ = fresh()
                (root / "pg").mkdir()
                settings = {
                    "type": "postgresql",
                    "dsn": cluster.dsn,
                    "batch_size": batch,
                    "replay_rate": None,
                }
                gc.collect()
                took = await through_sink(reactor, events, root / "pg", settings)
                results.append(("postgresql", "COPY", n / took, n / bare))
            finally:
                cluster.stop()

    print(f"northbound benchmark: {n} events, batch_size={batch}, queue_sync=full")
    print(f"{'sink':12} {'mode':16} {'sink ev/s':>11} {'bare ev/s':>11} {'ratio':>6}")
    for sink, what, rate, bare_rate in results:
        ratio = rate / bare_rate if bare_rate else float("nan")
        print(f"{sink:12} {what:16} {rate:11,.0f} {bare_rate or 0:11,.0f} {ratio:6.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--only", default="mqtt,http,postgresql")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
