"""Every reference in the code to a document resolves in a clone: ``sync-protocol.md §4.4``,
``docs/store.md``, ``architecture §7``, ``invariant 6``, a bare ``§3.5`` (which means the
document the file named last before it) name a file under ``docs/`` (or a path from the
repository root) and, with a section number, a heading of that number in it; an invariant
number is one of the numbered invariants in ``docs/architecture.md`` §3.

The other way round, the markdown (``README.md``, ``docs/**/*.md``): every repository path
(``bucketsync/bench/mix.py``, ``docs/bench/ingest.md``) and every module path
(``bucketsync.bench.store_layout``, ``pipeline.rules.parse_rules``) it quotes in backticks or
links to exists, so a renamed module (``bucketsync/bench_mix.py`` ->
``bucketsync/bench/mix.py``) cannot leave a stale name in the docs; every config key it names
(``redis.replica_urls``, ``BUCKETSYNC_REDIS__REPLICA_URLS``) is a setting of
``bucketsync/config.py``; and every ``bucketsync ...`` command in its code names a command,
sub-command and options the CLI has.

Pure: reads files only. The scanner is unit-tested below on small texts, so a reference
it cannot see does not pass by accident."""

from __future__ import annotations

import argparse
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel

from bucketsync.cli import build_parser
from bucketsync.config import Settings

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


# ------------------------------------------------------------------ config keys in markdown

_ENV_KEY = re.compile(r"\bBUCKETSYNC_([A-Z]+)__([A-Z0-9_]+)\b")


def _sections() -> dict[str, type[BaseModel]]:
    out = {}
    for name, f in Settings.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            out[name] = f.annotation
    return out


def config_keys(text: str, sections: Collection[str]) -> list[tuple[int, str, str]]:
    """``(line, section, key)`` of each ``section.key`` (prose or code, not inside a dotted
    or path name) and ``BUCKETSYNC_SECTION__KEY`` a markdown text names."""
    pattern = re.compile(
        r"(?<![\w./-])(" + "|".join(map(re.escape, sections)) + r")\.([a-z_][a-z0-9_]*)\b(?![/(])"
    )
    out = [
        (text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2))
        for m in pattern.finditer(text)
        if m.group(2) not in _FILE_EXTENSIONS  # redis.conf is a file, not a key
    ]
    for m in _ENV_KEY.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append((line, m.group(1).lower(), m.group(2).lower()))
    return out


_FILE_EXTENSIONS = frozenset({"conf", "yaml", "yml", "json", "md", "py", "lua", "log", "toml"})


def _module_attribute(module: str, name: str, root: Path = ROOT) -> bool:
    """``compaction.plan_reappend``: a function, class or constant of a project module
    named like a config section (``pipeline/compaction.py``), not a key."""
    for top in ("bucketsync", "pipeline", "gateway"):
        for p in (root / top / f"{module}.py", root / top / module / "__init__.py"):
            if p.is_file() and re.search(
                rf"^(?:async def|def|class)\s+{name}\b|^{name}\s*[:=]",
                p.read_text(encoding="utf-8"),
                re.MULTILINE,
            ):
                return True
    return False


def test_config_keys_finds_dotted_keys_and_environment_names() -> None:
    text = (
        "set `redis.replica_urls` (or BUCKETSYNC_REDIS__REPLICA_WAIT_S); gateway.port too,\n"
        "not bucketsync.gateway.server nor docs/redis.md nor redis.asyncio(x) nor redis.conf\n"
    )
    assert config_keys(text, ["redis", "gateway"]) == [
        (1, "redis", "replica_urls"),
        (1, "gateway", "port"),
        (1, "redis", "replica_wait_s"),
    ]
    assert _module_attribute("compaction", "plan_reappend")
    assert not _module_attribute("compaction", "interval_s")


