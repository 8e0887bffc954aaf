"""Every reference in the code to a document resolves in a clone: ``sync-protocol.md §4.4``,
``docs/store.md``, ``architecture §7``, ``invariant 6``, a bare ``§3.5`` (which means the
document the file named last before it) name a file under ``docs/`` (or a path from the
repository root) and, with a section number, a heading of that number in it; an invariant
number is one of the numbered invariants in ``docs/architecture.md`` §3.

The other way round, the markdown (``README.md``, ``docs/**/*.md``): every repository path
(``bucketsync/bench/mix.py``, ``docs/bench/ingest.md``) and every module path
(``bucketsync.bench.store_layout``, ``pipeline.rules.parse_rules``) it quotes in backticks or
links to exists, so a renamed module (``bucketsync/bench_mix.py`` ->
``bucketsync/bench/mix.py``) cannot leave a stale name in the docs.

Pure: reads files only. The scanner is unit-tested below on small texts, so a reference
it cannot see does not pass by accident."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: where production code and its scripts live (tests cite specs too, but need not)
SCANNED = ("bucketsync", "pipeline", "gateway", "scripts")
SUFFIXES = {".py", ".lua", ".sh", ""}

_TOKEN = re.compile(
    r"(?P<doc>(?:[\w.-]+/)*[A-Za-z][\w-]*\.md)\b(?!\w)"
    r"|(?P<arch>\barchitecture)(?=\s*§)"
    r"|§\s?(?P<sec>\d+[a-z]?(?:\.\d+)*)"
    r"|\binvariants?\s+(?P<inv>\d+)(?:\s*[-\u2013]\s*(?P<inv_to>\d+))?"
)
_HEADING = re.compile(r"^#{1,6}\s+(\d+[a-z]?(?:\.\d+)*)\.?\s", re.MULTILINE)


@dataclass(frozen=True)
class Ref:
    line: int
    doc: str  # path relative to the repository root
    section: str | None = None
    invariant: int | None = None

    def __str__(self) -> str:
        what = f" §{self.section}" if self.section else ""
        what += f" invariant {self.invariant}" if self.invariant is not None else ""
        return f"line {self.line}: {self.doc}{what}"


def _doc_path(name: str) -> str:
    """``sync-protocol.md`` and ``docs/x.md`` -> ``docs/x.md``; other paths stay as given."""
    if "/" not in name:
        return f"docs/{name}"
    return name


def scan(text: str) -> tuple[list[Ref], list[str]]:
    """The document references in ``text``, and the problems of the scan itself (a
    section number before any document was named)."""
    refs: list[Ref] = []
    problems: list[str] = []
    current: str | None = None
    for m in _TOKEN.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group("doc"):
            current = _doc_path(m.group("doc"))
            refs.append(Ref(line, current))
        elif m.group("arch"):
            current = "docs/architecture.md"
        elif m.group("sec"):
            if current is None:
                problems.append(f"line {line}: §{m.group('sec')} names no document before it")
            else:
                refs.append(Ref(line, current, section=m.group("sec")))
        elif m.group("inv"):
            first = int(m.group("inv"))
            last = int(m.group("inv_to") or first)
            refs += [Ref(line, "docs/architecture.md", invariant=n) for n in range(first, last + 1)]
    return refs, problems


def sections(doc_text: str) -> set[str]:
    return set(_HEADING.findall(doc_text))


def invariants(architecture: str) -> set[int]:
    """The numbered items of architecture.md's "Invariants" section."""
    m = re.search(r"^## 3\. Invariants.*?$(.*?)^## ", architecture, re.MULTILINE | re.DOTALL)
    assert m, "docs/architecture.md has no section 3 'Invariants'"
    return {int(n) for n in re.findall(r"^(\d+)\. ", m.group(1), re.MULTILINE)}


def check(refs: list[Ref], root: Path = ROOT) -> list[str]:
    """What does not resolve."""
    bad: list[str] = []
    cache: dict[str, str | None] = {}

    def read(doc: str) -> str | None:
        if doc not in cache:
            p = root / doc
            cache[doc] = p.read_text(encoding="utf-8") if p.is_file() else None
        return cache[doc]

    for r in refs:
        text = read(r.doc)
        if text is None:
            bad.append(f"{r}: no such file")
        elif r.section is not None and r.section not in sections(text):
            bad.append(f"{r}: no heading numbered {r.section}")
        elif r.invariant is not None and r.invariant not in invariants(text):
            bad.append(f"{r}: no such invariant")
    return bad


def _sources() -> list[Path]:
    out = []
    for top in SCANNED:
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and p.suffix in SUFFIXES and "stack_files" not in p.parts:
                out.append(p)
    return out


# ------------------------------------------------------------------ the scanner itself


