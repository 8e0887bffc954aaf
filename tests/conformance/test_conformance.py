"""Conformance suite: the reference's (powersync-service, packages/sync-rules) edition-1
test cases, ported as data (see harness.py, DIFFERENCES.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conformance import cases_functions, cases_params, cases_rules, cases_streams
from tests.conformance.fixture_cases import fixture_cases
from tests.conformance.harness import Case, all_diffs

CASES: list[Case] = [
    *cases_rules.CASES,
    *cases_params.CASES,
    *cases_functions.CASES,
    *cases_streams.CASES,
    *fixture_cases(),
]


OPEN: dict[str, str] = {}
for _c in CASES:
    if _c.id in OPEN:
        _c.open_ = OPEN[_c.id]
    elif "rejected_syntax/1: SELECT u.org_id" in _c.id:
        _c.ours_error, _c.diff = None, "parameter-table-alias"  # we accept (deliberate)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=c.open_)) if c.open_ else c
        for c in CASES
    ],
    ids=[c.id for c in CASES],
)
def test_reference_case(case: Case) -> None:
    case.run()


def test_case_names_unique() -> None:
    names = [c.id for c in CASES]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]


def test_every_difference_is_documented() -> None:
    text = (Path(__file__).parent / "DIFFERENCES.md").read_text()
    documented = set(re.findall(r"^### `([\w-]+)`", text, re.MULTILINE))
    used = all_diffs(CASES)
    assert used <= documented, used - documented
    assert documented <= used, documented - used
