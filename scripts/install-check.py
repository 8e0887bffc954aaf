"""Is this clone installed in the running Python, with everything it needs?

Run as ``python3 -I scripts/install-check.py [EXTRA ...]`` (``-I``: the repository root is
not on ``sys.path``, so importing the source tree cannot fake an install). Decides from the
project's own metadata: the ``bucketsync`` distribution must be installed from this
directory (editable or not) and every requirement it declares (plus those of the named
extras) must be installed. Exit 0: nothing to do; exit 1: install needed (the reason is
printed); exit 2: the check itself failed.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def problems(extras: list[str]) -> list[str]:
    try:
        dist = md.distribution("bucketsync")
    except md.PackageNotFoundError:
        return ["the bucketsync package is not installed in this Python"]
    out: list[str] = []
    direct = dist.read_text("direct_url.json")
    where = None
    if direct:
        url = json.loads(direct).get("url", "")
        if url.startswith("file://"):
            where = Path(unquote(urlparse(url).path)).resolve()
    if where != ROOT:
        out.append(f"bucketsync is installed from {where or 'an index'}, not from {ROOT}")
    installed = {_canon(d.metadata["Name"]) for d in md.distributions() if d.metadata["Name"]}
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        m = _EXTRA.search(marker)
        if m and m.group(1) not in extras:
            continue
        name = _NAME.match(spec)
        if name and _canon(name.group(1)) not in installed:
            out.append(f"requirement {spec.strip()} is not installed")
    return out


def main() -> int:
    try:
        found = problems(sys.argv[1:])
    except Exception as exc:  # a broken environment: let the caller install
        print(f"install check failed: {exc}", file=sys.stderr)
        return 2
    for p in found:
        print(p)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
