"""ESAM plugin benchmark: operations per second through the control API and the serial path.

Usage: ``python bench/esam.py [--ops N] [--clients N] [--serial-ops N] [--function NAME]``

Measured in one run, on one real reactor:

1. Software backend (``backend: soft``):
   * baseline: direct ``SoftBackend.call(function, args)`` in a loop (validation + crypto);
   * plugin: the command as the control API calls it (``Command.call``: validation, the
     one-at-a-time queue, the ``esam.operation`` event into an in-memory collector);
   * API: ``POST /api/v1/plugins/esam/commands/<function>`` over HTTP/1.1 keep-alive from
     ``--clients`` concurrent connections in a separate client process.
   Each rate is printed with its ratio to the baseline.
2. Serial path (``backend: reader``) at 115200 baud 8N1 against the reader simulator on a pty
   (``gatewayd simulate esam --pty`` in a subprocess): operations per second with a few calls
   queued at once, the bytes on the line per operation (both directions, counted by the link),
   and the line's limit = (115200 / 10 bytes/s) / bytes per operation. A pty ignores the baud
   rate, so the achieved rate can exceed that limit; a real 115200-baud line cannot.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.plugins.esam import EsamPlugin  # noqa: E402
from gatewayd.plugins.esam.keys import load_key_file  # noqa: E402
from gatewayd.plugins.esam.simulator import demo_key_copy  # noqa: E402
from gatewayd.plugins.esam.soft import SoftBackend  # noqa: E402

from gatewayd.api import build_site  # noqa: E402
from gatewayd.config_model import ApiSection  # noqa: E402
from gatewayd.testing import PluginHarness  # noqa: E402

BAUD = 115200
BITS_PER_BYTE = 10  # 8N1: start + 8 data + stop

ARGUMENTS = {
    "identity_authentication": {"flag": 0, "div": "0000000000000001"},
    "user_control": {
        "flag": 0,
        "rand": "271789B1",
        "div": "0000000000000001",
        "esam_no": "0001111100000032",
        "data": "1A00140730104001",
    },
    "parameter_update": {
        "flag": 0,
        "rand": "B4C8C420",
        "div": "0000000000000001",
        "apdu": "04D6811008",
        "data": "00002209",
    },
}

CLIENT = r"""
import http.client, json, sys, threading, time
port, path, body = sys.argv[1], sys.argv[2], sys.argv[3].encode()
clients, count = int(sys.argv[4]), int(sys.argv[5])
errors = []
def work(n):
    conn = http.client.HTTPConnection("127.0.0.1", int(port))
    for _ in range(n):
        conn.request("POST", path, body, {"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            errors.append(response.status)
    conn.close()
work(5)  # warm up one connection
threads = [threading.Thread(target=work, args=(count // clients,)) for _ in range(clients)]
started = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"seconds": time.perf_counter() - started, "ops": count // clients * clients,
                  "errors": len(errors)}))
"""


class _Host:
    def __init__(self, harness: PluginHarness) -> None:
        self.name, self.type_name, self.state, self.error = "esam", "esam", "running", None
        self.plugin, self.context = harness.plugin, harness.context


class _Daemon:
    """The view of the daemon the control API reads."""

    def __init__(self, reactor: Any, harness: PluginHarness) -> None:
        self.reactor, self.gateway_id, self.api_token, self.reactor_lag = reactor, "bench", None, 0
        self.plugins = {"esam": _Host(harness)}
        self.sinks: dict[str, Any] = {}
        self.pipeline = type("P", (), {"routed": 0, "unrouted": 0, "dropped": 0})()


def rate(ops: int, seconds: float) -> float:
    return ops / seconds if seconds > 0 else float("inf")


def bench_direct(key_file: Path, function: str, ops: int) -> float:
    backend = SoftBackend(load_key_file(key_file))
    backend.open_device()
    args = ARGUMENTS[function]
    for _ in range(200):
        backend.call(function, args)
    started = time.perf_counter()
    for _ in range(ops):
        backend.call(function, args)
    return rate(ops, time.perf_counter() - started)


async def bench_plugin(harness: PluginHarness, function: str, ops: int) -> float:
    args = ARGUMENTS[function]
    command = harness.plugin.commands()[function]
    for _ in range(200):
        await command.call(args)
    harness.collector.events.clear()
    started = time.perf_counter()
    for _ in range(ops):
        await command.call(args)
    elapsed = time.perf_counter() - started
    assert len(harness.collector.of_type("esam.operation")) == ops
    return rate(ops, elapsed)


async def bench_api(reactor: Any, harness: PluginHarness, function: str, ops: int, clients: int):
    site = build_site(_Daemon(reactor, harness), ApiSection(listen="127.0.0.1:0"))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        path = f"/api/v1/plugins/esam/commands/{function}"
        output = await utils.getProcessOutput(
            sys.executable,
            [
                "-c",
                CLIENT,
                str(port.getHost().port),
                path,
                json.dumps(ARGUMENTS[function]),
                str(clients),
                str(ops),
            ],
            env=os.environ,
            errortoo=True,
        )
        result = json.loads(output.decode().strip().splitlines()[-1])
    finally:
        await port.stopListening()
    if result["errors"]:
        raise RuntimeError(f"{result['errors']} API calls failed")
    return rate(result["ops"], result["seconds"])


async def bench_serial(reactor: Any, function: str, ops: int, in_flight: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="gatewayd-bench-esam-"))
    link = workdir / "reader"
    simulator = subprocess.Popen(
        [sys.executable, "-m", "gatewayd", "simulate", "esam", "--pty", "--link", str(link)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        simulator.stdout.readline()
        harness = PluginHarness(
            EsamPlugin,
            {"backend": "reader", "port": str(link), "baudrate": BAUD, "max_queue": 64},
            name="esam",
            state_dir=workdir,
        )
        await harness.start()
        await harness.collector.wait_for("device.online").addTimeout(10, reactor)
        command = harness.plugin.commands()[function]
        args = ARGUMENTS[function]
        for _ in range(50):
            await command.call(args)
        link_stats = harness.plugin.link
        bytes_before = link_stats.bytes_in + link_stats.bytes_out
        frames_before = link_stats.frames_in + link_stats.frames_out
        started = time.perf_counter()
        remaining = ops
        while remaining:
            batch = min(in_flight, remaining)
            await defer.gatherResults([command.call(args) for _ in range(batch)])
            remaining -= batch
        elapsed = time.perf_counter() - started
        line_bytes = link_stats.bytes_in + link_stats.bytes_out - bytes_before
        frames = link_stats.frames_in + link_stats.frames_out - frames_before
        await harness.stop()
    finally:
        simulator.terminate()
        simulator.wait(10)
    per_op = line_bytes / ops
    limit = BAUD / BITS_PER_BYTE / per_op
    achieved = rate(ops, elapsed)
    return {
        "ops_per_s": achieved,
        "bytes_per_op": per_op,
        "frames_per_op": frames / ops,
        "limit_ops_per_s": limit,
        "percent_of_limit": 100 * achieved / limit,
    }


async def run(reactor: Any, options: argparse.Namespace) -> None:
    key_file = demo_key_copy()
    try:
        harness = PluginHarness(
            EsamPlugin,
            {"backend": "soft", "key_file": str(key_file), "max_queue": 256},
            name="esam",
        )
        await harness.start()
        print(f"software backend, {options.function}, {options.ops} operations each")
        direct = bench_direct(key_file, options.function, options.ops)
        print(f"  direct SoftBackend.call      {direct:10,.0f} ops/s   (baseline)")
        plugin = await bench_plugin(harness, options.function, options.ops)
        print(f"  plugin command (no HTTP)     {plugin:10,.0f} ops/s   ratio {plugin / direct:.3f}")
        api = await bench_api(reactor, harness, options.function, options.ops, options.clients)
        print(
            f"  control API, {options.clients} connections   {api:10,.0f} ops/s   "
            f"ratio {api / direct:.3f}"
        )
        await harness.stop()
    finally:
        key_file.unlink()
    print(f"serial path, gatewayd-v1 framing, {BAUD} baud 8N1, {options.serial_ops} operations")
    for function in ("identity_authentication", "user_control"):
        serial = await bench_serial(reactor, function, options.serial_ops, options.in_flight)
        print(
            f"  {function:24s} {serial['ops_per_s']:8,.0f} ops/s   "
            f"{serial['bytes_per_op']:.0f} bytes and {serial['frames_per_op']:.0f} frames per op; "
            f"line limit {serial['limit_ops_per_s']:.1f} ops/s; "
            f"{serial['percent_of_limit']:.0f}% of it (a pty ignores the baud rate)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--serial-ops", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--function", choices=sorted(ARGUMENTS), default="identity_authentication")
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, options)))


if __name__ == "__main__":
    main()
