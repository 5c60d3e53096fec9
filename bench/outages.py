"""Outage benchmark: does the daemon's memory keep rising over repeated sink outages?

Usage: ``python bench/outages.py [--cabinets 1000] [--outage 30] [--outages 3] [--tracemalloc]``
(as root, for a size-limited tmpfs; else ``--fault pagecount``).

The daemon runs as its own process: ``bench/outages.py --daemon CONFIG`` is ``python -m gatewayd
run -c CONFIG`` with one addition, a SIGUSR2 hook the benchmark uses at the end to look inside
(``gc`` counts, optionally ``tracemalloc``'s top allocations, and glibc's ``malloc_trim(0)``
with the resident size before and after it). Load: ``gatewayd simulate powerbank`` with
``--cabinets`` cabinets sending a heartbeat every second (``emit_heartbeats: true``: one event
each), so about ``--cabinets`` events/s. One sqlite sink (``retention: 1m``,
``replay_rate: 2000``) writes its file on a tmpfs of ``--tmpfs-mb``.

An outage fills that tmpfs with a filler file: the sink's writes fail with SQLite's "database or
disk is full", as on the soak's full disk, while the queue (on the normal disk) takes the backlog.
After ``--outage`` seconds the filler goes, the sink replays, and the benchmark waits until the
queue is empty. ``--fault pagecount`` instead caps the sink file's ``max_page_count`` in the
daemon (a flag file the hook polls), as ``tests/test_queue_faults.py`` does for queues.

``--tracemalloc`` traces allocations in the daemon (one frame each); it costs so much CPU that
the daemon keeps up only with a few hundred events/s (use ``--cabinets 300``).

Resident memory (``VmRSS``) is sampled before, during and after each outage and once the replay
is through and the daemon has settled. Baseline, same run: the settled RSS after the warm-up,
before any outage; every figure is also shown as the ratio to it. Verdict: "keeps rising" when
each outage's settled RSS is above the previous one's by more than ``--tolerance-mb``, else
"plateaus".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gatewayd.testing import free_port, wait_for_port  # noqa: E402

MIB = 1024 * 1024


# --- the daemon side: python -m gatewayd run, plus the hook --------------------------------


def run_daemon(config: str) -> None:
    """In the child: install the hook, then run gatewayd exactly as ``python -m gatewayd``."""
    import runpy

    if os.environ.get("OUTAGES_TRACEMALLOC"):
        import tracemalloc

        tracemalloc.start(1)
    signal.signal(signal.SIGUSR2, lambda *_: _inspect(Path(config).parent))
    flag = os.environ.get("OUTAGES_PAGECOUNT_FLAG")
    if flag:
        _cap_pages_while(Path(flag))
    sys.argv = ["gatewayd", "run", "-c", config]
    runpy.run_module("gatewayd", run_name="__main__", alter_sys=True)


def _inspect(directory: Path) -> None:
    """SIGUSR2: read ``hook.cmd`` (``stats`` or ``trim``), write ``hook.json``."""
    import ctypes
    import gc
    from collections import Counter

    command = (directory / "hook.cmd").read_text().strip()
    result: dict = {"rss_kib": rss_kib(os.getpid()), "gc_counts": gc.get_count()}
    kinds = Counter(type(o).__name__ for o in gc.get_objects())
    result["objects"] = sum(kinds.values())
    result["top_types"] = kinds.most_common(12)
    with contextlib.suppress(ImportError):
        import tracemalloc

        if tracemalloc.is_tracing():
            snapshot = tracemalloc.take_snapshot()
            stats = snapshot.statistics("lineno")[:12]
            result["traced_kib"] = tracemalloc.get_traced_memory()[0] // 1024
            result["tracemalloc_top"] = [(str(s.traceback[0]), s.size // 1024) for s in stats]
    if command == "trim":
        started = time.perf_counter()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        result["trim_ms"] = (time.perf_counter() - started) * 1000
        result["rss_after_trim_kib"] = rss_kib(os.getpid())
    (directory / "hook.json").write_text(json.dumps(result))


def _cap_pages_while(flag: Path) -> None:
    """``--fault pagecount``: while ``flag`` exists the sqlite sink's file gets no new page."""
    from gatewayd.sinks.sqlite import SqliteSink

    write = SqliteSink.write_blocking

    def capped(self, events):  # type: ignore[no-untyped-def]
        conn = self._conn
        if flag.exists():
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count={pages}")
        else:
            conn.execute("PRAGMA max_page_count=4294967294")
        return write(self, events)

    SqliteSink.write_blocking = capped


