"""Pages of ``data`` lines from ops as Redis returns them (``encode_raw_page``), checked
against the page contract (``PageCache``'s docstring) by decoding the lines: no services."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway.hub import encode_raw_page


def _wire(op_id: int, kind: str, i: int) -> bytes:
    body: dict[str, Any] = {"op_id": str(op_id), "op": kind, "checksum": i * 7 % 1000}
    if kind == "PUT":
        body.update(
            object_type="t", object_id=f"r{i}", data=orjson.dumps({"v": "x" * (i % 40)}).decode()
        )
    return orjson.dumps(body)


def _history(rng: random.Random, n: int) -> list[tuple[int, int, bytes, bytes]]:
    """(op id, target, wire, stored member) ascending; members in every stored form."""
    out = []
    op_id = rng.randint(0, 50)
    for i in range(n):
        op_id += rng.randint(1, 3)
        form = rng.random()
        if form < 0.15:  # MOVE / CLEAR: tagged with its target
            target = op_id + rng.randint(0, 30)
            kind = rng.choice(["MOVE", "CLEAR"])
            wire = _wire(op_id, kind, i)
            member = b"T%d|%b" % (target, wire)
        elif form < 0.25:  # a PUT of the older layout: R<len>:<row key><wire>
            target, wire = 0, _wire(op_id, "PUT", i)
            key = f"t/r{i}".encode()
            member = b"R%d:%b%b" % (len(key), key, wire)
        else:
            target = 0
            wire = _wire(op_id, rng.choice(["PUT", "PUT", "REMOVE"]), i)
            member = wire
        out.append((op_id, target, wire, member))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_raw_page_holds_the_ops_in_lines_as_the_contract_says(seed: int) -> None:
    rng = random.Random(seed)
    hist = _history(rng, rng.randint(0, 60))
    if seed % 3 == 0:  # untagged only: the spliced form
        hist = [h for h in hist if h[1] == 0 and h[3][:1] == b"{"]
    after = hist[0][0] - 1 if hist else 5
    more = rng.random() < 0.5
    max_bytes = rng.choice([1, 200, 1000, 10**6])
    flat: list[bytes] = []
    for op_id, _t, _w, member in hist:
        flat += [member, str(op_id).encode()]
    page = encode_raw_page("b1", after, flat, more, max_bytes)

    assert page.ops == len(hist)
    assert page.max_target == max((t for _, t, _, _ in hist), default=0)
    if not hist:
        assert page.lines == () and page.next_after == after and not page.has_more
        return
    assert page.next_after == hist[-1][0] and page.has_more == more
    got: list[Any] = []
    pos = after
    lines = [orjson.loads(line)["data"] for line in page.lines]
    for i, d in enumerate(lines):
        assert d["bucket"] == "b1" and d["after"] == str(pos)
        assert d["data"], "no empty lines"
        assert d["next_after"] == d["data"][-1]["op_id"]
        pos = int(d["next_after"])
        assert d["has_more"] == (more if i == len(lines) - 1 else True)
        size = sum(len(orjson.dumps(op)) for op in d["data"][:-1])
        assert size < max_bytes, "a line closes once its ops reach max_bytes"
        got += d["data"]
    assert got == [orjson.loads(w) for _, _, w, _ in hist]


def test_spliced_members_are_sent_byte_for_byte() -> None:
    members = [_wire(i, "PUT", i) for i in range(1, 6)]
    flat = [x for i, m in enumerate(members, 1) for x in (m, str(i).encode())]
    page = encode_raw_page("b", 0, flat, False, 1 << 20)
    (line,) = page.lines
    assert b",".join(members) in line
