"""Heating benchmark: meter reports/s from mosquitto through decode into the durable queue.

Usage: ``python bench/heating.py [--reports N] [--gateways G] [--meters M] [--sync full|normal]
[--rounds R] [--no-stages]``

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
publishes the stream again, and the medians are compared.

Where the time goes is measured the same way, not in a loop of its own (in-process loops run
2-3x faster than the same code between paho's reads and SQLite's thread): the same backlog is
drained by the plugin cut short at each stage (the MQTT link alone; + decoding; + the plugin and
its events, routed nowhere; + the durable queue, which is the plugin as deployed), and the
microseconds a report each stage adds are printed.
Goals: >= 5,000 reports/s and >= 0.5 x the bare subscriber.

The stream is built by the codecs, so a report that becomes ``frame.invalid`` stops the run with
its reason, and a stage that does not finish in 600 s says how far it got.
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
from gatewayd.protocols import cjt188, hygw  # noqa: E402

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
) -> tuple[float, dict[str, dict[str, Any]]]:
    """(bare reports/s, {stage: plugin details}) for one published stream."""
    n = options.reports
    stages = list(STAGES) if options.stages else ["durable"]
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-") as tmp:
        directory = Path(tmp)
        broker = Broker(directory)
        try:
            for name in ["bare", *stages]:
                open_session(broker.port, f"bench-{name}")
            publish(broker.port, per_gateway)
            time.sleep(0.5)  # let the broker finish queueing
            bare_count, bare_seconds = drain_bare(broker.port, "bench-bare", n, timeout=120)
            results = {}
            for stage in stages:
                results[stage] = await drain_plugin(
                    reactor, broker.port, f"bench-{stage}", n, directory, options.sync, stage
                )
        finally:
            broker.stop()
    counts = [bare_count] + [r["durable"] for r in results.values()]
    if any(count != n for count in counts):
        raise RuntimeError(f"round {round_}: expected {n} reports, counted {counts}")
    for details in results.values():
        details["rate"] = details["durable"] / details["seconds"]
    return bare_count / bare_seconds, results


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
    bare_rates: list[float] = []
    stage_rates: dict[str, list[float]] = {}
    for round_ in range(1, options.rounds + 1):
        bare, results = await one_round(reactor, options, per_gateway, round_)
        bare_rates.append(bare)
        for stage, details in results.items():
            stage_rates.setdefault(stage, []).append(details["rate"])
        plugin = results["durable"]["rate"]
        print(
            f"{round_:5d} {bare:18,.0f} /s   {plugin:20,.0f} /s   {plugin / bare:6.2f} "
            f"{results['durable']['per_commit']:14.0f}"
        )
    bare = statistics.median(bare_rates)
    medians = {stage: statistics.median(rates) for stage, rates in stage_rates.items()}
    plugin = medians["durable"]
    print(f"{'median':>5} {bare:18,.0f} /s   {plugin:20,.0f} /s   {plugin / bare:6.2f}")
    if options.stages:
        print(f"where the time goes (medians; bare paho: {1e6 / bare:.0f} us a report):")
        print(f"  {'stage':58} {'reports/s':>10} {'x bare':>7} {'us/report':>10} {'added':>6}")
        previous = 0.0
        for stage, label in STAGES.items():
            micros = 1e6 / medians[stage]
            print(
                f"  {label:58} {medians[stage]:10,.0f} {medians[stage] / bare:7.2f} "
                f"{micros:10.1f} {micros - previous:6.1f}"
            )
            previous = micros
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