@pytest.mark.parametrize("path", _markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_config_key_named_in_the_docs_exists(path: Path) -> None:
    sections = _sections()
    stale = [
        f"line {n}: {sec}.{key}"
        for n, sec, key in config_keys(path.read_text(encoding="utf-8"), sections)
        if sec not in sections
        or (key not in sections[sec].model_fields and not _module_attribute(sec, key))
    ]
    assert stale == []


def test_the_config_key_scan_sees_keys() -> None:
    found = {
        f"{s}.{k}"
        for p in _markdown()
        for _, s, k in config_keys(p.read_text(encoding="utf-8"), _sections())
    }
    assert {"redis.replica_urls", "processor.session_timeout_ms", "gateway.workers"} <= found


# ------------------------------------------------------------------ CLI invocations in markdown

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+)`")
_INVOKE = re.compile(r"^\s*(?:\$\s+)?(?:python3? -m bucketsync\.cli|bucketsync)(?=\s)(.*)$")


def invocations(text: str) -> list[tuple[int, list[str]]]:
    """``(line, words after the program)`` of each ``bucketsync ...`` / ``python3 -m
    bucketsync.cli ...`` that starts a line of a fenced block or a code span (comments cut)."""
    out = []
    for m in _FENCE.finditer(text):
        first = text.count("\n", 0, m.start(1)) + 1
        for i, line in enumerate(m.group(1).splitlines()):
            if im := _INVOKE.match(line):
                out.append((first + i, im.group(1).split("#")[0].split()))
    for m in _SPAN.finditer(text):
        if im := _INVOKE.match(m.group(1)):
            out.append((text.count("\n", 0, m.start()) + 1, im.group(1).split("#")[0].split()))
    return sorted(out)


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def cli_problems(words: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """What of a documented invocation the CLI does not have: its command (and a
    sub-command or a positional's choice right after it), or an option (``[--x N]``
    synopses too)."""
    p, i = parser, 0
    while i < len(words) and words[i].startswith("-"):  # global options, with a value
        action = p._option_string_actions.get(words[i].split("=")[0])
        if action is None:
            return [f"no option {words[i]}"]
        i += 1 if action.nargs == 0 or "=" in words[i] else 2
    problems: list[str] = []
    path = []
    while i < len(words) and (subs := _subcommands(p)):
        if words[i] not in subs:
            return [f"no command {' '.join([*path, words[i]])}"]
        path.append(words[i])
        p, i = subs[words[i]], i + 1
    rest = words[i:]
    positional = [a for a in p._actions if not a.option_strings and a.choices]
    named = rest and positional and re.fullmatch(r"[\w-]+", rest[0])
    if named and rest[0] not in positional[0].choices:
        problems.append(f"{' '.join(path)}: no {positional[0].dest} {rest[0]}")
    for w in rest:
        m = re.match(r"\[?(--[a-z][\w-]*)", w)
        if m and m.group(1) not in p._option_string_actions:
            problems.append(f"{' '.join(path)}: no option {m.group(1)}")
    return problems


def test_invocations_and_cli_problems_on_small_texts() -> None:
    text = (
        "Run `bucketsync bench recovery --runs 1` or\n"
        "```bash\n"
        "$ python3 -m bucketsync.cli --config x.yaml gateway --port 8080  # note\n"
        "bucketsync bench nothing [--wrong 3]\n"
        "```\n"
        "bucketsync is prose.\n"
    )
    found = invocations(text)
    assert found == [
        (1, ["bench", "recovery", "--runs", "1"]),
        (3, ["--config", "x.yaml", "gateway", "--port", "8080"]),
        (4, ["bench", "nothing", "[--wrong", "3]"]),
    ]
    parser = build_parser()
    assert cli_problems(found[0][1], parser) == []
    assert cli_problems(found[1][1], parser) == []
    assert cli_problems(found[2][1], parser) == [
        "bench: no which nothing",
        "bench: no option --wrong",
    ]
    assert cli_problems(["procesor"], parser) == ["no command procesor"]


@pytest.mark.parametrize("path", _markdown(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cli_invocation_in_the_docs_parses(path: Path) -> None:
    parser = build_parser()
    bad = [
        f"line {n}: bucketsync {' '.join(words)}: {problem}"
        for n, words in invocations(path.read_text(encoding="utf-8"))
        for problem in cli_problems(words, parser)
    ]
    assert bad == []


def test_the_cli_scan_sees_invocations() -> None:
    commands = {
        words[0] for p in _markdown() for _, words in invocations(p.read_text(encoding="utf-8"))
    }
    assert {"bench", "stack", "processor", "gateway"} <= commands
