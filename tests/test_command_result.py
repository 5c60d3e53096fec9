"""The core's ``command.result``: one event per command call, in one shape, whoever asked."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task

from gatewayd.commands import CommandDispatcher
from gatewayd.plugin import (
    Busy,
    DeviceRefused,
    DeviceTimeout,
    NotFound,
    Plugin,
    command,
)
from gatewayd.schema import ConfigModel
from gatewayd.testing import DaemonView, HostView, PluginHarness


class Args(ConfigModel):
    device: str
    how: str = "ok"


class Gadget(Plugin):
    protocol = "gadget"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending: defer.Deferred | None = None

    @command("poke", args=Args, device="device")
    def poke(self, args: Args):
        if args.how == "ok":
            return {"poked": args.device}
        if args.how == "own":
            return {"outcome": "reconciled"}
        if args.how == "wait":
            self.pending = defer.Deferred()
            self.context.annotate(msg_id=7)
            return self.pending
        if args.how == "bug":
            raise RuntimeError("secret detail")
        raise {"timeout": DeviceTimeout, "refused": DeviceRefused, "busy": Busy, "gone": NotFound}[
            args.how
        ](f"{args.how}!")

    @command("whisper", args=Args)
    def whisper(self, args: Args):
        self.context.annotate(device="the-card")
        return {"mac": "00FF"}


def harness() -> tuple[PluginHarness, task.Clock]:
    clock = task.Clock()
    return PluginHarness(Gadget, {}, reactor=clock), clock


def result_of(h: PluginHarness) -> dict:
    (event,) = h.collector.of_type("command.result")
    return event.device, event.data


@pytest.mark.parametrize(
    ("how", "outcome", "code"),
    [
        ("timeout", "timeout", "timeout"),
        ("refused", "failed", "refused"),
        ("busy", "rejected", "busy"),
        ("gone", "rejected", "not_found"),
        ("bug", "error", "internal"),
    ],
)
def test_a_failed_command_has_its_outcome_and_error(how, outcome, code):
    h, _ = harness()
    h.call("poke", {"device": "d1", "how": how}).addErrback(lambda f: None)
    device, data = result_of(h)
    assert device == "d1" and (data["ok"], data["outcome"]) == (False, outcome)
    assert data["error"]["code"] == code and "result" not in data
    assert "secret detail" not in str(data)  # an unexpected error's text stays in the log


def test_a_successful_command_in_one_shape():
    h, _ = harness()
    h.call("poke", {"device": "d1"})
    device, data = result_of(h)
    assert device == "d1"
    assert data == {
        "command": "poke",
        "arguments": {"device": "d1"},
        "source": None,
        "request_id": None,
        "ok": True,
        "outcome": "ok",
        "result": {"poked": "d1"},
        "seconds": 0.0,
    }


def test_a_result_with_its_own_outcome_names_it():
    h, _ = harness()
    h.call("poke", {"device": "d1", "how": "own"})
    assert result_of(h)[1]["outcome"] == "reconciled"


def test_bad_arguments_are_rejected_and_reported():
    h, _ = harness()
    h.call("poke", {"how": "ok"}).addErrback(lambda f: None)
    device, data = result_of(h)
    assert device is None and data["outcome"] == "rejected"
    assert data["error"] == {"code": "bad_arguments", "message": "device: Field required"}


def test_annotations_and_timing_of_a_command_that_waits():
    h, clock = harness()
    h.call("poke", {"device": "d1", "how": "wait"})
    assert h.collector.of_type("command.result") == []
    clock.advance(1.25)
    h.plugin.pending.callback({"done": True})
    _, data = result_of(h)
    assert (data["msg_id"], data["seconds"], data["result"]) == (7, 1.25, {"done": True})


def test_through_the_dispatcher_it_says_who_asked_and_a_timeout_is_reported_once():
    h, clock = harness()
    daemon = DaemonView(clock)
    daemon.plugins["g"] = HostView("g", "gadget", h.plugin, h.context)
    dispatcher = CommandDispatcher(daemon, command_timeout=5)
    answers = []
    dispatcher.call(
        "g", "poke", {"device": "d1", "how": "wait"}, source="mqtt", request_id="r-1"
    ).addCallback(answers.append)
    clock.advance(5)
    assert answers[0][0] == 504
    _, data = result_of(h)
    assert (data["source"], data["request_id"], data["outcome"]) == ("mqtt", "r-1", "timeout")


def test_a_private_command_keeps_arguments_and_result_out():
    from gatewayd.plugin import Command

    h, _ = harness()
    private = Command(
        "whisper", Args, h.plugin.whisper, device="device", context=h.context, private=True
    )
    private.call({"device": "k", "how": "ok"})
    device, data = result_of(h)
    assert device == "the-card" and data["arguments"] == {} and "result" not in data
    assert data["outcome"] == "ok"
