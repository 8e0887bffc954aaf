"""Cases from the reference's grammar parity fixture for bucket_definitions
(test/src/grammar_parity/fixtures/bucket_definitions.yaml, copied verbatim into
fixtures/): ``accepted`` queries load without a fatal error, ``rejected_*`` are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.conformance.harness import Case, data_rules, param_rules

FIXTURE = Path(__file__).parent / "fixtures" / "bucket_definitions.yaml"
REF = "grammar_parity/fixtures/bucket_definitions.yaml > "

# fixture SQL -> (DIFFERENCES.md id, what we do: None = accept, or an error regex)
DIFFERENT: dict[str, tuple[str, str | None]] = {
    "SELECT id FROM assets WHERE category IN ('draft', 'hidden')": ("in-value-list", None),
    "SELECT id FROM assets WHERE category NOT IN ('draft', 'hidden')": ("in-value-list", None),
    """SELECT id FROM assets WHERE category NOT IN '["draft", "hidden"]'""": (
        "in-value-list",
        None,
    ),
}


def fixture_cases() -> list[Case]:
    doc: dict[str, Any] = yaml.safe_load(FIXTURE.read_text())
    out: list[Case] = []
    for slot, groups in doc.items():
        for kind, entries in groups.items():
            for i, entry in enumerate(entries or [], 1):
                sql = entry["sql"]
                if slot == "parameters":
                    rules = param_rules(sql, accept_dangerous=True)
                else:
                    rules = data_rules(sql, entry.get("params") or ())
                ref = f"{REF}{slot}/{kind}/{i}: {sql}"
                diff = DIFFERENT.get(sql)
                error = None if kind == "accepted" else "."
                if diff is not None:
                    out.append(Case(ref, rules, error=error, ours_error=diff[1], diff=diff[0]))
                else:
                    out.append(Case(ref, rules, error=error))
    return out
