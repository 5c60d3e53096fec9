"""gatewayd: a multi-protocol IoT gateway daemon built on one Twisted reactor."""

__version__ = "0.1.0"
