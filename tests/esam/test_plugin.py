"""The esam plugin: config, commands and their error codes through the control API, events
without secrets, the one-at-a-time queue (409 when full, 504 on timeout), the simulator's demo
wiring and its command line."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from gatewayd.plugins.esam import EsamConfig, EsamPlugin
from gatewayd.plugins.esam import plugin as plugin_module
from gatewayd.plugins.esam.keys import KeyFileError
from gatewayd.plugins.esam.simulator import EsamReaderSimulator
from gatewayd.protocols.esam import FUNCTIONS, output_sizes, validate_arguments
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher

from gatewayd.plugin import BadArguments, Busy, DeviceRefused, DeviceTimeout
from gatewayd.testing import PluginHarness

from .helpers import DIV, ApiServer, calls, meter, private_demo_keys
from .test_reader_serial import Opener

MASTER_KEY = "00112233445566778899AABBCCDDEEFF"
EVENT_KEYS = {"function", "flag", "meter", "code", "duration_ms", "outcome", "queued_ms"}


def soft_harness(tmp_path: Path, **config: Any) -> PluginHarness:
    key_file = private_demo_keys(tmp_path)
    return PluginHarness(
        EsamPlugin,
        {"backend": "soft", "key_file": str(key_file), **config},
        name="esam",
        state_dir=tmp_path,
    )


def outcome_of(deferred: defer.Deferred) -> Any:
    box: list[Any] = []
    deferred.addBoth(box.append)
    assert box, "not finished"
    return box[0]


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_and_rules(tmp_path):
    config = EsamConfig(type="esam")
    assert (config.backend, config.port, config.baudrate, config.framing) == (
        "reader",
        "/dev/ttyUSB0",
        115200,
        "gatewayd-v1",
    )
    assert (config.parity, config.bytesize, config.stopbits, config.slot) == ("none", 8, 1, 0)
    assert (config.call_timeout, config.max_queue, config.response_timeout) == (10.0, 16, 2.0)
    with pytest.raises(ValueError, match="key_file\n.*required with backend: soft"):
        EsamConfig(type="esam", backend="soft")
    with pytest.raises(ValueError, match="available: gatewayd-v1"):
        EsamConfig(type="esam", framing="dkq05")
    with pytest.raises(ValueError, match="reconnect_max"):
        EsamConfig(type="esam", reconnect_initial="10s", reconnect_max="1s")
    with pytest.raises(ValueError, match="extra"):
        EsamConfig(type="esam", baud=9600)


def test_key_file_must_be_private(tmp_path):
    key_file = private_demo_keys(tmp_path)
    os.chmod(key_file, 0o644)
    with pytest.raises(ValueError, match="mode 0644; it must be 0600 or stricter"):
        EsamConfig(type="esam", backend="soft", key_file=key_file)
    os.chmod(key_file, 0o600)
    harness = soft_harness(tmp_path)
    os.chmod(tmp_path / "keys.yaml", 0o640)  # loosened after the config was checked
    failure = outcome_of(harness.start())
    assert failure.check(KeyFileError) and MASTER_KEY not in str(failure.value)


# --- the soft backend through the plugin ----------------------------------------------------------


def test_every_function_with_the_soft_backend_and_its_events(tmp_path):
    harness = soft_harness(tmp_path)
    harness.start()
    assert harness.collector.types() == ["device.online"]
    arguments = calls()
    order = [f for f in FUNCTIONS if f != "close_device"] + ["close_device"]
    for function in order:
        result = outcome_of(harness.call(function, arguments[function]))
        assert isinstance(result, dict), (function, result)
        if function not in ("open_device", "close_device", "mac_check"):
            sizes = output_sizes(function, validate_arguments(function, arguments[function]))
            assert {k: len(v) // 2 for k, v in result.items()} == sizes
    operations = harness.collector.of_type("esam.operation")
    assert len(operations) == 20
    for event in operations:
        assert set(event.data) == EVENT_KEYS and event.data["code"] == 0
        assert event.device == "esam" and event.protocol == "esam" and event.raw is None
    assert operations[2].data == {
        **operations[2].data,
        "function": "user_control",
        "flag": 0,
        "meter": "000000000001",
        "outcome": "ok",
    }
    assert harness.collector.types()[-3:] == ["device.offline", "esam.operation", "command.result"]
    # The core's command.result for each call keeps the cryptographic material out.
    results = harness.collector.of_type("command.result")
    assert [e.data["command"] for e in results] == order
    for event in results:
        assert event.device == "esam" and event.data["arguments"] == {}
        assert "result" not in event.data and event.data["outcome"] == "ok"
    (device,) = harness.plugin.devices()
    assert (device.id, device.online, device.details["card"]) == ("esam", False, "closed")


def test_soft_results_are_accepted_by_the_soft_meter(tmp_path):
    harness = soft_harness(tmp_path)
    harness.start()
    soft_meter = meter(0)
    auth = outcome_of(harness.call("identity_authentication", {"flag": 0, "div": DIV}))
    r2, _ = soft_meter.authenticate(bytes.fromhex(auth["rand"]), bytes.fromhex(auth["endata"]))
    result = outcome_of(
        harness.call(
            "data_clear1", {"flag": 0, "rand": r2.hex(), "div": DIV, "data": "1A00140730104001"}
        )
    )
    assert soft_meter.accept_data_clear(bytes.fromhex(result["data"])).hex().upper() == (
        "1A00140730104001"
    )


def test_argument_errors_carry_the_library_code(tmp_path):
    harness = soft_harness(tmp_path)
    harness.start()
    cases = [
        ({"flag": 0, "div": "00"}, 1502, "div"),
        ({"flag": 2, "div": DIV}, 1501, "flag"),
        ({"div": DIV}, 1501, "flag"),
        ({"flag": 0, "div": DIV, "extra": 1}, 1500, "extra"),
        ({"flag": 0, "div": "ZZ" * 8}, 1502, "div"),
    ]
    for arguments, code, name in cases:
        failure = outcome_of(harness.call("identity_authentication", arguments))
        assert failure.check(BadArguments), arguments
        assert failure.value.code == code and name in failure.value.message
    failure = outcome_of(
        harness.call("init_purse", {"flag": 1, "rand": "00" * 4, "div": DIV, "data": "00" * 4})
    )
    assert failure.value.code == 1501  # init_purse needs test keys
    codes = [e.data["code"] for e in harness.collector.of_type("esam.operation")]
    assert codes == [1502, 1501, 1501, 1500, 1502, 1501]
    assert {e.data["outcome"] for e in harness.collector.of_type("esam.operation")} == {
        "bad_arguments"
    }


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_control_api_answers_and_bodies(tmp_path):
    harness = soft_harness(tmp_path)
    await harness.start()
    api = ApiServer(harness, reactor)
    try:
        status, body = await api.command("user_control", {"flag": 0})
        assert status == 400 and body["error"]["code"] == 1502
        assert "rand" in body["error"]["message"]
        status, body = await api.command(
            "identity_authentication", {"flag": 0, "div": DIV, "x": "1"}
        )
        assert (status, body["error"]["code"]) == (400, 1500)
        bad_mac = dict(calls()["mac_check"], mac="00000000")
        status, body = await api.command("mac_check", bad_mac)
        assert (status, body["error"]["code"]) == (502, 810)
        bad_k1 = dict(calls()["infrared_auth"], rand1_endata="00" * 8)
        status, body = await api.command("infrared_auth", bad_k1)
        assert (status, body["error"]["code"]) == (502, 1100)
        status, body = await api.command("enc_for_compare", calls()["enc_for_compare"])
        assert status == 200 and len(body["result"]["data"]) == 128
        status, body = await api.command("no_such_function", {})
        assert status == 404
        status, listing = await api.request("GET", "/api/v1/plugins/esam/commands")
        commands = {c["name"]: c for c in listing["commands"]}
        assert set(commands) == set(FUNCTIONS)
        schema = commands["identity_authentication"]["arguments"]
        assert schema["required"] == ["flag", "div"]
        assert "PutDiv" in schema["properties"]["div"]["description"]
        status, metrics = await api.request("GET", "/metrics")
        assert (
            'gatewayd_plugin_commands_total{command="mac_check",outcome="810",plugin="esam"}'
            in metrics
        )
    finally:
        await api.stop()
        await harness.stop()


def test_no_secret_in_events_or_logs(tmp_path):
    logged: list[dict] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        harness = soft_harness(tmp_path)
        harness.start()
        arguments = calls()
        order = [f for f in FUNCTIONS if f != "close_device"]
        results = [outcome_of(harness.call(f, arguments[f])) for f in order]
        outcome_of(harness.call("mac_check", dict(calls()["mac_check"], mac="00000000")))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    text = repr([(e.data, e.raw) for e in harness.collector.events]) + repr(logged)
    text += repr(harness.plugin.devices()) + repr(harness.plugin.soft)
    assert MASTER_KEY not in text.upper()
    for result in results:
        for value in result.values():
            if isinstance(value, str) and len(value) >= 8:
                assert value not in text


# --- the queue ------------------------------------------------------------------------------------


def reader_harness(monkeypatch, clock: task.Clock, opener: Opener, **config: Any):
    monkeypatch.setattr(plugin_module, "serial_opener", lambda settings, reactor: opener)
    harness = PluginHarness(
        EsamPlugin,
        {"backend": "reader", "port": "/dev/null-reader", "response_timeout": 3, **config},
        reactor=clock,
        name="esam",
    )
    harness.start()
    return harness


def test_queue_is_bounded_one_at_a_time_and_calls_time_out(monkeypatch):
    clock = task.Clock()
    opener = Opener()  # a reader that never answers
    harness = reader_harness(monkeypatch, clock, opener, max_queue=3, call_timeout=2)
    plugin = harness.plugin
    gauge = harness.context.metrics.gauges["queue_length"][1]
    assert gauge() == 1  # the card is being opened (power on) after the port opened
    second = harness.call("infrared_rand", {})
    third = harness.call("infrared_rand", {})
    assert gauge() == 3
    busy = outcome_of(harness.call("infrared_rand", {}))
    assert busy.check(Busy) and busy.value.status == 409
    # Only one request is on the wire at a time.
    assert len(opener.ports[0].requests) == 1
    clock.advance(2)  # call_timeout of the waiting calls (and of the open)
    for waiting in (second, third):
        failure = outcome_of(waiting)
        assert failure.check(DeviceTimeout) and failure.value.status == 504
    assert gauge() == 1  # the open still holds the card until the reader's own timeout
    clock.advance(1)
    assert gauge() == 0
    outcomes = [e.data["outcome"] for e in harness.collector.of_type("esam.operation")]
    assert outcomes == ["busy", "timeout", "timeout"]
    assert plugin.devices()[0].details["queue_length"] == 0


def test_reader_outage_is_202_and_the_port_reopens(monkeypatch):
    clock = task.Clock()
    opener = Opener()
    opener.absent = True
    harness = reader_harness(monkeypatch, clock, opener, reconnect_initial=1, reconnect_max=8)
    failure = outcome_of(harness.call("infrared_rand", {}))
    assert failure.check(DeviceRefused) and failure.value.code == 202
    assert "could not open port" in failure.value.message
    (device,) = harness.plugin.devices()
    assert device.online is False and device.details["link"] == "down"
    harness.stop()
    assert clock.getDelayedCalls() == []


# --- the simulator: demo wiring and command line --------------------------------------------------


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_demo_simulator_sits_behind_the_configured_port(tmp_path):
    port = tmp_path / "gatewayd-demo-esam"
    config = EsamConfig(type="esam", port=str(port), reconnect_initial=0.05, reconnect_max=0.1)
    simulator = EsamReaderSimulator.for_demo(config, reactor)
    harness = PluginHarness(EsamPlugin, config.model_dump(exclude={"type"}), name="demo")
    await harness.start()  # before the simulator: the plugin retries until the port exists
    simulator.start()
    try:
        await harness.collector.wait_for("device.online").addTimeout(5, reactor)
        assert port.is_symlink() and os.readlink(port).startswith("/dev/pts/")
        key_copy = simulator.key_path
        assert key_copy.stat().st_mode & 0o777 == 0o600
    finally:
        await harness.stop()
        simulator.stop()
    assert not port.exists() and not key_copy.exists()
    idle = EsamReaderSimulator.for_demo(
        EsamConfig(type="esam", backend="soft", key_file=private_demo_keys(tmp_path)), reactor
    )
    idle.start()
    idle.stop()
    assert idle.path is None


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_simulate_command_line_prints_the_pty_path(tmp_path):
    link = tmp_path / "reader"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gatewayd",
            "simulate",
            "esam",
            "--pty",
            "--link",
            str(link),
            "--mode",
            "wrong-card",
            "--duration",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        path = process.stdout.readline().strip()
        assert path.startswith("/dev/pts/") and os.readlink(link) == path
        harness = PluginHarness(EsamPlugin, {"backend": "reader", "port": str(link)}, name="cli")
        await harness.start()
        try:
            with pytest.raises(DeviceRefused) as refused:
                await harness.call("infrared_rand", {})
            assert refused.value.code == 302
            process.send_signal(signal.SIGUSR1)  # wrong-card → garbage
            await task.deferLater(reactor, 0.3, lambda: None)
            harness.plugin.link.response_timeout = 0.3
            with pytest.raises(DeviceTimeout):
                await harness.call("infrared_rand", {})
            assert harness.collector.of_type("frame.invalid")
        finally:
            await harness.stop()
    finally:
        process.terminate()
        process.wait(10)


# --- documented configuration --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_reference_config_documents_every_key_at_its_default():
    import yaml

    text = (ROOT / "etc" / "gatewayd.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# esam:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append(re.sub(r"^  # ?", "", line))
    section = yaml.safe_load("\n".join(block))["esam"]
    assert set(section) == set(EsamConfig.model_fields)
    assert EsamConfig.model_validate(section) == EsamConfig(type="esam")


def test_sample_and_demo_sections_validate(tmp_path):
    import yaml

    sample = yaml.safe_load((ROOT / "plugins" / "esam" / "sample.yaml").read_text())
    assert EsamConfig.model_validate(sample["plugins"]["esam"]).backend == "reader"
    soft = dict(sample["plugins"]["esam-soft"], key_file=str(private_demo_keys(tmp_path)))
    assert EsamConfig.model_validate(soft).backend == "soft"
    demo = yaml.safe_load((ROOT / "etc" / "demo.yaml").read_text())["plugins"]["esam"]
    assert demo["backend"] == "reader" and demo["port"].endswith("/gatewayd-demo-esam")