def test_scan_finds_documents_sections_and_invariants() -> None:
    text = (
        '"""Serving a stream (sync-protocol.md §4; see §4.4 and §5.1).\n'
        "Layout: docs/store.md. Folding: architecture §7 (invariants 1-3, invariant 6).\n"
        'hashlib.md5(raw) is no document."""\n'
    )
    refs, problems = scan(text)
    assert problems == []
    assert [str(r) for r in refs] == [
        "line 1: docs/sync-protocol.md",
        "line 1: docs/sync-protocol.md §4",
        "line 1: docs/sync-protocol.md §4.4",
        "line 1: docs/sync-protocol.md §5.1",
        "line 2: docs/store.md",
        "line 2: docs/architecture.md §7",
        "line 2: docs/architecture.md invariant 1",
        "line 2: docs/architecture.md invariant 2",
        "line 2: docs/architecture.md invariant 3",
        "line 2: docs/architecture.md invariant 6",
    ]


def test_scan_refuses_a_section_without_a_document() -> None:
    _refs, problems = scan("# see §3.2 for why\n")
    assert problems == ["line 1: §3.2 names no document before it"]


def test_check_reports_missing_files_sections_and_invariants(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n## 1. One\n### 1.2 Two\n")
    (tmp_path / "docs" / "architecture.md").write_text(
        "## 3. Invariants (MUST)\n\n1. **X.**\n2. **Y.**\n## 4. Next\n"
    )
    refs, _ = scan("a.md §1.2 §1.3; b.md; invariant 2; invariant 3")
    assert check(refs, tmp_path) == [
        "line 1: docs/a.md §1.3: no heading numbered 1.3",
        "line 1: docs/b.md: no such file",
        "line 1: docs/architecture.md invariant 3: no such invariant",
    ]


# ------------------------------------------------------------------ the repository


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_doc_reference_resolves(path: Path) -> None:
    refs, problems = scan(path.read_text(encoding="utf-8", errors="replace"))
    assert problems + check(refs) == []


def test_the_scan_sees_the_references_it_must() -> None:
    """A guard against a scanner that silently finds nothing."""
    found = {
        r.doc for p in _sources() for r in scan(p.read_text(encoding="utf-8", errors="replace"))[0]
    }
    assert {"docs/sync-protocol.md", "docs/cdc-events.md", "docs/store.md"} <= found


# ------------------------------------------------------------------ paths quoted in markdown

#: the repository's top-level folders a quoted path can start with
_TOPS = ("bucketsync", "pipeline", "gateway", "scripts", "tests", "docs", "schemas")
_CODE_SPAN = re.compile(r"`([^`\n]+)`|\]\(([^)\s#]+)")
_PATH = re.compile(r"(?<![\w./-])((?:" + "|".join(_TOPS) + r")/[\w./-]*[\w/])")
_MODULE = re.compile(r"(?<![\w./-])((?:bucketsync|pipeline|gateway)(?:\.[a-z_]\w*)+)\b(?![/(])")


def quoted_paths(text: str) -> list[tuple[int, str]]:
    """``(line, name)`` of each repository or module path inside a code span or link
    target of a markdown text (globs and placeholders such as ``<x>`` or ``*`` skipped)."""
    out = []
    for m in _CODE_SPAN.finditer(text):
        span = m.group(1) or m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        for pm in _PATH.finditer(span):
            if not any(c in span[pm.start() : pm.end() + 1] for c in "*<{"):
                out.append((line, pm.group(1).rstrip(".")))
        for mm in _MODULE.finditer(span):
            out.append((line, mm.group(1)))
    return out


def missing(name: str, root: Path = ROOT, base: Path | None = None) -> bool:
    """A path neither under the repository root nor next to the markdown file (``base``);
    a dotted name that is neither a module nor an attribute of one."""
    if (root / name).exists() or (base is not None and (base / name).exists()):
        return False  # a path, or a file such as ``bucketsync.example.yaml``
    if "/" in name:
        return True
    parts = name.split(".")
    for n in (len(parts), len(parts) - 1):
        here = root.joinpath(*parts[:n])
        if here.with_suffix(".py").exists() or (here / "__init__.py").exists():
            return False
    return True


def test_quoted_paths_finds_paths_and_modules_in_code_spans_and_links(tmp_path: Path) -> None:
    text = (
        "see `bucketsync/bench_mix.py` and [x](docs/store.md)\n"
        "run `python3 -m bucketsync.bench.store_layout read`; `docs/bench/*.json` is a glob\n"
        "plain bucketsync/old.py outside code is prose\n"
    )
    assert quoted_paths(text) == [
        (1, "bucketsync/bench_mix.py"),
        (1, "docs/store.md"),
        (2, "bucketsync.bench.store_layout"),
    ]
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "mod.py").write_text("")
    assert not missing("pkg/mod.py", tmp_path)
    assert missing("pkg/gone.py", tmp_path)
    assert not missing("pkg.mod", tmp_path)
    assert not missing("pkg.mod.attribute", tmp_path)
    assert missing("pkg.gone.attribute", tmp_path)


def _markdown() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("path", _markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_quoted_in_the_docs_exists(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    stale = [
        f"line {n}: {name}" for n, name in quoted_paths(text) if missing(name, ROOT, path.parent)
    ]
    assert stale == []


def test_the_markdown_scan_sees_paths() -> None:
    """A guard against a scanner that silently finds nothing."""
    found = {name for p in _markdown() for _, name in quoted_paths(p.read_text(encoding="utf-8"))}
    assert "pipeline/store.py" in found
