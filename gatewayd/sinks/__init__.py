"""Sinks: where events end up. Each reads from its own durable queue (see ``gatewayd.queue``)."""

from gatewayd.sinks.base import Sink, SinkContext

__all__ = ["Sink", "SinkContext"]
