"""The stack's one output channel: progress and hints go to stderr, never stdout.

Stdout is kept for what a caller may parse (``stack status --json``), so every module of
the package reports through :func:`say` instead of ``print``.
"""

from __future__ import annotations

from rich.console import Console

_console = Console(stderr=True, highlight=False, soft_wrap=True)


def say(message: str) -> None:
    """One line of progress on stderr (no rich markup: paths may contain brackets)."""
    _console.print(message, markup=False)
