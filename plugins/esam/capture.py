"""``gatewayd esam capture`` / ``replay``: record a reader's serial traffic, read it back.

Why: the DKQ-05's wire protocol is unpublished. A field engineer runs the vendor software against
a pseudo-terminal this tool creates; the tool forwards every byte to the real reader and records
both directions with timestamps. The file pins the real framing and the card's APDU scripts, and
tests replay it through a framer (:func:`replay`).

File format (JSON lines): a header line ``{"capture": "gatewayd-esam", "version": 1, "port": ...,
"baudrate": ..., "started": ISO-8601}``, then one line per chunk read from either side::

    {"t": 0.012345, "dir": "host>reader", "hex": "0200030110..."}
    {"t": 0.020001, "dir": "reader>host", "hex": "..."}

``t`` is seconds since the start (monotonic clock); ``host`` is the vendor software.
The pseudo-terminal ignores the baud rate and parity the vendor software sets: give the real
reader's settings to ``--baudrate``/``--parity``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from gatewayd.protocols.reader_framing import (
    DEFAULT_FRAMING,
    ReaderFrame,
    Rejected,
    available_framings,
    describe_frame,
    framer_for,
)
from twisted.internet import defer, main, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gatewayd.files import private_opener

from .reader import PARITIES, SerialSettings, serial_opener
from .simulator import PtyTransport, open_raw_pty, point_link

log = Logger(namespace="gatewayd.plugins.esam.capture")

HOST_TO_READER = "host>reader"
READER_TO_HOST = "reader>host"
DIRECTIONS = (HOST_TO_READER, READER_TO_HOST)
FORMAT_NAME = "gatewayd-esam"
FORMAT_VERSION = 1


class CaptureFormatError(ValueError):
    """A capture file that is not ours or is damaged; the message names the line."""


@dataclass(frozen=True)
class CaptureRecord:
    """One chunk of bytes read from one side, ``t`` seconds after the capture started."""

    t: float
    direction: str
    data: bytes


class CaptureWriter:
    """Appends records to a capture file, one JSON line each, flushed as they come."""

    def __init__(self, handle: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.handle = handle
        self.clock = clock
        self.started = clock()
        self.records = 0

    def header(self, **facts: Any) -> None:
        started = datetime.now(UTC).isoformat(timespec="microseconds")
        line = {"capture": FORMAT_NAME, "version": FORMAT_VERSION, **facts, "started": started}
        self.handle.write(json.dumps(line) + "\n")
        self.handle.flush()

    def record(self, direction: str, data: bytes) -> None:
        line = {"t": round(self.clock() - self.started, 6), "dir": direction, "hex": data.hex()}
        self.handle.write(json.dumps(line) + "\n")
        self.handle.flush()
        self.records += 1


def load_capture(path: str | os.PathLike[str]) -> list[CaptureRecord]:
    """The records of a capture file (the header is checked and skipped)."""
    records: list[CaptureRecord] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise CaptureFormatError(f"{path}:{number}: not JSON") from None
            if number == 1 or (isinstance(item, dict) and "capture" in item):
                # A header: the file's first line, and again where a later run appended to it.
                if not isinstance(item, dict) or item.get("capture") != FORMAT_NAME:
                    raise CaptureFormatError(f"{path}:{number}: not a {FORMAT_NAME} capture")
                continue
            try:
                record = CaptureRecord(float(item["t"]), item["dir"], bytes.fromhex(item["hex"]))
            except (KeyError, TypeError, ValueError):
                raise CaptureFormatError(f"{path}:{number}: not a capture record") from None
            if record.direction not in DIRECTIONS:
                raise CaptureFormatError(f"{path}:{number}: unknown direction {record.direction}")
            records.append(record)
    return records


def replay(
    records: Iterable[CaptureRecord],
    direction: str = READER_TO_HOST,
    framing: str = DEFAULT_FRAMING,
) -> list[ReaderFrame | Rejected]:
    """The frames (and dropped bytes) a framer finds in one direction of a capture, in order."""
    framer = framer_for(framing)
    found: list[ReaderFrame | Rejected] = []
    for record in records:
        if record.direction == direction:
            found.extend(framer.feed(record.data))
    return found


# --- the relay ------------------------------------------------------------------------------------


class _Side(Protocol):
    """One end of the relay: bytes read here are recorded and written to the other end."""

    def __init__(self, relay: CaptureRelay, direction: str) -> None:
        self.relay = relay
        self.direction = direction

    def dataReceived(self, data: bytes) -> None:
        self.relay.forward(self.direction, data)

    def connectionLost(self, reason: Any = None) -> None:
        self.relay.side_lost(self.direction)


class CaptureRelay:
    """A pty for the vendor software, forwarded to the real reader, every chunk recorded.

    ``open_device(protocol)`` opens the real reader's port (``serial_opener`` in production).
    ``closed`` fires when the reader's port closed or :meth:`stop` was called.
    """

    def __init__(
        self,
        reactor: Any,
        open_device: Callable[[Protocol], Any],
        writer: CaptureWriter,
        link: Path | None = None,
    ) -> None:
        self.reactor = reactor
        self.open_device = open_device
        self.writer = writer
        self.link = link
        self.path: str | None = None
        self.closed: defer.Deferred = defer.Deferred()
        self._host: Any = None
        self._device: Any = None
        self._slave: int | None = None
        self._stopping = False

    def start(self) -> str:
        """Open the real port, then the pty; returns the pty path for the vendor software."""
        self._device = self.open_device(_Side(self, READER_TO_HOST))
        master, self._slave, self.path = open_raw_pty()
        self._host = PtyTransport(self.reactor, master, _Side(self, HOST_TO_READER))
        if self.link is not None:
            point_link(self.link, self.path)
        return self.path

    def forward(self, direction: str, data: bytes) -> None:
        self.writer.record(direction, data)
        target = self._device if direction == HOST_TO_READER else self._host
        if target is not None:
            target.write(data)

    def side_lost(self, direction: str) -> None:
        if direction == READER_TO_HOST and not self._stopping:
            self._device = None
            log.warn("capture: the reader's port closed; stopping")
            self.stop()

    def stop(self) -> None:
        """Close both sides and the link; ``closed`` fires with the number of records."""
        self._stopping = True
        host, self._host = self._host, None
        device, self._device = self._device, None
        if host is not None:
            host.stopReading()
            host.connectionLost(Failure(main.CONNECTION_DONE))
        if device is not None:
            device.loseConnection()
        if self._slave is not None:
            with contextlib.suppress(OSError):
                os.close(self._slave)
            self._slave = None
        if self.link is not None and self.link.is_symlink():
            with contextlib.suppress(OSError):
                self.link.unlink()
        if not self.closed.called:
            self.closed.callback(self.writer.records)


# --- command line ---------------------------------------------------------------------------------


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """``gatewayd esam capture ...`` and ``gatewayd esam replay ...``."""
    esam = subparsers.add_parser("esam", help="ESAM card reader tools (capture, replay)")
    tools = esam.add_subparsers(dest="esam_tool", required=True, metavar="TOOL")

    capture = tools.add_parser(
        "capture",
        help="relay a pty to the real reader and record both directions",
        description="Create a pseudo-terminal for the vendor software, forward it to the real "
        "reader on --port and record every byte both ways (JSON lines) to --out.",
    )
    capture.add_argument("--port", required=True, help="the real reader, e.g. /dev/ttyUSB0")
    capture.add_argument("--out", required=True, type=Path, help="capture file to write")
    capture.add_argument("--link", type=Path, default=None, help="symlink to the pty's path")
    capture.add_argument("--baudrate", type=int, default=115200)
    capture.add_argument("--parity", choices=sorted(PARITIES), default="none")
    capture.add_argument("--bytesize", type=int, choices=(5, 6, 7, 8), default=8)
    capture.add_argument("--stopbits", type=float, choices=(1, 1.5, 2), default=1)
    capture.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    capture.set_defaults(func=capture_main)

    replayer = tools.add_parser("replay", help="decode the frames of a capture file")
    replayer.add_argument("file", type=Path)
    replayer.add_argument("--framing", choices=available_framings(), default=DEFAULT_FRAMING)
    replayer.add_argument("--direction", choices=(*DIRECTIONS, "both"), default="both")
    replayer.set_defaults(func=replay_main)


def capture_main(args: argparse.Namespace) -> int:
    """Run the relay until Ctrl-C, ``--duration`` or the reader's port closing."""
    from gatewayd.logsetup import start_logging

    start_logging("info")
    settings = SerialSettings(
        port=args.port,
        baudrate=args.baudrate,
        parity=args.parity,
        bytesize=args.bytesize,
        stopbits=args.stopbits,
        exclusive=True,
    )
    status = [0]

    async def run(reactor: Any) -> None:
        try:
            # 0600 when created: the record of a security module's traffic is not for others.
            handle = open(args.out, "a", encoding="utf-8", opener=private_opener)  # noqa: SIM115
        except OSError as exc:
            print(f"capture: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
            status[0] = 1
            return
        with handle:
            writer = CaptureWriter(handle)
            relay = CaptureRelay(reactor, serial_opener(settings, reactor), writer, args.link)
            try:
                path = relay.start()
            except Exception as exc:  # the reader's port, or the pty and its --link
                print(f"capture: cannot start: {exc}", file=sys.stderr)
                status[0] = 1
                return
            # Only a capture that started gets a header: each run appends one, then its records.
            writer.header(port=args.port, baudrate=args.baudrate, parity=args.parity)
            print(path, flush=True)
            print(
                f"capture: point the vendor software at {args.link or path}; "
                f"recording to {args.out}; Ctrl-C stops",
                file=sys.stderr,
                flush=True,
            )
            reactor.addSystemEventTrigger("before", "shutdown", relay.stop)
            if args.duration is not None:
                reactor.callLater(args.duration, relay.stop)
            records = await relay.closed
            print(f"capture: {records} records written to {args.out}", file=sys.stderr)

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as exc:
        return status[0] or (exc.code if isinstance(exc.code, int) else 1)
    return status[0]


def replay_main(args: argparse.Namespace) -> int:
    """Print each frame of a capture as JSON, one per line, in stream order per direction."""
    try:
        records = load_capture(args.file)
    except (OSError, CaptureFormatError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    directions = DIRECTIONS if args.direction == "both" else (args.direction,)
    try:
        for direction in directions:
            for item in replay(records, direction, args.framing):
                if isinstance(item, Rejected):
                    raw = item.raw.hex().upper()
                    line = {"dir": direction, "rejected": item.reason, "hex": raw}
                else:
                    line = {"dir": direction, **describe_frame(item)}
                print(json.dumps(line))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
