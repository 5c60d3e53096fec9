"""Power-bank benchmark: frames/s through the whole daemon, and memory per idle cabinet.

Usage: ``python bench/powerbank.py [--cabinets 100] [--frames 2000] [--idle 10000]``

1. Throughput. A ``Daemon`` (config loaded from YAML: one ``powerbank`` plugin with
   ``emit_heartbeats: true`` and no per-connection rate limit, one ``sqlite`` sink, a route for
   every event) runs on this process's reactor. A separate process,
   ``gatewayd simulate powerbank --flood N``, connects ``--cabinets`` cabinets on loopback and
   writes ``--frames`` heartbeats each as fast as TCP takes them. Every frame is split, parsed
   and CRC-checked, updates the cabinet's state and becomes a ``heartbeat`` event that is
   committed to the durable queue (``queue_sync: full``). Timed from the first frame's event to
   the last one durable; also until the sqlite sink has them all.
   Baseline, same run and same generator: a bare Twisted ``LineOnlyReceiver`` server that only
   counts lines. The ratio is daemon frames/s divided by baseline lines/s.
2. Memory. ``python -m gatewayd run`` as a child with the same plugin; ``--idle`` cabinets
   connect (one heartbeat each, then silence) from a generator process. Resident memory
   (``VmRSS``) of the daemon before and after, per cabinet.

Goals on the reference box: >= 15,000 frames/s; 10,000 cabinets under 300 MB RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from twisted.internet import defer, protocol, task
from twisted.protocols.basic import LineOnlyReceiver

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.config import load_config  # noqa: E402
from gatewayd.testing import free_port, wait_for_port  # noqa: E402

GOAL_FPS = 15_000
GOAL_RSS_MB = 300


def raise_open_files() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def write_config(directory: Path, device_port: int, api_port: int | None) -> Path:
    api = f'{{listen: "127.0.0.1:{api_port}"}}' if api_port else "{enabled: false}"
    config = directory / "gatewayd.yaml"
    config.write_text(
        f"""\
gateway: {{id: bench, state_dir: {directory / "state"}, log_level: warn}}
api: {api}
plugins:
  cabinets:
    type: powerbank
    listen: "127.0.0.1:{device_port}"
    emit_heartbeats: true
    rate_limit: null
    heartbeat_interval: 1h
    max_connections: 20000
sinks:
  store: {{type: sqlite, path: {directory / "events.db"}}}
routes:
  - {{match: {{type: "*"}}, sinks: [store]}}
