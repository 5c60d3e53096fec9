"""Sinks: where events end up. Each reads from its own durable queue (see ``gatewayd.queue``)."""

from gatewayd.sinks.base import BlockingSink, Sink, SinkContext

__all__ = ["BlockingSink", "Sink", "SinkContext"]
