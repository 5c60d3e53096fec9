"""The soft backend's key file: loading, permission check, validation, a key set that hides itself.

Why: the software backend needs master keys that a real deployment keeps in the card. They live in
a YAML file outside the main config (``key_file:``), readable by the daemon only. Loading refuses a
file that group or others could read, names every problem at once, and never echoes a key value.

Format::

    profile: sm4            # or 3des
    keys:
      test:   {"00": 32 hex digits, "01": ..., ..., "10": ...}   # 17 slots, flag 0
      formal: {"00": ..., ..., "10": ...}                        # 17 slots, flag 1

Slot names are two hex digits "00".."10" and must be quoted (YAML reads ``10`` as the number ten).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import yaml
from gatewayd.protocols.esam_crypto import PROFILES

from gatewayd.files import NotPrivateError, check_private

KEY_STATES: Final[tuple[str, ...]] = ("test", "formal")
"""Key states in flag order: flag 0 = test keys, flag 1 = formal keys."""

SLOT_COUNT: Final = 17
SLOT_NAMES: Final[tuple[str, ...]] = tuple(f"{slot:02X}" for slot in range(SLOT_COUNT))
KEY_SIZE: Final = 16
MAX_FILE_SIZE: Final = 64 * 1024
#: Names longer than this, or holding this many hex digits in a row, are not echoed in errors.
MAX_SHOWN_NAME = 12
_HEX_RUN = re.compile(r"[0-9A-Fa-f]{8}")
_KEY_HEX: Final = re.compile(f"[0-9A-Fa-f]{{{KEY_SIZE * 2}}}")


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and every problem found."""


class EsamKeys:
    """Master keys per key state and slot, plus the crypto profile; never shows key material.

    ``key(state, slot)`` takes the state as flag (0/1) or name ("test"/"formal").
    """

    __slots__ = ("_keys", "profile", "source")

    def __init__(
        self, profile: str, keys: Mapping[str, tuple[bytes, ...]], source: str = ""
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}")
        for state in KEY_STATES:
            slots = keys.get(state, ())
            if len(slots) != SLOT_COUNT or any(len(key) != KEY_SIZE for key in slots):
                raise ValueError(f"{state}: need {SLOT_COUNT} keys of {KEY_SIZE} bytes")
        self.profile = profile
        self.source = source
        self._keys = {state: tuple(keys[state]) for state in KEY_STATES}

    def key(self, state: int | str, slot: int) -> bytes:
        """The 16-byte master key of ``slot`` (0..16) in key state ``state`` (0/1 or name)."""
        name = KEY_STATES[state] if isinstance(state, int) else state
        return self._keys[name][slot]

    def __repr__(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return f"<EsamKeys profile={self.profile} states=test,formal slots={SLOT_COUNT}{where}>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("EsamKeys cannot be pickled")


def check_permissions(path: str | os.PathLike[str], mode: int) -> None:
    """Refuse a key file whose mode is not 0600 or stricter (no bits for group or others): the
    core's check, the one ``api.token_file`` gets too (:func:`gatewayd.files.check_private`)."""
    try:
        check_private(path, mode)
    except NotPrivateError as exc:
        raise KeyFileError(f"key file {exc}") from None


def load_key_file(path: str | os.PathLike[str]) -> EsamKeys:
    """Read, permission-check and validate a key file; raise :class:`KeyFileError` if unusable."""
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError as exc:
        raise KeyFileError(f"key file {name}: cannot open ({exc.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise KeyFileError(f"key file {name}: not a regular file")
    with os.fdopen(fd, "rb") as handle:
        check_permissions(name, info.st_mode)
        raw = handle.read(MAX_FILE_SIZE + 1)
    if len(raw) > MAX_FILE_SIZE:
        raise KeyFileError(f"key file {name}: larger than {MAX_FILE_SIZE} bytes")
    return parse_key_document(_load_yaml(raw, name), name)


def _load_yaml(raw: bytes, name: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.MarkedYAMLError as exc:
        # str(exc) would quote the offending line, which may hold a key: give position only.
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise KeyFileError(f"key file {name}: YAML error at {where}: {exc.problem}") from None
    except yaml.YAMLError:
        raise KeyFileError(f"key file {name}: not valid YAML") from None


def parse_key_document(document: Any, source: str = "<keys>") -> EsamKeys:
    """Validate a parsed key document (see the module docstring); report all problems at once."""
    problems: list[str] = []
    if not isinstance(document, Mapping):
        raise KeyFileError(f"key file {source}: expected a mapping with 'profile' and 'keys'")
    for extra in sorted(str(k) for k in document if k not in ("profile", "keys")):
        problems.append(f"{_shown(extra)}: unknown key")
    profile = document.get("profile")
    if profile not in PROFILES:
        problems.append(f"profile: must be one of {', '.join(PROFILES)}")
    keys = document.get("keys")
    parsed: dict[str, tuple[bytes, ...]] = {}
    if not isinstance(keys, Mapping):
        problems.append("keys: expected a mapping with 'test' and 'formal'")
    else:
        for extra in sorted(str(k) for k in keys if k not in KEY_STATES):
            problems.append(f"keys.{_shown(extra)}: unknown key state (expected test, formal)")
        for state in KEY_STATES:
            slots = _parse_slots(keys.get(state), f"keys.{state}", problems)
            if slots is not None:
                parsed[state] = slots
    if problems:
        raise KeyFileError(f"key file {source}: " + "; ".join(problems))
    return EsamKeys(str(profile), parsed, source)


def _parse_slots(table: Any, where: str, problems: list[str]) -> tuple[bytes, ...] | None:
    if not isinstance(table, Mapping):
        problems.append(f'{where}: expected a mapping of slots "00".."10"')
        return None
    found: dict[str, bytes] = {}
    seen: set[str] = set()
    before = len(problems)
    for slot, value in table.items():
        if not isinstance(slot, str):
            problems.append(f'{where}: slot {_shown(slot)} must be a quoted string like "0A"')
            continue
        name = slot.upper()
        if name not in SLOT_NAMES:
            problems.append(f'{where}.{_shown(slot)}: unknown slot (expected "00".."10")')
            continue
        if name in seen:
            problems.append(f"{where}.{slot}: slot given twice")
            continue
        seen.add(name)
        key = _parse_key(value)
        if key is None:
            problems.append(f"{where}.{name}: must be a quoted string of {KEY_SIZE * 2} hex digits")
            continue
        found[name] = key
    missing = [name for name in SLOT_NAMES if name not in seen]
    if missing:
        problems.append(f"{where}: missing slots {', '.join(missing)}")
    if len(problems) > before:
        return None
    return tuple(found[name] for name in SLOT_NAMES)


def _shown(name: Any) -> str:
    """A name from the file as an error may show it: a long or hex-looking one may be a key
    written where a name belongs, so it is described rather than echoed."""
    text = str(name)
    if len(text) > MAX_SHOWN_NAME or _HEX_RUN.search(text):
        return f"<a name of {len(text)} characters>"
    return text


def _parse_key(value: Any) -> bytes | None:
    if not isinstance(value, str) or not _KEY_HEX.fullmatch(value):
        return None
    return bytes.fromhex(value)


def default_key_file() -> Path:
    """The demo key file shipped with the plugin (Appendix A test keys; never for production)."""
    return Path(__file__).with_name("testdata") / "demo-keys.yaml"
