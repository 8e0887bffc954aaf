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
