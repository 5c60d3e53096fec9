"""Heating benchmark: meter reports/s from mosquitto through decode into the durable queue.

Usage: ``python bench/heating.py [--reports N] [--gateways G] [--meters M] [--sync full|normal]
[--rounds R]``

Both contenders read the same stream, in the same run:

* ``bare paho``: a paho-mqtt 2.x subscriber (its own network thread, ``loop_start``) that only
  counts messages;
* ``heating plugin``: the plugin's reactor-driven MQTT client, hy/gw decode, CJ/T 188 parse and
  payload decode, one ``meter.reading`` event per report through ``Pipeline`` into a
  ``QueueStore`` queue; a report counts once its event is durable (committed, ``--sync``).

How the stream is fed: a mosquitto of its own (``queue_qos0_messages``, unbounded queues, no
persistence) holds a persistent session for each contender. The sessions are created, the
clients leave, ``mosquitto_pub -l`` publishes the reports (built by the heating simulator's
meters and the codecs: 55H, 53H and heat-meter frames, one topic per gateway), and then each
contender connects and drains its backlog at its own best speed. So the publisher's speed does
not limit either side. Rate = reports / (last counted - first received); each of ``--rounds``
publishes the stream again, and the medians are compared. A per-stage cost table (in-process,
no broker) shows where the plugin's time goes.
Goals: >= 5,000 reports/s and >= 0.5 x the bare subscriber.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from gatewayd.protocols import hygw  # noqa: E402

from gatewayd.config_model import RouteConfig  # noqa: E402
from gatewayd.events import Event  # noqa: E402
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


async def drain_plugin(
    reactor: Any, port: int, client_id: str, expected: int, directory: Path, sync: str
) -> dict[str, Any]:
    """Run the heating plugin into a durable queue until ``expected`` readings are durable."""
    store = QueueStore(directory / "queues", reactor, sync=sync)
    store.start()
    queue = store.queue("store", max_bytes=4 * 1024**3, max_age=86400.0, overflow="drop_oldest")
    await store.ready()
    pipeline = Pipeline([RouteConfig(match={"type": "*"}, sinks=["store"])], {"store": queue})
    durable = 0
    invalid = 0
    first = 0.0
    finished: defer.Deferred = defer.Deferred()

    def counted(result: Any) -> Any:
        nonlocal durable
        durable += 1
        if durable == expected:
            finished.callback(time.perf_counter())
        return result

    def sink(event: Event) -> defer.Deferred:
        nonlocal invalid
        d = pipeline.emit(event)
        if event.type == "meter.reading":
            d.addCallback(counted)
        elif event.type == "frame.invalid":
            invalid += 1
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
    original = plugin.on_mqtt_message

    def first_seen(*args: Any) -> Any:
        nonlocal first
        if not first:
            first = time.perf_counter()
        return original(*args)

    plugin.on_mqtt_message = first_seen
    plugin.start()
    plugin.link.on_message = first_seen
    finished.addTimeout(600, reactor)
    last = await finished
    await plugin.stop()
    await store.stop()
    return {
        "durable": durable,
        "seconds": last - first,
        "invalid": invalid,
        "per_commit": store.committed / max(1, store.commits),
        "messages_in": plugin.context.metrics.frames_in,
    }


def stage_costs(per_gateway: dict[str, list[bytes]], limit: int = 5000) -> list[tuple[str, float]]:
    """Microseconds per report of each decoding stage, measured in this process (no broker)."""
    from gatewayd.protocols import cjt188

    from gatewayd.pipeline import encode_event

    messages = [
        (hygw.topic("set", gw_id), payload)
        for gw_id, payloads in per_gateway.items()
        for payload in payloads
    ][:limit]
    n = len(messages)
    started = time.perf_counter()
    decoded = [hygw.decode_message(payload, topic=topic) for topic, payload in messages]
    t_envelope = time.perf_counter()
    frames = [cjt188.parse_hex(message.frames[0]) for message in decoded]
    t_frame = time.perf_counter()
    payloads = [cjt188.decode_payload(frame) for frame in frames]
    t_payload = time.perf_counter()
    events = [
        Event(type="meter.reading", device="27100000203400", data=data, raw="00")
        for data in payloads
    ]
    t_event = time.perf_counter()
    for event in events:
        encode_event(event)
    t_encode = time.perf_counter()
    return [
        ("hy/gw envelope (hygw.decode_message)", (t_envelope - started) / n * 1e6),
        ("CJ/T 188 frame (cjt188.parse_hex)", (t_frame - t_envelope) / n * 1e6),
        ("payload fields (cjt188.decode_payload)", (t_payload - t_frame) / n * 1e6),
        ("event object (Event)", (t_event - t_payload) / n * 1e6),
        ("event JSON (pipeline encode_event)", (t_encode - t_event) / n * 1e6),
    ]


async def one_round(
    reactor: Any, options: argparse.Namespace, per_gateway: dict[str, list[bytes]], round_: int
) -> tuple[float, float, dict[str, Any]]:
    """(bare reports/s, plugin reports/s, plugin details) for one published stream."""
    n = options.reports
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        directory = Path(tmp)
        broker = Broker(directory)
        try:
            open_session(broker.port, "bench-bare")
            open_session(broker.port, "bench-plugin")
            publish(broker.port, per_gateway)
            time.sleep(0.5)  # let the broker finish queueing
            bare_count, bare_seconds = drain_bare(broker.port, "bench-bare", n, timeout=120)
            plugin = await drain_plugin(
                reactor, broker.port, "bench-plugin", n, directory, options.sync
            )
        finally:
            broker.stop()
    if bare_count != n or plugin["durable"] != n:
        raise RuntimeError(f"round {round_}: bare got {bare_count}, plugin {plugin['durable']}")
    return bare_count / bare_seconds, plugin["durable"] / plugin["seconds"], plugin


async def main(reactor: Any, options: argparse.Namespace) -> None:
    n = options.reports
    per_gateway = build_reports(n, options.gateways, options.meters)
    size = sum(len(p) for payloads in per_gateway.values() for p in payloads) / n
    print(
        f"heating benchmark: {n} reports from {options.gateways} gateways x {options.meters} "
        f"meters (55H/53H/heat meter), {size:.0f} bytes each, queue sync={options.sync}"
    )
    print(
        f"{'round':>5} {'bare paho (count only)':>24} {'heating plugin (durable)':>26} "
        f"{'ratio':>6} {'events/commit':>14}"
    )
    bare_rates, plugin_rates = [], []
    for round_ in range(1, options.rounds + 1):
        bare, plugin, details = await one_round(reactor, options, per_gateway, round_)
        bare_rates.append(bare)
        plugin_rates.append(plugin)
        print(
            f"{round_:5d} {bare:18,.0f} /s   {plugin:20,.0f} /s   {plugin / bare:6.2f} "
            f"{details['per_commit']:14.0f}"
        )
    bare, plugin = statistics.median(bare_rates), statistics.median(plugin_rates)
    print(f"{'median':>5} {bare:18,.0f} /s   {plugin:20,.0f} /s   {plugin / bare:6.2f}")
    print("cost per report of the decoding stages, in this process (microseconds):")
    for label, micros in stage_costs(per_gateway):
        print(f"  {label:44} {micros:6.1f}")
    met = plugin >= 5000, plugin >= 0.5 * bare
    print(
        f"goals: >= 5,000 reports/s {'met' if met[0] else 'NOT met'}; "
        f">= 0.5 x bare {'met' if met[1] else 'NOT met'}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", type=int, default=50_000)
    parser.add_argument("--gateways", type=int, default=10)
    parser.add_argument("--meters", type=int, default=30)
    parser.add_argument("--sync", choices=["full", "normal"], default="full")
    parser.add_argument("--rounds", type=int, default=3, help="medians are reported")
    return parser.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options)))