"""
    )
    return config


def generator(port: int, cabinets: int, flood: int, connect_rate: float = 1000) -> subprocess.Popen:
    """The load generator: simulated cabinets in their own process."""
    command = [
        sys.executable, "-m", "gatewayd", "simulate", "powerbank",
        "--connect", f"127.0.0.1:{port}", "--cabinets", str(cabinets),
        "--heartbeat", "3600", "--return-interval", "0", "--duplicate-rate", "0",
        "--connect-rate", str(connect_rate),
    ]  # fmt: skip
    if flood:
        command += ["--flood", str(flood)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Counter:
    """When the first and the last of ``expected`` things happened."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first: float | None = None
        self.done: defer.Deferred = defer.Deferred()

    def start(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def tick(self, _: object = None) -> None:
        self.count += 1
        if self.count == self.expected:
            self.done.callback(time.perf_counter() - (self.first or 0.0))


async def daemon_throughput(reactor, directory: Path, cabinets: int, frames: int) -> dict:
    from gatewayd.service import Daemon

    port = free_port()
    config = load_config(write_config(directory, port, None))
    daemon = Daemon(config, reactor)
    expected = cabinets * (frames + 1)  # the heartbeat sent on connecting, then the flood
    counter = Counter(expected)
    emit = daemon.emit

    def counting_emit(event):
        durable = emit(event)
        if event.type == "heartbeat":
            counter.start()
            durable.addCallback(counter.tick)
        return durable

    daemon.emit = counting_emit  # the plugin host binds daemon.emit when the daemon starts
    await daemon.start()
    load = generator(port, cabinets, frames)
    try:
        durable_seconds = await counter.done.addTimeout(300, reactor)
        runner = daemon.sinks["store"]
        while runner.queue.depth > 0:
            await task.deferLater(reactor, 0.01, lambda: None)
        delivered_seconds = time.perf_counter() - counter.first
    finally:
        stop(load)
        await daemon.stop()
    return {
        "frames": expected,
        "durable_s": durable_seconds,
        "durable_fps": expected / durable_seconds,
        "delivered_s": delivered_seconds,
        "delivered_fps": expected / delivered_seconds,
    }


class CountingLines(LineOnlyReceiver):
    """The baseline: a bare line server that only counts."""

    delimiter = b"\n"
    MAX_LENGTH = 512

    def lineReceived(self, line: bytes) -> None:
        counter = self.factory.counter
        counter.start()
        counter.tick()


async def baseline_throughput(reactor, cabinets: int, frames: int) -> dict:
    expected = cabinets * (frames + 1)
    factory = protocol.ServerFactory.forProtocol(CountingLines)
    factory.noisy = False
    factory.counter = Counter(expected)
    port = reactor.listenTCP(0, factory, backlog=1024, interface="127.0.0.1")
    load = generator(port.getHost().port, cabinets, frames)
    try:
        seconds = await factory.counter.done.addTimeout(300, reactor)
    finally:
        stop(load)
        await port.stopListening()
    return {"frames": expected, "seconds": seconds, "fps": expected / seconds}


def count_online(api_port: int) -> int:
    """Online devices, read from the control API page by page."""
    online, offset = 0, 0
    while offset is not None:
        url = f"http://127.0.0.1:{api_port}/api/v1/devices?online=true&limit=10000&offset={offset}"
        with urllib.request.urlopen(url) as response:
            page = json.load(response)
        online += len(page["devices"])
        offset = page["next_offset"]
    return online


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def connections(api_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("gatewayd_plugin_connections{"):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def idle_memory(directory: Path, cabinets: int) -> dict:
    device_port, api_port = free_port(), free_port()
    config = write_config(directory, device_port, api_port)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    load = None
    try:
        wait_for_port(api_port, timeout=30)
        time.sleep(1.0)
        before = rss_kib(daemon.pid)
        started = time.monotonic()
        load = generator(device_port, cabinets, 0, connect_rate=2000)
        deadline = started + 120
        while connections(api_port) < cabinets:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {connections(api_port)} of {cabinets} connected")
            time.sleep(0.5)
        connect_seconds = time.monotonic() - started
        time.sleep(3.0)  # the online events reach the sink; the daemon is idle again
        after = rss_kib(daemon.pid)
        online = count_online(api_port)
    finally:
        if load is not None:
            stop(load)
        stop(daemon)
    return {
        "cabinets": cabinets,
        "online": online,
        "connect_s": connect_seconds,
        "rss_before_mb": before / 1024,
        "rss_after_mb": after / 1024,
        "kib_per_cabinet": (after - before) / cabinets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cabinets", type=int, default=100, help="throughput: cabinets")
    parser.add_argument("--frames", type=int, default=2000, help="throughput: frames per cabinet")
    parser.add_argument("--idle", type=int, default=10_000, help="memory: idle cabinets")
    options = parser.parse_args()
    limit = raise_open_files()
    if limit < options.idle + 200:
        sys.exit(f"RLIMIT_NOFILE is {limit}: too low for --idle {options.idle}")
    results: dict = {}

    async def throughput(reactor) -> None:
        with tempfile.TemporaryDirectory(prefix="gatewayd-bench-pb-") as tmp:
            results["baseline"] = await baseline_throughput(
                reactor, options.cabinets, options.frames
            )
            results["daemon"] = await daemon_throughput(
                reactor, Path(tmp), options.cabinets, options.frames
            )

    try:
        task.react(lambda reactor: defer.ensureDeferred(throughput(reactor)))
    except SystemExit as exc:
        if exc.code:
            raise
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-pb-mem-") as tmp:
        results["memory"] = idle_memory(Path(tmp), options.idle)

    base, daemon, memory = results["baseline"], results["daemon"], results["memory"]
    cpu = os.cpu_count()
    print(f"powerbank benchmark ({cpu} CPUs; generator in its own process; loopback)")
    print(f"{'':52} {'frames':>8} {'seconds':>8} {'frames/s':>10} {'ratio':>6}")
    rows = [
        ("baseline: bare LineOnlyReceiver counting lines", base["frames"], base["seconds"],
         base["fps"]),
        ("daemon: socket -> codec -> state -> durable queue", daemon["frames"],
         daemon["durable_s"], daemon["durable_fps"]),
        ("daemon: ... -> delivered to the sqlite sink", daemon["frames"], daemon["delivered_s"],
         daemon["delivered_fps"]),
    ]  # fmt: skip
    for label, frames, seconds, fps in rows:
        print(f"{label:52} {frames:8d} {seconds:8.2f} {fps:10,.0f} {fps / base['fps']:6.2f}")
    verdict = "ok" if daemon["durable_fps"] >= GOAL_FPS else "BELOW GOAL"
    print(f"goal >= {GOAL_FPS:,} frames/s durable: {verdict}")
    print(
        f"idle cabinets: {memory['online']}/{memory['cabinets']} online after "
        f"{memory['connect_s']:.1f} s; daemon RSS {memory['rss_before_mb']:.1f} MB -> "
        f"{memory['rss_after_mb']:.1f} MB = {memory['kib_per_cabinet']:.1f} KiB per cabinet"
    )
    verdict = "ok" if memory["rss_after_mb"] < GOAL_RSS_MB else "ABOVE GOAL"
    print(f"goal {memory['cabinets']:,} cabinets under {GOAL_RSS_MB} MB RSS: {verdict}")


if __name__ == "__main__":
    main()