# --- the benchmark side ----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric(api_port: int, name: str) -> float:
    """The first sample of ``name`` on ``/metrics`` (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=60) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def write_config(directory: Path, sink_dir: Path, device_port: int, api_port: int) -> Path:
    config = directory / "gatewayd.yaml"
    config.write_text(
        f"""\
gateway: {{id: bench, state_dir: {directory / "state"}, log_level: warn}}
api: {{listen: "127.0.0.1:{api_port}"}}
plugins:
  cabinets:
    type: powerbank
    listen: "127.0.0.1:{device_port}"
    emit_heartbeats: true
    rate_limit: null
    heartbeat_interval: 1h
    max_connections: 20000
sinks:
  store:
    type: sqlite
    path: {sink_dir / "events.db"}
    retention: 1m
    replay_rate: 2000
    retry_max: 2s
routes:
  - {{match: {{type: "*"}}, sinks: [store]}}
"""
    )
    return config


class Disk:
    """Where the sink's file lives, and how an outage fills it."""

    def __init__(self, directory: Path, fault: str, size_mb: int) -> None:
        self.directory = directory
        self.fault = fault
        self.flag = directory.parent / "pagecount.flag"
        directory.mkdir()
        if fault == "tmpfs":
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs", directory],
                check=True,
            )

    def fill(self) -> None:
        if self.fault == "pagecount":
            self.flag.touch()
            return
        with open(self.directory / "filler", "wb") as filler:
            chunk = b"\0" * MIB
            with contextlib.suppress(OSError):
                while True:
                    filler.write(chunk)
                    filler.flush()

    def free(self) -> None:
        self.flag.unlink(missing_ok=True)
        (self.directory / "filler").unlink(missing_ok=True)

    def close(self) -> None:
        self.free()
        if self.fault == "tmpfs":
            subprocess.run(["umount", self.directory], check=False)


