"""The soft backend's key file: permissions, validation, and key material that never shows."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
import yaml
from gatewayd.plugins.esam.keys import (
    SLOT_NAMES,
    EsamKeys,
    KeyFileError,
    default_key_file,
    load_key_file,
    parse_key_document,
)

SECRET = "0F1E2D3C4B5A69788796A5B4C3D2E1F0"


def document(profile: str = "sm4", value: str = SECRET) -> dict:
    return {
        "profile": profile,
        "keys": {state: {slot: value for slot in SLOT_NAMES} for state in ("test", "formal")},
    }


def write(tmp_path, doc, mode=0o600, name="keys.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o200, 0o000])
def test_mode_0600_or_stricter_is_accepted(tmp_path, mode):
    if mode in (0o200, 0o000) and os.geteuid() == 0:
        keys = load_key_file(write(tmp_path, document(), mode))
        assert keys.profile == "sm4"
    elif mode in (0o200, 0o000):
        with pytest.raises(KeyFileError, match="cannot open"):
            load_key_file(write(tmp_path, document(), mode))
    else:
        assert load_key_file(write(tmp_path, document(), mode)).profile == "sm4"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700, 0o660, 0o666])
def test_looser_modes_are_refused_naming_file_and_mode(tmp_path, mode):
    path = write(tmp_path, document(), mode)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    message = str(info.value)
    assert str(path) in message and f"{mode:04o}" in message and "0600" in message


def test_keys_by_state_and_slot(tmp_path):
    doc = document()
    doc["keys"]["formal"]["0B"] = "AA" * 16
    doc["keys"]["test"]["10"] = "bb" * 16  # lowercase hex is fine
    keys = load_key_file(write(tmp_path, doc))
    assert keys.key(1, 0x0B) == bytes([0xAA]) * 16
    assert keys.key("formal", 0x0B) == bytes([0xAA]) * 16
    assert keys.key(0, 0x10) == bytes([0xBB]) * 16
    assert keys.key(0, 0x0B) == bytes.fromhex(SECRET)


def test_repr_str_and_pickle_never_show_keys(tmp_path):
    path = write(tmp_path, document())
    keys = load_key_file(path)
    for text in (repr(keys), str(keys), f"{keys}", repr([keys])):
        assert SECRET not in text.upper() and "sm4" in text
    assert str(path) in repr(keys)
    with pytest.raises(TypeError):
        pickle.dumps(keys)
    assert not hasattr(keys, "__dict__")


def test_3des_profile(tmp_path):
    assert load_key_file(write(tmp_path, document("3des"))).profile == "3des"


def test_all_problems_reported_at_once_without_values(tmp_path):
    doc = document(profile="sm1")
    del doc["keys"]["test"]["05"]
    doc["keys"]["formal"]["0C"] = SECRET[:-2] + "ZZ"
    doc["keys"]["formal"]["11"] = SECRET
    doc["extra"] = 1
    path = write(tmp_path, doc)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    message = str(info.value)
    for fragment in (
        "profile",
        "keys.test: missing slots 05",
        "keys.formal.0C",
        "keys.formal.11: unknown slot",
        "extra: unknown key",
    ):
        assert fragment in message, fragment
    assert SECRET[:10] not in message.upper()


def test_a_key_written_where_a_name_belongs_is_not_echoed(tmp_path):
    doc = document()
    doc["keys"]["test"][SECRET] = SECRET  # a slot name and its key swapped
    doc["keys"][SECRET.lower()] = {}
    doc[f"01 {SECRET}"] = 1
    doc["keys"]["formal"][int(SECRET[:12], 16)] = SECRET  # an unquoted number as slot
    with pytest.raises(KeyFileError) as info:
        load_key_file(write(tmp_path, doc))
    message = str(info.value)
    assert "keys.test.<a name of 32 characters>: unknown slot" in message
    assert "<a name of 35 characters>: unknown key" in message
    assert SECRET[:8] not in message.upper()
    assert str(int(SECRET[:12], 16))[:8] not in message


def test_unquoted_slot_names_and_keys_are_refused(tmp_path):
    lines = ["profile: sm4", "keys:"]
    for state in ("test", "formal"):
        lines.append(f"  {state}:")
        lines += [f'    "{slot}": "{SECRET}"' for slot in SLOT_NAMES]
    text = "\n".join(lines).replace('"10":', "10:").replace(f'"01": "{SECRET}"', '"01": 1234')
    with pytest.raises(KeyFileError) as info:
        load_key_file(write(tmp_path, text))
    message = str(info.value)
    assert "slot 10 must be a quoted string" in message
    assert "keys.test.01: must be a quoted string of 32 hex digits" in message


def test_yaml_errors_give_position_not_content(tmp_path):
    text = f'profile: sm4\nkeys: {{test: {{"00": "{SECRET}" "01"}}\n'
    with pytest.raises(KeyFileError) as info:
        load_key_file(write(tmp_path, text))
    message = str(info.value)
    assert "line" in message and SECRET not in message.upper()


@pytest.mark.parametrize("doc", [None, [], "text", {"profile": "sm4"}, {"keys": {}}])
def test_wrong_shapes(doc):
    with pytest.raises(KeyFileError):
        parse_key_document(doc)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(KeyFileError, match="cannot open"):
        load_key_file(tmp_path / "absent.yaml")
    os.chmod(tmp_path, 0o700)
    with pytest.raises(KeyFileError):
        load_key_file(tmp_path)


def test_symlinks_are_judged_by_their_target(tmp_path):
    target = write(tmp_path, document())
    link = tmp_path / "link.yaml"
    link.symlink_to(target)
    assert load_key_file(link).profile == "sm4"
    os.chmod(target, 0o644)
    with pytest.raises(KeyFileError, match="0644"):
        load_key_file(link)


def test_demo_key_file_loads_once_private(tmp_path):
    copy = tmp_path / "demo-keys.yaml"
    shutil.copy(default_key_file(), copy)
    os.chmod(copy, 0o644)
    with pytest.raises(KeyFileError):
        load_key_file(copy)
    os.chmod(copy, 0o600)
    keys = load_key_file(copy)
    assert keys.key(0, 1) == bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    assert keys.key(1, 16) == bytes.fromhex("00112233445566778899AABBCCDDEEFF")


def test_constructor_checks_shape():
    with pytest.raises(ValueError):
        EsamKeys("sm4", {"test": (bytes(16),) * 17})
    with pytest.raises(ValueError):
        EsamKeys("sm1", {"test": (bytes(16),) * 17, "formal": (bytes(16),) * 17})
