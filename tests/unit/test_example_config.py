"""sendtime.example.toml is generated from the settings types: it is current,
it names every setting, and it loads back as exactly the defaults."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from sendtime.server.example_config import field_names, render
from sendtime.server.settings import Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "sendtime.example.toml"
_HEADER = re.compile(r"^(?:# )?\[\[?([\w.\"-]+)\]\]?$")
_KEY = re.compile(r"^(?:# )?([\w\"-]+) = ")


def test_the_example_is_what_the_settings_types_say() -> None:
    assert EXAMPLE.read_text() == render(), "run python tools/gen_example_config.py"


def test_every_setting_appears_in_its_table() -> None:
    tables = {""}
    keys: set[str] = set()
    table = ""
    for line in EXAMPLE.read_text().splitlines():
        if header := _HEADER.match(line):
            table = header[1]
            tables.add(table)
        elif key := _KEY.match(line):
            keys.add(f"{table}.{key[1]}" if table else key[1])
    names = list(field_names())
    assert len(names) > 100  # every relay kind's fields too
    missing = [name for name in names if name not in keys and name not in tables]
    assert missing == []
    # the ones the old hand-written file had left out
    for name in (
        "delivery.public_base_url",
        "delivery.relay.kind",
        "delivery.quiet_hours.mode",
        "flows.delay_s",
    ):
        assert name in keys


def test_the_example_loads_back_as_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(EXAMPLE.parent)  # its relative data_dir is the file's folder, so this one
    loaded = load_settings(EXAMPLE, environ={})
    defaults = Settings()
    defaults = msgspec.structs.replace(
        defaults, storage=msgspec.structs.replace(defaults.storage, data_dir=EXAMPLE.parent / ".sendtime")
    )
    assert msgspec.to_builtins(loaded, enc_hook=str) == msgspec.to_builtins(defaults, enc_hook=str)