class Daemon:
    """The daemon process, its API and its hook."""

    def __init__(self, config: Path, api_port: int, env: dict) -> None:
        self.config = config
        self.api_port = api_port
        command = [sys.executable, __file__, "--daemon", str(config)]
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)

    def rss_mb(self) -> float:
        return rss_kib(self.proc.pid) / 1024

    def queued(self) -> float:
        return metric(self.api_port, "gatewayd_sink_queued_events")

    def sink_up(self) -> bool:
        return metric(self.api_port, "gatewayd_sink_up") == 1.0

    def queue_disk_mb(self) -> float:
        return metric(self.api_port, "gatewayd_queue_disk_bytes") / MIB

    def hook(self, command: str) -> dict:
        directory = self.config.parent
        (directory / "hook.json").unlink(missing_ok=True)
        (directory / "hook.cmd").write_text(command)
        self.proc.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while not (directory / "hook.json").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon's hook did not answer")
            time.sleep(0.2)
        time.sleep(0.2)
        return json.loads((directory / "hook.json").read_text())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(options: argparse.Namespace, directory: Path) -> dict:
    device_port, api_port = free_port(), free_port()
    disk = Disk(directory / "sink", options.fault, options.tmpfs_mb)
    env = dict(os.environ)
    if options.tracemalloc:
        env["OUTAGES_TRACEMALLOC"] = "1"
    if options.fault == "pagecount":
        env["OUTAGES_PAGECOUNT_FLAG"] = str(disk.flag)
    config = write_config(directory, disk.directory, device_port, api_port)
    daemon = Daemon(config, api_port, env)
    load = None
    samples: list[tuple[str, float, float, float]] = []  # label, rss MB, queued, queue file MB

    def sample(label: str) -> None:
        row = (label, daemon.rss_mb(), daemon.queued(), daemon.queue_disk_mb())
        samples.append(row)
        label, rss, queued, queue_mb = row
        print(f"  {label:28} RSS {rss:6.1f} MB  queued {queued:8,.0f}  queue {queue_mb:6.1f} MB")

    try:
        wait_for_port(api_port, timeout=30)
        load = subprocess.Popen(
            [
                sys.executable, "-m", "gatewayd", "simulate", "powerbank",
                "--connect", f"127.0.0.1:{device_port}", "--cabinets", str(options.cabinets),
                "--heartbeat", "1", "--return-interval", "0", "--duplicate-rate", "0",
                "--connect-rate", "1000",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(options.warmup)
        sample("warm, before any outage")
        time.sleep(10)
        sample("baseline (settled)")
        results: dict = {"baseline": samples[-1][1], "outages": []}
        results["hook_start"] = daemon.hook("stats")
        for number in range(1, options.outages + 1):
            sample(f"outage {number}: before")
            disk.fill()
            started = time.monotonic()
            time.sleep(options.outage / 2)
            sample(f"outage {number}: during")
            time.sleep(max(0.0, options.outage - (time.monotonic() - started)))
            sample(f"outage {number}: at its end")
            disk.free()
            replay_started = time.monotonic()
            deadline = replay_started + 600
            while not (daemon.sink_up() and daemon.queued() < options.cabinets):
                if time.monotonic() > deadline:
                    raise TimeoutError("the backlog did not drain in 10 minutes")
                time.sleep(1.0)
            replay_s = time.monotonic() - replay_started
            sample(f"outage {number}: replayed ({replay_s:.0f} s)")
            time.sleep(options.settle)
            sample(f"outage {number}: settled")
            results["outages"].append(samples[-1][1])
        results["hook_end"] = daemon.hook("trim")
        results["samples"] = samples
        stop(load)  # idle: the queue's WAL is cut back at its next chore (every 10 s)
        time.sleep(12)
        sample("load stopped, idle 12 s")
        return results
    finally:
        if load is not None:
            stop(load)
        stop(daemon.proc)
        disk.close()


def report(options: argparse.Namespace, results: dict) -> None:
    base = results["baseline"]
    print(f"\noutages benchmark: {options.outages} x {options.outage:.0f} s outages,")
    print(f"about {options.cabinets} events/s, {os.cpu_count()} CPUs, fault: {options.fault}")
    print(f"{'':36} {'RSS MB':>8} {'ratio':>6} {'queue file + WAL MB':>20}")
    for label, rss, _, queue_mb in results["samples"]:
        print(f"{label:36} {rss:8.1f} {rss / base:6.2f} {queue_mb:20.1f}")
    settled = results["outages"]
    steps = [b - a for a, b in zip([base, *settled], settled, strict=False)]
    rising = all(step > options.tolerance_mb for step in steps[1:])
    print("settled RSS after each outage: " + ", ".join(f"{s:.1f}" for s in settled))
    print(f"  baseline {base:.1f} MB; steps " + ", ".join(f"{s:+.1f}" for s in steps) + " MB")
    verdict = "KEEPS RISING" if rising else "plateaus"
    if len(steps) < 2:
        verdict = "none (it takes two outages or more)"
    print(f"verdict: {verdict} (rising: every later outage adds > {options.tolerance_mb} MB)")
    end, start = results["hook_end"], results["hook_start"]
    print(
        f"python objects: {start['objects']:,} at baseline, {end['objects']:,} at the end;"
        f" malloc_trim(0) at the end: RSS {end['rss_kib'] / 1024:.1f} ->"
        f" {end['rss_after_trim_kib'] / 1024:.1f} MB in {end['trim_ms']:.1f} ms"
    )
    if "traced_kib" in end:
        print(f"tracemalloc: {start['traced_kib'] / 1024:.1f} MB traced at baseline,"
              f" {end['traced_kib'] / 1024:.1f} MB at the end; top at the end:")  # fmt: skip
        for where, kib in end["tracemalloc_top"]:
            print(f"  {kib:8,} KiB  {where}")
    growth = grown(start["top_types"], end["top_types"])
    print("object types that grew most: " + ", ".join(f"{k} {v:+,}" for k, v in growth))


def grown(before: list, after: list) -> list[tuple[str, int]]:  # noqa: N802
    start = dict(before)
    return sorted(((k, v - start.get(k, 0)) for k, v in after), key=lambda kv: -kv[1])[:5]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--daemon":
        run_daemon(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cabinets", type=int, default=1000, help="about this many events/s")
    parser.add_argument("--outages", type=int, default=3)
    parser.add_argument("--outage", type=float, default=30.0, help="seconds each")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the baseline")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds after each replay")
    parser.add_argument("--fault", choices=["tmpfs", "pagecount"], default="tmpfs")
    parser.add_argument("--tmpfs-mb", type=int, default=256)
    parser.add_argument("--tolerance-mb", type=float, default=1.0)
    parser.add_argument("--tracemalloc", action="store_true", help="trace in the daemon (slower)")
    options = parser.parse_args()
    if options.fault == "tmpfs" and (os.geteuid() != 0 or not shutil.which("mount")):
        sys.exit("--fault tmpfs mounts a tmpfs: run as root, or use --fault pagecount")
    with tempfile.TemporaryDirectory(prefix="gatewayd-bench-outages-") as tmp:
        results = run(options, Path(tmp))
    report(options, results)


if __name__ == "__main__":
    main()
