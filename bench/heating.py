"""Heating benchmark: meter reports/s from mosquitto through decode into the durable queue.

Usage: ``python bench/heating.py [--reports N] [--gateways G] [--meters M] [--sync full|normal]
[--rounds R] [--batch B] [--no-stages]``

Every contender reads the same stream, in the same run:

* ``same-work baseline`` (the reference of the goal): one plain thread, no Twisted, doing the
  plugin's work as directly as it can be written: paho-mqtt 2.x driven by ``loop()`` in that
  thread, the same codec calls as the plugin (``hygw.decode_message``, which parses the JSON
  with orjson, then ``cjt188.parse_hex`` and ``cjt188.decode_payload`` for each frame), the
  same reading dict, its JSON (``encode_json``: type, device, data, raw) as the row, and
  ``executemany`` of ``--batch`` rows a transaction into a SQLite WAL file with the queue's
  schema and ``synchronous`` (``--sync``); a report counts once its row is committed;
* ``heating plugin``: the plugin's reactor-driven MQTT client, hy/gw decode, CJ/T 188 parse and
  payload decode, one ``meter.reading`` event per report through ``Pipeline`` into a
  ``QueueStore`` queue; a report counts once its event is durable (committed, ``--sync``);
* ``bare paho`` (for information only): a paho subscriber (its own network thread,
  ``loop_start``) that only counts messages: it decodes and stores nothing.

How the stream is fed: a mosquitto of its own (``queue_qos0_messages``, unbounded queues, no
persistence) holds a persistent session for each contender. The sessions are created, the
clients leave, ``mosquitto_pub -l`` publishes the reports (built by the heating simulator's
meters and the codecs: 55H, 53H and heat-meter frames, one topic per gateway), and then each
contender connects and drains its backlog at its own best speed. So the publisher's speed does
not limit either side. Rate = reports / (last counted - first received); each of ``--rounds``
publishes the stream again, and the medians are compared.

Where the time goes is measured the same way, not in a loop of its own (in-process loops run
2-3x faster than the same code between paho's reads and SQLite's thread): the same backlog is
drained by the plugin cut short at each stage (the MQTT link alone; + decoding; + the plugin and
its events, routed nowhere; + the durable queue, which is the plugin as deployed), and each
stage's ratio to the same-work baseline and the microseconds a report it adds are printed.
Goals: the plugin as deployed at >= 5,000 reports/s and >= 0.5 x the same-work baseline.

The stream is built by the codecs, so a report that becomes ``frame.invalid`` (or that the
baseline cannot decode) stops the run with its reason, and a contender that does not finish in
600 s says how far it got.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from twisted.internet import defer, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.plugins.heating import HeatingPlugin  # noqa: E402
from gatewayd.plugins.heating.simulator import FIRST_GW_ID, make_meters  # noqa: E402
from gatewayd.protocols import cjt188, hygw  # noqa: E402

from gatewayd.config_model import RouteConfig  # noqa: E402
from gatewayd.events import Event, encode_json  # noqa: E402
from gatewayd.pipeline import Pipeline  # noqa: E402
from gatewayd.plugin import PluginContext  # noqa: E402
from gatewayd.queue import QueueStore  # noqa: E402
from gatewayd.testing import free_port, wait_for_port  # noqa: E402

TOPIC_FILTER = "hy/gw/set/#"


def build_reports(reports: int, gateways: int, meters: int) -> dict[str, list[bytes]]:
    """gw_id -> msg 20 payloads, round-robin over each gateway's meters."""
    per_gateway: dict[str, list[bytes]] = {}
    fleet = [(f"{FIRST_GW_ID + g:011d}", make_meters(g, meters, seed=7)) for g in range(gateways)]
    for i in range(reports):
        gw_id, gw_meters = fleet[i % gateways]
        meter = gw_meters[(i // gateways) % meters]
        payload = hygw.build_meter_report(gw_id, meter.meter_id, meter.reading())
        per_gateway.setdefault(gw_id, []).append(payload)
    return per_gateway


class Broker:
    """A mosquitto that keeps QoS 0 messages for absent persistent sessions, without bounds."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        conf = directory / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "queue_qos0_messages true\nmax_queued_messages 0\nmax_queued_bytes 0\n"
            "log_dest none\n"
        )
        os.chmod(directory, 0o755)
        os.chmod(conf, 0o644)
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.process = subprocess.Popen([binary, "-c", str(conf)])
        wait_for_port(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(5)


def open_session(port: int, client_id: str) -> None:
    """Create a persistent session subscribed to the reports, then leave."""
    subscribed = threading.Event()
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect("127.0.0.1", port)
    client.subscribe(TOPIC_FILTER, qos=0)
    client.loop_start()
    if not subscribed.wait(5):
        raise RuntimeError("no SUBACK")
    client.disconnect()
    client.loop_stop()


def publish(port: int, per_gateway: dict[str, list[bytes]]) -> float:
    """Publish every report with mosquitto_pub -l (one process per gateway topic)."""
    binary = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    started = time.perf_counter()
    for gw_id, payloads in per_gateway.items():
        lines = b"\n".join(payloads) + b"\n"
        subprocess.run(
            [binary, "-p", str(port), "-t", hygw.topic("set", gw_id), "-l", "-q", "0"],
            input=lines,
            check=True,
        )
    return time.perf_counter() - started


def drain_bare(port: int, client_id: str, expected: int, timeout: float) -> tuple[int, float]:
    """(messages, seconds) for a paho subscriber that only counts."""
    count = 0
    first = last = 0.0
    done = threading.Event()

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        nonlocal count, first, last
        count += 1
        if count == 1:
            first = time.perf_counter()
        if count == expected:
            last = time.perf_counter()
            done.set()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    done.wait(timeout)
    client.disconnect()
    client.loop_stop()
    return count, (last or time.perf_counter()) - first


#: The queue file's table (``gatewayd.queue``), for the same-work baseline's rows.
SAME_WORK_SCHEMA = (
    "CREATE TABLE queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,"
    " size INTEGER NOT NULL, payload TEXT NOT NULL)"
)
SAME_WORK_INSERT = "INSERT INTO queue (ts, size, payload) VALUES (?, ?, ?)"


def drain_same_work(
    port: int,
    client_id: str,
    expected: int,
    directory: Path,
    sync: str,
    batch: int,
    bcd_decimals: Any,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """The plugin's work written plainly in one thread: paho's ``loop()``, the plugin's codec
    calls and reading dict, its JSON as a row, ``executemany`` of ``batch`` rows a transaction
    into a WAL file (``synchronous`` = ``sync``). A report counts once its row is committed;
    whatever is pending is also committed when a ``loop()`` call brings no message."""
    conn = sqlite3.connect(directory / f"{client_id}.db", isolation_level=None)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise RuntimeError(f"same-work baseline: journal_mode is {mode}, WAL needed")
    conn.execute(f"PRAGMA synchronous={sync.upper()}")
    conn.execute(SAME_WORK_SCHEMA)
    rows: list[tuple[float, int, str]] = []
    received = durable = commits = 0
    first = last = committing = 0.0

    def commit() -> None:
        nonlocal durable, commits, last, committing
        started = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(SAME_WORK_INSERT, rows)
        conn.execute("COMMIT")
        durable += len(rows)
        commits += 1
        rows.clear()
        last = time.perf_counter()
        committing += last - started

    def on_message(client: Any, userdata: Any, mqtt_message: Any) -> None:
        nonlocal received, first
        if not first:
            first = time.perf_counter()
        received += 1
        message = hygw.decode_message(mqtt_message.payload, topic=mqtt_message.topic)
        meter = message.values.get("meter_id")
        if message.msg_id != 20 or meter is None or not message.frames:
            raise RuntimeError(f"same-work baseline: not a meter report: {message.raw[:200]}")
        meter_id = meter["meter_id"]
        now = time.time()
        for hex_frame in message.frames:
            frame = cjt188.parse_hex(hex_frame)  # a Cjt188Error stops the run with its reason
            payload = cjt188.decode_payload(frame, bcd_decimals)
            data = {
                "gateway": message.gw_id,
                "meter_id": meter_id,
                "number": meter["number"],
                "protocol": meter["protocol"],
                "port": meter["port"],
                "meter_type": f"{frame.meter_type:02X}",
                "address": frame.address,
                "control": f"{frame.control:02X}",
                "di": frame.di_hex,
                **payload,
            }
            text = encode_json(
                {"type": "meter.reading", "device": meter_id, "data": data, "raw": hex_frame}
            )
            rows.append((now, len(text.encode()), text))
        if len(rows) >= batch:
            commit()

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    deadline = time.perf_counter() + timeout
    try:
        while durable < expected:
            if time.perf_counter() > deadline:
                raise RuntimeError(
                    f"same-work baseline: {durable} of {expected} reports committed in "
                    f"{timeout:.0f} s ({received} messages in)"
                )
            before = received
            rc = client.loop(timeout=0.05)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"same-work baseline: paho loop: {paho.error_string(rc)}")
            if rows and (received == before or received >= expected):
                commit()
    finally:
        client.disconnect()
        conn.close()
    return {
        "durable": durable,
        "seconds": last - first,
        "per_commit": durable / max(1, commits),
        "committing": committing,
    }


#: The plugin cut short at each stage (``drain_plugin``'s ``stage``), in the order they add up.
STAGES = {
    "link": "MQTT link alone (reactor-driven paho, the handler counts)",
    "decode": "+ decode: hy/gw envelope, CJ/T 188 frame, payload fields",
    "events": "+ the plugin and its events, routed nowhere",
    "durable": "+ the durable queue: the plugin as deployed",
}


def decode_only(topic: str, payload: bytes) -> None:
    """What the plugin decodes of a report, and nothing else."""
    message = hygw.decode_message(payload, topic=topic)
    for hex_frame in message.frames:
        cjt188.decode_payload(cjt188.parse_hex(hex_frame))


async def drain_plugin(
    reactor: Any,
    port: int,
    client_id: str,
    expected: int,
    directory: Path,
    sync: str,
    stage: str = "durable",
) -> dict[str, Any]:
    """Run the heating plugin until ``expected`` reports are counted; with ``stage`` below
    ``durable`` the plugin stops short (see STAGES) and a report counts when it got that far."""
    store = QueueStore(directory / f"queues-{stage}", reactor, sync=sync)
    store.start()
    queue = store.queue("store", max_bytes=4 * 1024**3, max_age=86400.0, overflow="drop_oldest")
    await store.ready()
    pipeline = Pipeline([RouteConfig(match={"type": "*"}, sinks=["store"])], {"store": queue})
    durable = 0
    invalid = 0
    first = 0.0
    finished: defer.Deferred = defer.Deferred()

    def counted(result: Any = None) -> Any:
        nonlocal durable
        durable += 1
        if durable == expected and not finished.called:
            finished.callback(time.perf_counter())
        return result

    def sink(event: Event) -> defer.Deferred:
        nonlocal invalid
        d = pipeline.emit(event) if stage == "durable" else defer.succeed(None)
        if event.type == "meter.reading":
            d.addCallback(counted)
        elif event.type == "frame.invalid":
            invalid += 1
            if invalid == 1 and not finished.called:  # the stream is built by the codecs
                reason = event.data.get("reason"), event.data.get("message")
                finished.errback(RuntimeError(f"stage {stage}: a report went invalid: {reason}"))
        return d

    context = PluginContext(
        name="heating",
        protocol="heating",
        gateway_id="bench",
        reactor=reactor,
        state_dir=directory,
        sink=sink,
    )
    config = HeatingPlugin.Config.model_validate(
        {
            "type": "heating",
            "broker": {
                "host": "127.0.0.1",
                "port": port,
                "client_id": client_id,
                "clean_session": False,
                "probe_interval": 0,
            },
            "subscribe_qos": 0,
            "poll_after": None,
        }
    )
    plugin = HeatingPlugin("heating", config, context)
    handle = plugin.on_mqtt_message

    def first_seen(topic: str, payload: bytes, qos: int, retain: bool) -> Any:
        nonlocal first
        if not first:
            first = time.perf_counter()
        if stage == "link":
            return counted()
        if stage == "decode":
            decode_only(topic, payload)
            return counted()
        return handle(topic, payload, qos, retain)

    plugin.start()
    plugin.link.on_message = first_seen
    finished.addTimeout(600, reactor)
    try:
        last = await finished
    except defer.TimeoutError:
        raise RuntimeError(
            f"stage {stage}: {durable} of {expected} reports counted in 600 s "
            f"({plugin.context.metrics.frames_in} messages in, {invalid} invalid)"
        ) from None
    await plugin.stop()
    await store.stop()
    return {
        "durable": durable,
        "seconds": last - first,
        "invalid": invalid,
        "per_commit": store.committed / max(1, store.commits),
        "messages_in": plugin.context.metrics.frames_in,
    }


async def one_round(
    reactor: Any, options: argparse.Namespace, per_gateway: dict[str, list[bytes]], round_: int
) -> tuple[float, dict[str, Any], dict[str, dict[str, Any]]]:
    """(bare reports/s, same-work details, {stage: plugin details}) for one published stream."""
    n = options.reports
    stages = list(STAGES) if options.stages else ["durable"]
    bcd_decimals = HeatingPlugin.Config.model_fields["bcd_decimals"].default
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        directory = Path(tmp)
        broker = Broker(directory)
        try:
            for name in ["bare", "same-work", *stages]:
                open_session(broker.port, f"bench-{name}")
            publish(broker.port, per_gateway)
            time.sleep(0.5)  # let the broker finish queueing
            bare_count, bare_seconds = drain_bare(broker.port, "bench-bare", n, timeout=120)
            same_work = drain_same_work(
                broker.port,
                "bench-same-work",
                n,
                directory,
                options.sync,
                options.batch,
                bcd_decimals,
            )
            results = {}
            for stage in stages:
                results[stage] = await drain_plugin(
                    reactor, broker.port, f"bench-{stage}", n, directory, options.sync, stage
                )
        finally:
            broker.stop()
    counts = [bare_count, same_work["durable"]] + [r["durable"] for r in results.values()]
    if any(count != n for count in counts):
        raise RuntimeError(f"round {round_}: expected {n} reports, counted {counts}")
    for details in [same_work, *results.values()]:
        details["rate"] = details["durable"] / details["seconds"]
    return bare_count / bare_seconds, same_work, results


async def main(reactor: Any, options: argparse.Namespace) -> None:
    n = options.reports
    per_gateway = build_reports(n, options.gateways, options.meters)
    size = sum(len(p) for payloads in per_gateway.values() for p in payloads) / n
    print(
        f"heating benchmark: {n} reports from {options.gateways} gateways x {options.meters} "
        f"meters (55H/53H/heat meter), {size:.0f} bytes each, sync={options.sync}, "
        f"same-work batch {options.batch}"
    )
    print(
        f"{'round':>5} {'same-work baseline':>20} {'heating plugin (durable)':>26} "
        f"{'ratio':>6} {'rows/commit':>12} {'bare paho (info)':>17}"
    )
    bare_rates: list[float] = []
    base_rates: list[float] = []
    commit_micros: list[float] = []
    stage_rates: dict[str, list[float]] = {}
    for round_ in range(1, options.rounds + 1):
        bare, same_work, results = await one_round(reactor, options, per_gateway, round_)
        bare_rates.append(bare)
        base = same_work["rate"]
        base_rates.append(base)
        commit_micros.append(1e6 * same_work["committing"] / n)
        for stage, details in results.items():
            stage_rates.setdefault(stage, []).append(details["rate"])
        plugin = results["durable"]["rate"]
        print(
            f"{round_:5d} {base:14,.0f} /s   {plugin:20,.0f} /s   {plugin / base:6.2f} "
            f"{results['durable']['per_commit']:7.0f}/{same_work['per_commit']:<4.0f} "
            f"{bare:14,.0f} /s"
        )
    bare = statistics.median(bare_rates)
    base = statistics.median(base_rates)
    medians = {stage: statistics.median(rates) for stage, rates in stage_rates.items()}
    storing = statistics.median(commit_micros)
    plugin = medians["durable"]
    print(f"{'median':>5} {base:14,.0f} /s   {plugin:20,.0f} /s   {plugin / base:6.2f}")
    labels = STAGES if options.stages else {"durable": STAGES["durable"]}
    print(f"where the time goes (medians of {options.rounds} rounds):")
    print(f"  {'contender':60} {'reports/s':>10} {'x same':>7} {'us/report':>10} {'added':>6}")
    print(
        f"  {'bare paho, counting only (for information)':60} {bare:10,.0f} "
        f"{bare / base:7.2f} {1e6 / bare:10.1f}"
    )
    print(
        f"  {'same-work baseline (the reference): paho, decode, executemany':60} "
        f"{base:10,.0f} {1.0:7.2f} {1e6 / base:10.1f}"
    )
    print(
        f"  {'  of which executemany and commit (fsync), in the same thread':60} "
        f"{'':10} {'':7} {storing:10.1f}"
    )
    previous = 0.0
    for stage, label in labels.items():
        micros = 1e6 / medians[stage]
        added = f"{micros - previous:6.1f}" if options.stages else ""
        print(
            f"  {label:60} {medians[stage]:10,.0f} {medians[stage] / base:7.2f} "
            f"{micros:10.1f} {added}"
        )
        previous = micros
    met = plugin >= 5000, plugin >= 0.5 * base
    print(
        f"goals (the plugin as deployed): >= 5,000 reports/s {'met' if met[0] else 'NOT met'}; "
        f">= 0.5 x the same-work baseline {'met' if met[1] else 'NOT met'} "
        f"({plugin / base:.2f})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", type=int, default=50_000)
    parser.add_argument("--gateways", type=int, default=10)
    parser.add_argument("--meters", type=int, default=30)
    parser.add_argument("--sync", choices=["full", "normal"], default="full")
    parser.add_argument("--rounds", type=int, default=3, help="medians are reported")
    parser.add_argument(
        "--batch",
        type=int,
        default=500,
        help="rows a transaction in the same-work baseline (executemany)",
    )
    parser.add_argument(
        "--no-stages",
        dest="stages",
        action="store_false",
        help="drain only the whole plugin, not each stage",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
