"""The reload plan: what a new config changes, by name, and what waits for a restart."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest_twisted

from gatewayd.config import load_config
from gatewayd.reload import keep_running_values, plan_reload, reload_record
from gatewayd.testing import free_port

BASE = """\
gateway: {{id: box1, state_dir: {state}, log_level: info}}
api: {{listen: "127.0.0.1:8720", command_timeout: 60s}}
plugins:
  thermo: {{type: example, listen: "127.0.0.1:9100"{thermo}}}
  other: {{type: example, listen: "127.0.0.1:9101"}}
sinks:
  store: {{type: sqlite, path: events.db{store}}}
  file: {{type: jsonl, path: events.jsonl}}
routes:
  - {{sinks: [store, file]}}
"""


def config(tmp_path: Path, text: str, name: str = "gatewayd.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, environ={})


def base(tmp_path: Path, thermo: str = "", store: str = "", name: str = "a.yaml", **replace):
    text = BASE.format(state=tmp_path / "state", thermo=thermo, store=store)
    for old, new in replace.items():
        text = text.replace(old.replace("_", " "), new)
    return config(tmp_path, text, name)


def test_the_same_file_changes_nothing(tmp_path):
    plan = plan_reload(base(tmp_path), base(tmp_path, name="b.yaml"))
    assert plan.empty and plan.needs_restart == []


def test_a_changed_plugin_section_restarts_that_plugin_only(tmp_path):
    new = base(tmp_path, thermo=", max_line: 512", name="b.yaml")
    plan = plan_reload(base(tmp_path), new)
    assert plan.plugins.changed == ["thermo"]
    assert not (plan.plugins.added or plan.plugins.removed or plan.sinks or plan.routes)


def test_supervision_keys_are_taken_in_place(tmp_path):
    new = base(tmp_path, thermo=", restart: never, restart_limit: 2", name="b.yaml")
    plan = plan_reload(base(tmp_path), new)
    assert plan.plugins.reconfigured == ["thermo"] and plan.plugins.changed == []


def test_added_and_removed_sinks_and_changed_routes(tmp_path):
    old = base(tmp_path)
    text = (tmp_path / "a.yaml").read_text()
    text = text.replace("  file: {type: jsonl, path: events.jsonl}\n", "")
    text = text.replace("sinks: [store, file]", "sinks: [store, extra]")
    text = text.replace("routes:", "  extra: {type: stdout}\nroutes:")
    plan = plan_reload(old, config(tmp_path, text, "b.yaml"))
    assert (plan.sinks.added, plan.sinks.removed, plan.sinks.changed) == (["extra"], ["file"], [])
    assert plan.routes and not plan.plugins


def test_what_only_a_restart_changes_is_reported_and_kept_running(tmp_path):
    old = base(tmp_path)
    text = (tmp_path / "a.yaml").read_text()
    text = text.replace("id: box1", "id: box2").replace("8720", "8721")
    text = text.replace("log_level: info", "log_level: debug")
    text = text.replace("command_timeout: 60s", "command_timeout: 5s")
    text = text.replace("path: events.db", "path: events.db, max_bytes: 1MiB")
    new = config(tmp_path, text, "b.yaml")
    plan = plan_reload(old, new)
    assert plan.needs_restart == ["gateway.id", "api.listen", "sinks.store.max_bytes"]
    assert plan.settings == ["gateway.log_level", "api.command_timeout"]
    assert plan.sinks.changed == ["store"]
    keep_running_values(old, new)
    assert (new.gateway.id, new.api.listen) == ("box1", "127.0.0.1:8720")
    assert new.gateway.log_level == "debug" and new.api.command_timeout == 5


def test_the_record_says_what_was_applied(tmp_path):
    plan = plan_reload(base(tmp_path), base(tmp_path, thermo=", max_line: 512", name="b.yaml"))
    record = reload_record(0.0, plan, failed={"thermo": "start failed: port busy"})
    assert record["ok"] is True and record["at"] == "1970-01-01T00:00:00+00:00"
    assert record["applied"]["plugins"]["changed"] == ["thermo"]
    assert record["failed"] == {"thermo": "start failed: port busy"}
    refused = reload_record(0.0, errors=["a.yaml:3: plugins.thermo.listen: bad"])
    assert refused["ok"] is False and refused["applied"] is None


# --- applied to a daemon in this process ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_plugin_added_by_reload_that_cannot_start_never_stops_the_daemon(tmp_path):
    from twisted.internet import reactor

    from gatewayd.service import Daemon

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port, spare = busy.getsockname()[1], free_port()
    text = f"""\
gateway: {{id: t1, state_dir: {tmp_path / "state"}}}
api: {{enabled: false}}
plugins:
  thermo: {{type: example, listen: "127.0.0.1:{spare}"}}
sinks:
  file: {{type: jsonl, path: events.jsonl}}
routes:
  - {{sinks: [file]}}
"""
    daemon = Daemon(config(tmp_path, text), reactor)
    await daemon.start()
    try:
        added = text.replace(
            "sinks:", f'  clash: {{type: example, listen: "127.0.0.1:{port}"}}\nsinks:', 1
        )
        (tmp_path / "gatewayd.yaml").write_text(added)
        record = await daemon.reload_file()
        assert record["ok"] is True and record["applied"]["plugins"]["added"] == ["clash"]
        assert "Address already in use" in record["failed"]["clash"]
        assert daemon.plugins["clash"].state == "failed"
        assert daemon.plugins["thermo"].state == "running" and daemon._stopping is None

        missing = added.replace("api: {enabled: false}", "api: {enabled: false, token_file: t}")
        (tmp_path / "gatewayd.yaml").write_text(missing)
        record = await daemon.reload_file()
        assert record["ok"] is False and "api.token_file" in record["errors"][0]
        assert daemon.last_reload is record and "clash" in daemon.plugins  # nothing changed
    finally:
        busy.close()
        await daemon.stop()


@pytest_twisted.ensureDeferred
async def test_stopping_the_daemon_ends_open_event_streams(tmp_path):
    from twisted.internet import reactor, threads

    from gatewayd.service import Daemon

    api = free_port()
    text = f"""\
gateway: {{id: t1, state_dir: {tmp_path / "state"}}}
api: {{listen: "127.0.0.1:{api}"}}
sinks:
  file: {{type: jsonl, path: events.jsonl}}
routes:
  - {{sinks: [file]}}
"""
    daemon = Daemon(config(tmp_path, text), reactor)
    await daemon.start()
    client = socket.create_connection(("127.0.0.1", api), timeout=10)
    client.sendall(b"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\n\r\n")

    def read(until: bytes | None) -> bytes:
        received = b""
        while (until is None or until not in received) and (chunk := client.recv(4096)):
            received += chunk
        return received

    try:
        received = await threads.deferToThread(read, b": connected")
        reading = threads.deferToThread(read, None)
        await daemon.stop()
        received += await reading
    finally:
        client.close()
    assert b"200 OK" in received and b"gatewayd is stopping" in received
