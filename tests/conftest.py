"""Shared by every test: the testing kit's fixtures, and the common events' shapes checked.

Every ``device.online``, ``device.offline``, ``frame.invalid`` and ``command.result`` a plugin
emits into an ``EventCollector`` (``PluginHarness``) is checked against its JSON Schema
(``gatewayd.event_types``); a test whose plugin emitted a wrong one fails at teardown, naming it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gatewayd.event_types import shape_problems
from gatewayd.testing import EventCollector

pytest_plugins = ["gatewayd.testing.fixtures"]


@pytest.fixture(autouse=True)
def common_event_shapes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Check the shape of every common-type event a plugin emits in this test."""
    problems: list[str] = []
    collect = EventCollector.__call__

    def checked(self: EventCollector, event):  # noqa: ANN001, ANN202
        problems.extend(shape_problems(event))
        return collect(self, event)

    monkeypatch.setattr(EventCollector, "__call__", checked)
    yield problems
    assert not problems, "events of a common type with a wrong shape:\n" + "\n".join(problems)
