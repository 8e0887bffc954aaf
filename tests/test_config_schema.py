"""schemas/config.schema.json is the JSON schema of the typed settings, not a stale copy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from bucketsync.config import config_json_schema

ROOT = Path(__file__).resolve().parent.parent


def test_committed_schema_matches_the_settings() -> None:
    committed = json.loads((ROOT / "schemas" / "config.schema.json").read_text())
    assert committed == config_json_schema(), (
        "regenerate: python3 -m bucketsync.config > schemas/config.schema.json"
    )


def test_example_config_names_only_known_keys_and_every_processor_key() -> None:
    schema = config_json_schema()
    example = yaml.safe_load((ROOT / "bucketsync.example.yaml").read_text())
    for section, values in example.items():
        if not isinstance(values, dict):
            continue
        ref = schema["properties"][section]["$ref"].rsplit("/", 1)[-1]
        known = set(schema["$defs"][ref]["properties"])
        assert set(values) <= known, (section, set(values) - known)
    processor = set(schema["$defs"]["ProcessorSettings"]["properties"])
    assert processor <= set(example["processor"]), processor - set(example["processor"])


def test_example_config_shows_every_key() -> None:
    """Every settings key stands in the example, set or as a commented ``# key:`` line in its
    section, so the example documents the whole configuration."""
    schema = config_json_schema()
    text = (ROOT / "bucketsync.example.yaml").read_text()
    blocks = dict(re.findall(r"(?m)^(\w+):\n((?:(?:[ #].*)?\n)*)", text))
    missing = []
    for section, prop in schema["properties"].items():
        if "$ref" not in prop:
            if not re.search(rf"(?m)^#?\s*{section}:", text):
                missing.append(section)
            continue
        ref = prop["$ref"].rsplit("/", 1)[-1]
        for key in schema["$defs"][ref]["properties"]:
            if not re.search(rf"(?m)^\s+(?:#\s*)?{key}:", blocks.get(section, "")):
                missing.append(f"{section}.{key}")
    assert missing == []


def test_example_values_are_the_defaults_except_where_marked_demo() -> None:
    """The example's header says its values are the defaults except where marked "demo": a
    value that differs from the settings' default must say so on its line."""
    from bucketsync.config import Settings

    defaults = Settings().model_dump(mode="json", exclude={"config_dir"})
    lines = (ROOT / "bucketsync.example.yaml").read_text().splitlines()
    example = yaml.safe_load("\n".join(lines))
    differ = []
    section = None
    for line in lines:
        m = re.match(r"^(\s*)(\w+):\s*(.*)$", line)
        if not m:
            continue
        indent, key, rest = m.groups()
        if not indent:
            section = key
            value = rest.split("#")[0].strip()  # a top-level key with a value
            if value and example[key] != defaults[key] and "demo" not in rest:
                differ.append(key)
            continue
        assert section is not None
        if example[section][key] != defaults[section][key] and "demo" not in rest:
            differ.append(f"{section}.{key}")
    assert differ == []
